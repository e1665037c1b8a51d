import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_app(app: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run an installed console script from another working directory."""
    env = {**os.environ, "IQ_TRANSFORM_DATA_DIR": str(REPO.parent / "shared" / "data")}
    executable = Path(sys.executable).with_name(app)
    return subprocess.run(
        [str(executable), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_analyze_app_writes_report_and_plot(tmp_path):
    result = run_app(
        "iq-analyze",
        "model=tiny-planted",
        "data.num_samples=2",
        "data.seqlen=128",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "spikes.json").read_text())
    assert report["has_spikes"]
    assert report["creating_sites"] == ["model.layers.1.mlp.down_proj"]
    assert (tmp_path / "run" / "spikes.png").stat().st_size > 10_000
    assert "spike tokens" in result.stdout


def test_analyze_app_rejects_unknown_keys_and_models(tmp_path):
    typo = run_app("iq-analyze", "data.num_sample=2", cwd=tmp_path)
    assert typo.returncode != 0 and "num_sample" in typo.stderr
    unknown = run_app(
        "iq-analyze",
        "model.spec=no-such-model",
        f"hydra.run.dir={tmp_path}",
        cwd=tmp_path,
    )
    assert unknown.returncode != 0
    assert "Unknown model spec 'no-such-model'" in unknown.stderr


@pytest.mark.slow
def test_analyze_app_on_smollm2_finds_the_recorded_spike(tmp_path):
    result = run_app(
        "iq-analyze",
        "model=smollm2-135m",
        "data.num_samples=3",
        "data.seqlen=128",
        "progress=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "spikes.json").read_text())
    first_tokens = [t for t in report["spike_tokens"] if t["token_index"] == 0]
    assert len(first_tokens) == 3  # every sample's first token
    assert {t["channel"] for t in first_tokens} == {507}
    assert all(t["max_abs"] > 15_000 for t in first_tokens)
    assert "model.layers.11.mlp.down_proj" in report["creating_sites"]
    assert "model.layers.28.mlp.down_proj" in report["removing_sites"]
    first = next(v for v in report["constant_vectors"] if v["kind"] == "first_token")
    assert first["min_cosine"] > 0.99

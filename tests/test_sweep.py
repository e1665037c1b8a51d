"""Multirun sweeps of ``iq-quantize`` on the tiny model, and ``iq-report``."""

import csv
import json
from pathlib import Path

import pytest

from tests.test_cli import run_app

TINY = (
    "model=tiny-planted",
    "data.num_samples=2",
    "data.seqlen=64",
    "eval.num_samples=2",
    "eval.seqlen=64",
    "progress=false",
)


def sweep(sweep_dir: Path, *overrides: str):
    return run_app(
        "iq-quantize",
        "-m",
        *TINY,
        *overrides,
        f"hydra.sweep.dir={sweep_dir}",
        cwd=sweep_dir.parent,
    )


def results_of(sweep_dir: Path) -> list[dict]:
    return [
        json.loads(path.read_text()) for path in sorted(sweep_dir.rglob("results.json"))
    ]


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    result = sweep(
        sweep_dir,
        "transform=none,spikefree",
        "quant=w8a8_static,w8a8_dynamic",
        "stages=rtn",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep_dir


def test_sweep_runs_every_combination(sweep_2x2):
    results = results_of(sweep_2x2)
    assert len(results) == 4
    assert {(r["quant"], r["transform"], r["stages"]) for r in results} == {
        (quant, transform, "rtn")
        for quant in ("w8a8_static", "w8a8_dynamic")
        for transform in ("none", "spikefree")
    }
    assert all(r["status"] == "ok" and r["ppl"] > 1 for r in results)
    for path in sweep_2x2.rglob("results.json"):
        results = json.loads(path.read_text())
        recipe = (path.parent / "recipe.yaml").read_text()
        static = results["quant"] == "w8a8_static"
        spikefree = results["transform"] == "spikefree"
        assert ("SpikeFreeModifier" in recipe) is spikefree
        assert ("observer: spikefree_mse" in recipe) is (static and spikefree)
        # the planted spikes reach the linears of layers 1 (creating down_proj)
        # and 4 (removing down_proj) of the FP model; SpikeFree leaves none
        before, after = results["spike_ratio_before"], results["spike_ratio_after"]
        assert len(before) == len(after) == 6
        assert min(before[1], before[4]) > 1000
        assert (max(after) < 64) is spikefree


def test_report_tables_the_measured_numbers(sweep_2x2):
    report = run_app("iq-report", str(sweep_2x2), cwd=sweep_2x2)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep_2x2 / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| w8a8_")]
    assert len(rows) == 4
    results = results_of(sweep_2x2)
    ppl = {(r["quant"], r["transform"]): r["ppl"] for r in results}
    reference = ppl[("w8a8_dynamic", "none")]
    for (quant, transform), value in ppl.items():
        row = next(
            line for line in rows if line.startswith(f"| {quant}+rtn | {transform} |")
        )
        assert f"{value:.3f} ({value / reference:.3f}x)" in row
    assert "| tiny-planted |" in table.splitlines()[2]
    with open(sweep_2x2 / "results.csv") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 4
    assert {float(line["ppl"]) for line in lines} == set(ppl.values())
    assert (sweep_2x2 / "ppl.png").stat().st_size > 10_000
    assert (sweep_2x2 / "spike_ratio.png").stat().st_size > 10_000
    assert rows[0] in report.stdout


def test_a_failing_run_is_recorded_and_reported(tmp_path):
    sweep_dir = tmp_path / "multirun"
    result = sweep(
        sweep_dir,
        "transform=none",
        "quant=w8a8_static,w8a8_dynamic",
        "quant.observer=nope",  # only static activations use an observer
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = {r["quant"]: r for r in results_of(sweep_dir)}
    assert results["w8a8_dynamic"]["status"] == "ok"
    failed = results["w8a8_static"]
    assert failed["status"] == "failed"
    assert "Unknown observer 'nope'" in failed["error"]
    assert "Traceback" in failed["traceback"]
    report = run_app("iq-report", str(sweep_dir), cwd=tmp_path)
    assert report.returncode == 0, report.stderr[-3000:]
    table = (sweep_dir / "results.md").read_text()
    assert "| w8a8_static+rtn | none | failed |" in table
    assert "## Failed runs" in table and "Unknown observer 'nope'" in table


def test_a_single_failing_run_still_raises(tmp_path):
    result = run_app(
        "iq-quantize",
        *TINY,
        "quant.observer=nope",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert result.returncode != 0
    assert "no spike-free counterpart" in result.stderr
    assert not (tmp_path / "run" / "results.json").exists()

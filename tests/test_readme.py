"""The README's Python example runs as it stands."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- the test runs the python block below -->"


def readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    after = readme[readme.index(MARKER) + len(MARKER) :]
    return re.search(r"```python\n(.*?)```", after, re.DOTALL).group(1)


def test_the_example_is_complete_python():
    code = readme_example()
    compile(code, "README.md", "exec")
    for name in ("load_model(", "Dataset.from_dict(", "oneshot(", "perplexity("):
        assert name in code


@pytest.mark.slow
def test_the_readme_example_runs_and_spikefree_static_int8_is_near_fp32():
    """SmolLM2, W8A8 static + SpikeFree, as the README runs it: within 15 % of FP32
    on the same windows (static INT8 without SpikeFree is 1.67x FP32, README)."""
    from iq_transform.evaluation import (
        TextSource,
        evaluation_windows,
        load_text,
        perplexity,
    )
    from iq_transform.models import load_model

    result = subprocess.run(
        [sys.executable, "-c", readme_example()],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ppl = float(re.search(r"WikiText-2 PPL ([\d.]+)", result.stdout).group(1))
    model, tokenizer = load_model("smollm2-135m")
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, seqlen=512, num_windows=4)
    fp32 = perplexity(model, windows, progress=False).ppl
    assert fp32 < ppl < 1.15 * fp32, (ppl, fp32)

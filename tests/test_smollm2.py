"""Integration on the real offline SmolLM2-135M: a few short windows."""

import pytest

from iq_transform.evaluation.data import TextSource, evaluation_windows, load_text
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.models import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m")


def test_fp32_wikitext2_perplexity_is_finite_and_stable(smollm2):
    model, tokenizer = smollm2
    text = load_text(TextSource(path="shared/wikitext-2-raw/wiki.test.raw"))
    windows = evaluation_windows(tokenizer, text, seqlen=512, num_windows=4)
    first = perplexity(model, windows, progress=False)
    second = perplexity(model, windows, progress=False)
    assert first.num_predictions == 4 * 511
    assert 10 < first.ppl < 100
    assert first.ppl == second.ppl

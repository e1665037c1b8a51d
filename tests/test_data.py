import pytest
import torch

from iq_transform.evaluation.data import (
    DataError,
    TextSource,
    calibration_windows,
    default_data_root,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.models.toy import build_char_tokenizer

WIKITEXT = TextSource(path="shared/wikitext-2-raw/wiki.test.raw")
BROWN = TextSource(path="shared/brown/brown.txt")


def test_offline_corpora_are_found():
    assert default_data_root() is not None
    text = load_text(WIKITEXT)
    assert "\r" not in text and text.startswith("= Robert Boulter =")
    assert len(load_documents(BROWN)) > 100


def test_evaluation_windows_follow_bos_policy():
    tokenizer = build_char_tokenizer()  # adds <s>
    windows = evaluation_windows(tokenizer, "abcdefghij" * 10, seqlen=11)
    assert windows.shape == (10, 11)
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    assert tokenizer.decode(windows[0, 1:]) == "abcdefghij"
    assert evaluation_windows(tokenizer, "abcdefghij" * 10, 11, 3).shape == (3, 11)


def test_calibration_windows_start_at_documents_and_are_seeded():
    tokenizer = build_char_tokenizer()
    documents = [f"document {i} " + "x" * 50 for i in range(20)]
    first = calibration_windows(tokenizer, documents, 4, 32, seed=1)
    again = calibration_windows(tokenizer, documents, 4, 32, seed=1)
    other = calibration_windows(tokenizer, documents, 4, 32, seed=2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert (first[:, 0] == tokenizer.bos_token_id).all()
    assert all(tokenizer.decode(row[1:]).startswith("document") for row in first)


def test_missing_file_names_the_path_and_the_fix():
    with pytest.raises(DataError, match="not found.*data.path"):
        load_text(TextSource(path="/nonexistent/wiki.test.raw"))


def test_unreachable_hub_dataset_says_what_to_provide(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="local file"):
        load_text(TextSource(hub_dataset="no-such-org/no-such-dataset"))


def test_seqlen_longer_than_text_is_a_clear_error():
    tokenizer = build_char_tokenizer()
    with pytest.raises(DataError, match="fewer than one window"):
        evaluation_windows(tokenizer, "short text", seqlen=512)
    with pytest.raises(DataError, match="Lower num_windows"):
        evaluation_windows(tokenizer, "x" * 100, seqlen=20, num_windows=50)
    with pytest.raises(DataError, match="calibration text gives 0 samples"):
        calibration_windows(tokenizer, ["tiny", "docs"], 2, seqlen=512)


def test_perplexity_of_the_planted_model_is_finite_and_deterministic(
    planted, planted_windows
):
    model, _, _ = planted
    first = perplexity(model, planted_windows, progress=False)
    second = perplexity(model, planted_windows, batch_size=2, progress=False)
    assert first.num_predictions == planted_windows.numel() - len(planted_windows)
    assert 1.0 < first.ppl < float("inf")
    assert first.ppl == pytest.approx(second.ppl, rel=1e-5)

import logging

import pytest
import torch

from iq_transform.evaluation.data import TextSource, calibration_windows, load_documents
from iq_transform.models import load_model
from iq_transform.models.toy import build_planted_spike_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
    "liquor jugs.\nHow vexingly quick daft zebras jump! Sphinx of black quartz, "
    "judge my vow.\nThe five boxing wizards jump quickly. Jackdaws love my big "
    "sphinx of quartz.\n"
) * 4


@pytest.fixture(scope="session")
def planted():
    """(model, tokenizer, planted spikes) of the tiny Llama with planted spikes."""
    return build_planted_spike_model()


@pytest.fixture(scope="session")
def planted_windows(planted):
    """Two windows of 96 tokens from different offsets, each starting with BOS."""
    _, tokenizer, _ = planted
    rows = []
    for offset in (0, 37):
        ids = tokenizer(TEXT[offset:], return_tensors="pt").input_ids[0, :96]
        rows.append(ids)
    return torch.stack(rows)


@pytest.fixture(scope="module")
def w8a8_rtn_on_device(calibration):
    """The planted model after oneshot with W8A8 static + SpikeFree RTN, on the
    device the tests run on (a GPU where there is one)."""
    from iq_transform.models.offload import move_model
    from tests.test_checkpoint import quantized
    from tests.test_sync_free import DEVICE

    model, tokenizer = quantized("w8a8_static", "rtn", calibration)
    return move_model(model, DEVICE), tokenizer


@pytest.fixture(scope="session")
def calibration():
    """Four 128-token Brown windows for the tiny planted model: exactly SpikeFree's
    default num_calibration_samples, so it sees all of them."""
    _, tokenizer = load_model("tiny-planted")
    documents = load_documents(TextSource(path="shared/brown/brown.txt"))[:200]
    return calibration_windows(tokenizer, documents, num_samples=4, seqlen=128)


@pytest.fixture
def loguru_warnings(caplog):
    """``caplog`` with loguru's warnings (and worse) routed into it: its ``text``
    holds what the package warned while the test ran."""
    from loguru import logger

    handler = logger.add(caplog.handler, level="WARNING", format="{message}")
    caplog.set_level(logging.WARNING)
    yield caplog
    logger.remove(handler)


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record each call of ``owner.name`` (which still runs) in the returned list."""
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls

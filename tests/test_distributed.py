"""SpikeFree calibration across two gloo ranks (as under ``torchrun``) installs the
templates one process computes on all their batches together."""

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from iq_transform.models.arch import get_arch_spec
from iq_transform.models.toy import build_char_tokenizer, build_planted_spike_model
from iq_transform.spikefree.modifier import run_calibration_forwards
from iq_transform.spikefree.runtime import SpikeFreeRuntime
from iq_transform.spikefree.templates import FIRST_TOKEN, MID_SEQUENCE

WORLD_SIZE = 2
SEQLEN = 64
# Rank 1 alone sees carriers in 1 of 4 sequences (below this), all 8 in 5 (above).
MIN_FRACTION = 0.5
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen "
    "liquor jugs. How vexingly quick daft zebras jump! Sphinx of black quartz, "
    "judge my vow. The five boxing wizards jump quickly. "
) * 3


def calibration_halves() -> list[list[dict]]:
    """The two ranks' shares, genuinely different: rank 0 gets four windows that
    start with BOS (first-token spikes only); rank 1 four without BOS, one of them
    with a newline delimiter mid-sequence (its only spike)."""
    tokenizer = build_char_tokenizer()

    def window(offset: int, bos: bool, text: str = TEXT) -> dict:
        ids = tokenizer(text[offset:], add_special_tokens=bos).input_ids[:SEQLEN]
        return {"input_ids": torch.tensor(ids)}

    delimited = TEXT[:100] + "\n" + TEXT[100:]
    return [
        [window(offset, bos=True) for offset in (0, 11, 23, 37)],
        [window(offset, bos=False) for offset in (5, 17, 29)]
        + [window(70, bos=False, text=delimited)],
    ]


def uneven_shares() -> list[list[dict]]:
    """Five windows on rank 0 (three with BOS), two on rank 1 (one with the
    delimiter): torchrun's shards need not be equal."""
    first, second = calibration_halves()
    return [first[:3] + second[:2], [first[3], second[3]]]


def shares_with_a_spike_free_rank() -> list[list[dict]]:
    """Every spike on rank 0; rank 1's windows have neither BOS nor delimiter, so
    its statistics hold no spike token at all."""
    first, second = calibration_halves()
    return [first + second[3:], second[:3]]


SHARES = {
    "halves": calibration_halves,
    "uneven": uneven_shares,
    "spike_free_rank": shares_with_a_spike_free_rank,
}


def calibrate(batches: list[dict]) -> dict[str, torch.Tensor]:
    """What ``SpikeFreeModifier.on_calibration_start`` runs, on the planted model."""
    model, _, _ = build_planted_spike_model()
    runtime = SpikeFreeRuntime(model, get_arch_spec(model))
    runtime.start_collecting()
    run_calibration_forwards(runtime, model, batches)
    runtime.finish_collecting(MIN_FRACTION)
    return runtime.templates.state_dict()


def run_rank(rank: int, init_method: str, out_dir: str, shares: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        state = calibrate(SHARES[shares]()[rank])
    finally:
        dist.destroy_process_group()
    torch.save(state, Path(out_dir) / f"rank{rank}.pt")


def norm_sites(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted(key for key in state if ".norm_templates." in key)


def spawn_ranks(tmp_path: Path, shares: str) -> list[dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    mp.spawn(
        run_rank,
        args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path), shares),
        nprocs=WORLD_SIZE,
        join=True,
    )
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def assert_ranks_equal_one_process(ranks, together) -> None:
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    assert ranks[0].keys() == together.keys()
    for key, value in together.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shares", ["uneven", "spike_free_rank"])
def test_uneven_shards_and_a_rank_without_spikes_reduce_to_one_process(
    tmp_path, shares
):
    """Ranks with different numbers of windows, or one that never sees a spike
    token (its spike statistics are empty: sums zero, the smallest spike max +inf),
    still install one process's templates on the union of the shards."""
    ranks = spawn_ranks(tmp_path, shares)
    first, second = SHARES[shares]()
    together = calibrate(first + second)
    assert_ranks_equal_one_process(ranks, together)
    assert len(norm_sites(together)) == 6
    if shares == "spike_free_rank":
        assert norm_sites(calibrate(second)) == []  # alone it would install none


def test_ranks_install_the_templates_of_one_process_on_all_batches(tmp_path):
    ranks = spawn_ranks(tmp_path, "halves")
    halves = calibration_halves()
    together = calibrate(halves[0] + halves[1])
    alone = [calibrate(half) for half in halves]  # a rank's templates unreduced

    # every rank installs the same templates and sites, bit for bit ...
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    # ... and they are one process's on all batches (sums in another order)
    assert ranks[0].keys() == together.keys()
    for key, value in together.items():
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-6, atol=1e-6)
    assert len(norm_sites(together)) == 6  # layers 2-4, two norms each

    # without the reduction the ranks would differ from it and from each other:
    # rank 1's own carrier fraction (1/4) is below min_fraction, so no sites ...
    assert norm_sites(alone[1]) == []
    # ... and rank 0 has never seen a delimiter: its mid-sequence template falls
    # back to the first-token one, its thresholds rest on BOS spikes only
    _, _, (bos, delimiter) = build_planted_spike_model()
    created = together["layers.1.down_template"]
    assert created[MID_SEQUENCE, delimiter.spike_channel] > 1000.0
    assert created[FIRST_TOKEN, bos.spike_channel] > 3000.0
    assert alone[0].keys() == together.keys()
    assert alone[0]["layers.1.down_template"][MID_SEQUENCE, delimiter.spike_channel] < 1
    for layer in (2, 3, 4):
        key = f"layers.{layer}.residual_threshold"
        assert alone[0][key] > 1.5 * together[key], key

"""Text for calibration and evaluation: hub datasets or local files, as token windows.

Evaluation follows the usual perplexity protocol (GPTQ, SmoothQuant, QuaRot): rows
joined with blank lines, tokenized once, cut into non-overlapping windows. Calibration
samples start at document boundaries, as real prompts do, so that first-token spikes
appear where they would in use.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger
from transformers import PreTrainedTokenizerBase

__all__ = [
    "DataError",
    "TextSource",
    "default_data_root",
    "resolve_data_path",
    "load_text",
    "load_documents",
    "tokenizer_adds_bos",
    "evaluation_windows",
    "calibration_windows",
]

SHARED_PREFIX = "shared/"
CHARS_PER_TOKEN_BOUND = 16


class DataError(ValueError):
    """Text could not be found or does not fit the requested windows."""


@dataclass
class TextSource:
    """Where text comes from: a local file, or a Hugging Face dataset.

    :param path: a local text file; ``shared/...`` is looked up in the offline data
        folder (``IQ_TRANSFORM_DATA_DIR`` or the ``shared/data`` beside the project)
    :param hub_dataset: a dataset id on the hub, e.g. ``wikitext``; used when ``path``
        is not given
    :param hub_config: the dataset's configuration, e.g. ``wikitext-2-raw-v1``
    :param split: the dataset split
    :param text_field: the column that holds the text
    """

    path: str | None = None
    hub_dataset: str | None = None
    hub_config: str | None = None
    split: str = "test"
    text_field: str = "text"

    def describe(self) -> str:
        if self.path:
            return self.path
        return f"{self.hub_dataset}/{self.hub_config}:{self.split}"


def default_data_root() -> Path | None:
    """The offline corpora folder: ``$IQ_TRANSFORM_DATA_DIR`` or a ``shared/data``
    found beside the project checkout or the working directory."""
    if env := os.environ.get("IQ_TRANSFORM_DATA_DIR"):
        return Path(env)
    starts = [Path(__file__).resolve().parent, Path.cwd().resolve()]
    for start in starts:
        for folder in (start, *start.parents):
            for candidate in (
                folder / "shared" / "data",
                folder.parent / "shared" / "data",
            ):
                if candidate.is_dir():
                    return candidate
    return None


def resolve_data_path(path: str) -> Path:
    """A data path, with ``shared/...`` looked up in the offline data folder."""
    if path.startswith(SHARED_PREFIX):
        root = default_data_root()
        if root is None:
            raise DataError(
                f"Cannot resolve {path!r}: no offline data folder found. Set "
                "IQ_TRANSFORM_DATA_DIR to the folder holding wikitext-2-raw/ and "
                "brown/, or give an absolute data path."
            )
        return root / path[len(SHARED_PREFIX) :]
    return Path(path).expanduser()


def _read_file(source: TextSource) -> str:
    path = resolve_data_path(source.path)
    if not path.is_file():
        raise DataError(
            f"Text file not found: {path} (from {source.path!r}). Provide an "
            "existing file with data.path=..., or a hub dataset with "
            "data.path=null data.hub_dataset=wikitext "
            "data.hub_config=wikitext-2-raw-v1."
        )
    return path.read_text(encoding="utf-8").replace("\r\n", "\n")


def _read_hub_rows(source: TextSource) -> list[str]:
    if not source.hub_dataset:
        raise DataError("No text source: set data.path or data.hub_dataset.")
    try:
        from datasets import load_dataset

        dataset = load_dataset(
            source.hub_dataset, source.hub_config, split=source.split
        )
    except Exception as error:  # the hub raises many kinds when unreachable
        raise DataError(
            f"Could not load hub dataset {source.describe()} ({error}). Without a "
            "network, give a local file instead: data.path=/path/to/text.txt "
            "(offline defaults: shared/wikitext-2-raw/wiki.test.raw, "
            "shared/brown/brown.txt)."
        ) from error
    return list(dataset[source.text_field])


def _non_empty(blocks: list[str], source: TextSource) -> list[str]:
    kept = [block.strip() for block in blocks if block.strip()]
    if not kept:
        raise DataError(f"{source.describe()} holds no text.")
    return kept


def load_text(source: TextSource) -> str:
    """The whole text, non-empty rows joined by blank lines (CRLF normalized)."""
    rows = _read_file(source).split("\n") if source.path else _read_hub_rows(source)
    return "\n\n".join(_non_empty(rows, source))


def load_documents(source: TextSource) -> list[str]:
    """Documents: blocks of a file separated by blank lines, or dataset rows."""
    blocks = _read_file(source).split("\n\n") if source.path else _read_hub_rows(source)
    return _non_empty(blocks, source)


def tokenizer_adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer puts a BOS token in front of what it encodes."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bool(ids) and ids[0] == bos


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    seqlen: int,
    num_windows: int | None = None,
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over the once-tokenized text.

    When the tokenizer adds BOS, every window starts with BOS followed by
    ``seqlen - 1`` text tokens, so each window scores ``seqlen - 1`` predictions
    whatever the tokenizer.

    :return: int64 tensor (windows, seqlen)
    """
    if seqlen < 2:
        raise DataError(f"seqlen must be at least 2, got {seqlen}.")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    bos = tokenizer_adds_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen
    available = ids.numel() // body
    if available == 0:
        raise DataError(
            f"The text has {ids.numel()} tokens, fewer than one window of "
            f"seqlen={seqlen}. Use a smaller seqlen or a longer text."
        )
    if num_windows is None:
        num_windows = available
    elif num_windows > available:
        raise DataError(
            f"Asked for {num_windows} windows of {seqlen} tokens, but the text has "
            f"{ids.numel()} tokens ({available} windows). Lower num_windows or seqlen."
        )
    windows = ids[: num_windows * body].reshape(num_windows, body)
    if bos:
        bos_column = torch.full((num_windows, 1), tokenizer.bos_token_id)
        windows = torch.cat([bos_column, windows], dim=1)
    return windows


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase,
    documents: list[str],
    num_samples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """``num_samples`` windows of ``seqlen`` tokens, each starting at a document.

    Documents are shuffled with ``seed``; each sample tokenizes consecutive documents
    (with the tokenizer's own special tokens at its start) until ``seqlen`` tokens.

    :return: int64 tensor (num_samples, seqlen)
    """
    if num_samples < 1:
        raise DataError(f"num_samples must be at least 1, got {num_samples}.")
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    samples: list[torch.Tensor] = []
    cursor = 0
    while len(samples) < num_samples and cursor < len(order):
        text, start = "", cursor
        ids: list[int] = []
        while len(ids) < seqlen and cursor < len(order):
            # Only the first ``seqlen`` tokens are kept: skip tokenizing the rest.
            document = documents[order[cursor]][: seqlen * CHARS_PER_TOKEN_BOUND]
            text = text + ("\n\n" if text else "") + document
            cursor += 1
            ids = tokenizer(text, add_special_tokens=True).input_ids
        if len(ids) >= seqlen:
            samples.append(torch.tensor(ids[:seqlen]))
        elif start == 0:
            break
    if len(samples) < num_samples:
        raise DataError(
            f"The calibration text gives {len(samples)} samples of {seqlen} tokens, "
            f"{num_samples} were asked for. Use a longer text, a smaller seqlen or "
            "fewer samples."
        )
    logger.debug(f"{num_samples} calibration windows of {seqlen} tokens")
    return torch.stack(samples)

"""
Rebuild a Gemma tokenizer from the metadata of a GGUF file.

transformers 5.17 converts a gemma/gemma2/gemma3 GGUF vocabulary into a *Unigram*
model, but the scores these files carry are BPE merge ranks, and it ignores
``tokenizer.ggml.add_bos_token``. The result splits text into about twice too many
tokens and adds no ``<bos>``. transformers 5.24 builds it right: a BPE with byte
fallback (``GemmaTokenizer``) whose merges are recovered from the order of the
vocabulary. ``GemmaTokenizer`` and ``generate_merges`` are the same in 5.17, so this
module does what 5.24 does, from the fields ``gguf.GGUFReader`` reads:

- tokens made only of spaces are respelled as ``"▁" * n``, the way the normalizer
  writes them,
- merges come from ``generate_merges(vocab, {token: -index})``: a token's position in
  the file is its merge rank,
- bos/eos/unk/pad and ``add_bos_token``/``add_eos_token`` come from the file,
- control tokens (type 3) are added as special tokens, user-defined ones (type 4) as
  plain added tokens, so that neither is cut into pieces.

Usage::

    tokenizer = gemma_tokenizer_from_gguf("gemma-3-270m-q4_k_m.gguf")
    tokenizer("The capital of France is").input_ids
    # [2, 818, 5279, 529, 7001, 563]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken
from transformers import GemmaTokenizer
from transformers.tokenization_utils_base import generate_merges

__all__ = [
    "GEMMA_ARCHITECTURES",
    "GGUFVocabulary",
    "build_gemma_tokenizer",
    "gemma_tokenizer_from_gguf",
    "read_gguf_vocabulary",
]

#: GGUF architectures whose vocabulary is a Gemma sentencepiece BPE
GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")

#: llama.cpp token types (``tokenizer.ggml.token_type``)
_CONTROL = 3
_USER_DEFINED = 4

_SPECIAL_TOKEN_KEYS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


@dataclass(frozen=True)
class GGUFVocabulary:
    """
    The tokenizer metadata of a GGUF file, as llama.cpp writes it.

    :param architecture: ``general.architecture``, e.g. ``"gemma3"``
    :param tokens: the vocabulary, in id order
    :param token_types: llama.cpp token type of every token
    :param special_tokens: ``bos_token``/``eos_token``/... mapped to their text
    :param add_bos_token: whether the file asks for a ``<bos>`` on every sequence
    :param add_eos_token: whether the file asks for an ``<eos>`` on every sequence
    """

    architecture: str
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    special_tokens: dict[str, str]
    add_bos_token: bool
    add_eos_token: bool


def read_gguf_vocabulary(gguf_path: str | Path) -> GGUFVocabulary:
    """
    Read the tokenizer fields of a GGUF file (tensors are memory-mapped, not read).

    :param gguf_path: path to the ``.gguf`` file
    :return: the vocabulary and its special tokens
    """
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields

    def value(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    tokens = tuple(value("tokenizer.ggml.tokens"))
    token_types = tuple(value("tokenizer.ggml.token_type", [1] * len(tokens)))
    special_tokens = {
        name: tokens[int(value(key))]
        for name, key in _SPECIAL_TOKEN_KEYS.items()
        if value(key) is not None
    }
    return GGUFVocabulary(
        architecture=str(value("general.architecture")),
        tokens=tokens,
        token_types=token_types,
        special_tokens=special_tokens,
        add_bos_token=bool(value("tokenizer.ggml.add_bos_token", True)),
        add_eos_token=bool(value("tokenizer.ggml.add_eos_token", False)),
    )


def _respell(token: str) -> str:
    """The form the vocabulary holds a token in: a run of spaces written as ``▁``."""
    if " " in token and not token.strip():
        return "▁" * len(token)
    return token


def build_gemma_tokenizer(vocabulary: GGUFVocabulary) -> GemmaTokenizer:
    """
    Build the BPE-with-byte-fallback Gemma tokenizer a GGUF vocabulary describes.

    :param vocabulary: metadata read by :func:`read_gguf_vocabulary`
    :return: a ready tokenizer; ``save_pretrained`` and reloading work as usual
    """
    tokens = [_respell(token) for token in vocabulary.tokens]
    vocab = {token: index for index, token in enumerate(tokens)}
    ranks = {token: -index for index, token in enumerate(tokens)}
    merges = generate_merges(vocab, ranks)

    tokenizer = GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=vocabulary.add_bos_token,
        add_eos_token=vocabulary.add_eos_token,
        **vocabulary.special_tokens,
    )
    _add_typed_tokens(tokenizer, vocabulary.tokens, vocabulary.token_types, vocab)
    return tokenizer


def _add_typed_tokens(
    tokenizer: GemmaTokenizer,
    tokens: tuple[str, ...],
    token_types: tuple[int, ...],
    vocab: dict[str, int],
) -> None:
    """
    Add control tokens as special tokens and user-defined ones as added tokens.

    Like transformers 5.24, a user-defined token is added as the file spells it and
    only if the vocabulary holds it that way: the runs of spaces, respelled as
    ``▁``, are left to the BPE model.
    """
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type == _CONTROL
    ]
    if control:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": control}, replace_extra_special_tokens=False
        )
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, token_type in zip(tokens, token_types, strict=True)
        if token_type == _USER_DEFINED and token in vocab
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)


def gemma_tokenizer_from_gguf(gguf_path: str | Path) -> GemmaTokenizer:
    """
    Read a Gemma GGUF file's vocabulary and build its tokenizer (about 2 s).

    :param gguf_path: path to a gemma/gemma2/gemma3 ``.gguf`` file
    :return: the tokenizer transformers >= 5.24 would build from this file
    :raises ValueError: if the file is not a Gemma one
    """
    vocabulary = read_gguf_vocabulary(gguf_path)
    if vocabulary.architecture not in GEMMA_ARCHITECTURES:
        raise ValueError(
            f"{gguf_path} is a {vocabulary.architecture!r} GGUF, expected one of "
            f"{GEMMA_ARCHITECTURES}"
        )
    return build_gemma_tokenizer(vocabulary)

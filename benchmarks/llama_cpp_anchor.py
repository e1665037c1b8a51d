"""llama.cpp as the CPU user's anchor, through llama-cpp-cffi's compiled CPU module.

Install: ``pip install --no-deps llama-cpp-cffi==0.4.42`` (a prebuilt wheel, no
compiler; its pins, transformers<5 and huggingface-hub<0.29, would downgrade the
project's, and only its compiled module is used here, which needs cffi alone).

The package's own ``import llama`` picks CUDA or Vulkan by running ``nvidia-smi``
and imports transformers; this module loads its CPU extension
(``llama/_llama_cpp_cpu*.so``, llama.cpp's C API from ``llama.h``) directly
instead. That module is built with GCC 14 and references two libstdc++ symbols
that older ones lack (``__cxa_call_terminate``, only called when an exception
escapes a ``noexcept`` function, and ``std::ios_base_library_init``, never
called): it is loaded with lazy binding so that they are never resolved.
Its CPU backend is built for AVX2 (``LlamaCpp.system_info()``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


@functools.cache
def library() -> tuple[Any, Any]:
    """``(ffi, lib)`` of llama-cpp-cffi's CPU module; ImportError if not installed."""
    loaded = sys.modules.get("llama._llama_cpp_cpu")
    if loaded is None:
        spec = importlib.util.find_spec("llama")
        folders = (spec and spec.submodule_search_locations) or []
        paths = [p for f in folders for p in Path(f).glob("_llama_cpp_cpu*.so")]
        if not paths:
            raise ModuleNotFoundError("llama-cpp-cffi is not installed")
        loaded = _load_lazily("_llama_cpp_cpu", paths[0])
    ffi, lib = loaded.ffi, loaded.lib

    @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
    def _log(level: int, text: Any, user_data: Any) -> None:
        if level == lib.GGML_LOG_LEVEL_ERROR:
            sys.stderr.write(ffi.string(text).decode(errors="replace"))

    lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
    lib.llama_backend_init()
    return ffi, lib


def _load_lazily(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    flags = sys.getdlopenflags()
    sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)
    try:
        module = importlib.util.module_from_spec(spec)  # dlopen
    finally:
        sys.setdlopenflags(flags)
    spec.loader.exec_module(module)
    return module


def quantize(source: Path, target: Path, ftype: str = "Q8_0", threads: int = 0) -> None:
    """``llama_model_quantize`` of ``source`` to ``LLAMA_FTYPE_MOSTLY_<ftype>``,
    requantizing a quantized GGUF (written to a temporary file, then renamed)."""
    ffi, lib = library()
    params = ffi.new(
        "struct llama_model_quantize_params *",
        lib.llama_model_quantize_default_params(),
    )
    params.ftype = getattr(lib, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.allow_requantize = True
    params.nthread = threads
    partial = target.with_name(target.name + ".partial")
    status = lib.llama_model_quantize(
        str(source).encode(), str(partial).encode(), params
    )
    if status != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"llama.cpp could not quantize {source} to {ftype}")
    partial.replace(target)


class LlamaCpp:
    """A GGUF model in one llama.cpp context on the CPU (one sequence, id 0).

    ``n_batch`` and ``n_ubatch`` are both ``batch`` tokens, so a prefill of up to
    ``batch`` tokens is one graph; ``threads`` serve decode and prefill alike.
    """

    def __init__(self, path: Path, context: int, batch: int, threads: int) -> None:
        self.ffi, self.lib = ffi, lib = library()
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if self.model == ffi.NULL:
            raise RuntimeError(f"llama.cpp could not load {path}")
        params = lib.llama_context_default_params()
        params.n_ctx = context
        params.n_batch = params.n_ubatch = batch
        params.n_seq_max = 1
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        self.context = lib.llama_init_from_model(self.model, params)
        if self.context == ffi.NULL:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {path}")
        self.vocab_size = lib.llama_vocab_n_tokens(
            lib.llama_model_get_vocab(self.model)
        )

    def batch(self, tokens: Sequence[int], start: int = 0) -> Batch:
        """A batch of ``tokens`` at positions ``start, start + 1, ...``."""
        return Batch(self.ffi, tokens, start)

    def decode(self, batch: Batch) -> None:
        """``llama_decode`` of ``batch``, until its logits are computed."""
        status = self.lib.llama_decode(self.context, batch.struct[0])
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        self.lib.llama_synchronize(self.context)

    def keep(self, tokens: int) -> None:
        """Drop every cached position from ``tokens`` on (0: clear the cache)."""
        if tokens == 0:
            self.lib.llama_kv_self_clear(self.context)
        elif not self.lib.llama_kv_self_seq_rm(self.context, 0, tokens, -1):
            raise RuntimeError("llama.cpp could not drop cached tokens")

    def last_logits(self) -> list[float]:
        """Logits of the last decoded batch's last token."""
        row = self.lib.llama_get_logits_ith(self.context, -1)
        return self.ffi.unpack(row, self.vocab_size)

    def system_info(self) -> str:
        return self.ffi.string(self.lib.llama_print_system_info()).decode()

    def close(self) -> None:
        if self.context is not None:
            self.lib.llama_free(self.context)
            self.lib.llama_model_free(self.model)
            self.context = self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Batch:
    """A ``llama_batch`` of sequence 0 with logits for its last token only, its
    arrays owned by Python (built once, outside the timed calls)."""

    def __init__(self, ffi: Any, tokens: Sequence[int], start: int) -> None:
        n = len(tokens)
        self.sequence = ffi.new("int32_t[]", [0])
        self.logits = ffi.new("int8_t[]", n)
        self.logits[n - 1] = 1
        self.arrays = (
            ffi.new("int32_t[]", list(tokens)),
            ffi.new("int32_t[]", list(range(start, start + n))),
            ffi.new("int32_t[]", [1] * n),
            ffi.new("int32_t *[]", [self.sequence] * n),
        )
        self.struct = ffi.new("struct llama_batch *")
        self.struct.n_tokens = n
        token, pos, n_seq_id, seq_id = self.arrays
        self.struct.token, self.struct.pos = token, pos
        self.struct.n_seq_id, self.struct.seq_id = n_seq_id, seq_id
        self.struct.logits = self.logits

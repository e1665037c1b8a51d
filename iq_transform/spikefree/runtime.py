"""The spike-free forward, installed into a model.

Per decoder layer and per forward (nothing is looked up by batch, so it holds under
llm-compressor's layer-major sequential pipeline, shuffled data and padding):

1. the layer's residual input names its *carriers*: tokens whose max |x| exceeds
   ``ratio`` x the median token max of their sequence, or the layer's calibrated
   absolute threshold (the only test for a decode step with a KV cache); with
   ``follow_carriers``, as in calibration, the previous layer's carriers that keep
   their share of its max instead of the threshold, wherever a median exists;
2. each norm that feeds quantized linears gets the carriers' rows overwritten with
   their kind's template (stored before the norm weight, scaled by the weight the
   norm has *now*); the linears it feeds compute those rows from the unquantized
   template (:mod:`iq_transform.spikefree.exact_rows`), since they are constants;
3. at layers that create or remove spikes, the MLP also detects at its ``down_proj``
   input; those rows are zeroed before ``down_proj`` (no quantized linear sees the
   spike) and ``down_proj``'s output rows become the output template, so the
   residual stream receives exactly what the spike would have written.

Outside calibration the forward never waits for a GPU: no ``.any()`` or
``.item()``, no boolean-mask indexing, templates and thresholds kept on the model's
device; rows are selected with ``torch.where`` over fixed shapes, so the same ops
run whether a batch has spike tokens or not (and a decode step can be captured in
a CUDA graph). On the CPU, where reading a mask waits for nothing, the spike rows
are selected by index instead (``HOST_INDEXED_DEVICES``), so the runtime touches
only them.

Plain torch hooks (on the layer, its norms and the MLP's output projection, so
any MLP layout works: gated, fused ``gate_up_proj``, ``fc1 -> fc2``) are used, not
``HooksMixin`` hooks, because they must act in llm-compressor's propagation pass
too. Observers learn which rows to drop from
:func:`iq_transform.spikefree.rows.excluded_rows`.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from compressed_tensors.quantization import QuantizationStatus
from llmcompressor.modeling.offset_norm import CalibrationOffsetNorm
from loguru import logger
from torch import nn

from iq_transform.models.arch import ArchSpec
from iq_transform.spikefree.detect import MIN_TOKENS_FOR_MEDIAN, spike_token_mask
from iq_transform.spikefree.detect import token_max as detect_token_max
from iq_transform.spikefree.distributed import reduce_statistics
from iq_transform.spikefree.exact_rows import (
    frozen_weights,
    leaves_inputs_alone,
    linear_with_unquantized_input,
    through_pre_hooks,
)
from iq_transform.spikefree.norm_rows import fused_norm_templates
from iq_transform.spikefree.row_decisions import row_decider, row_detector
from iq_transform.spikefree.row_writes import row_writer, triton_runs_on
from iq_transform.spikefree.rows import set_excluded_rows
from iq_transform.spikefree.templates import (
    FIRST_TOKEN,
    KINDS,
    MID_SEQUENCE,
    LayerStatistics,
    LayerTemplates,
    SpikeTemplates,
)

__all__ = [
    "insert_templates",
    "template_row_outputs",
    "SpikeFreeRuntime",
    "get_runtime",
    "on_runtime_installed",
    "write_count",
]

_RUNTIME_ATTRIBUTE = "_spikefree_runtime"
# A carrier stays a carrier while its max |x| keeps at least this share of the
# previous layer's: removal can take several layers (SmolLM2: 24.5k, 10k, 4.4k).
CARRIER_DROP = 0.25
# Called with every runtime installed; the checkpoint export registers the hook that
# keeps the runtime in ``save_pretrained`` (it sits above the method, so it cannot
# be imported from here).
_INSTALL_CALLBACKS: list = []


def on_runtime_installed(callback) -> None:
    """Run ``callback(runtime)`` whenever a :class:`SpikeFreeRuntime` is installed.

    :param callback: a callable taking the runtime (registered once)
    """
    if callback not in _INSTALL_CALLBACKS:
        _INSTALL_CALLBACKS.append(callback)


# Device types where reading a row mask on the host waits for nothing: there the
# spike rows are selected by index and written in place, touching only those rows;
# elsewhere (GPUs) every row goes through ``torch.where``, so the host never waits.
HOST_INDEXED_DEVICES = {"cpu"}


def _indexed_device(device: torch.device | str) -> torch.device:
    """``device`` with its index: ``cuda`` is the current CUDA device."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            return torch.device(device.type, module.current_device())
    return device


def _indexed(tensor: torch.Tensor) -> bool:
    # ``is_cpu`` spares building a device object at every site of a decode step
    return ("cpu" if tensor.is_cpu else tensor.device.type) in HOST_INDEXED_DEVICES


def _short_on_host(hidden: torch.Tensor, indexed: bool) -> bool:
    """A sequence too short for a median (a decode step) on a host-indexed
    device: where one reduction the host reads for free tells whether any row can
    be a spike row (:func:`_exceeds_on_host`)."""
    return indexed and hidden.shape[-2] < MIN_TOKENS_FOR_MEDIAN


# Outputs on these devices, at least this large, get their spike rows written in
# place by one Triton launch that moves only those rows
# (:mod:`iq_transform.spikefree.row_writes`); ``torch.where`` reads and writes every
# row. On the H200's host either costs 13-35 us of host time per call
# (``benchmarks/launch_costs.py``); the runtime overheads in the README were
# measured with the kernel at every size, a decode step's rows included.
KERNEL_DEVICES = {"cuda"}
KERNEL_MIN_ELEMENTS = 1
# widest norm the fused kernel computes (one block a row)
FUSED_NORM_MAX_WIDTH = 16384
_ZEROS: dict[tuple, torch.Tensor] = {}
# forwards whose handled rows are kept before they are counted (a decode step's
# rows are a few bytes each)
_UNSUMMED_FORWARDS = 256
# ``down_proj``'s spike rows, when they are found after it from its input
_DETECT_AFTER = object()


# the last few (rows, kinds) tensors written by index on the host, with their flat
# indices: one layer's insertions (its norms, the linears they feed, down_proj)
# share one rows tensor, so the rows are found once, not at every write
_HOST_ROWS_ENTRIES = 2
_HOST_ROWS: list[tuple] = []


def _host_rows(
    rows: torch.Tensor, kinds: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices of the ``rows`` that are set, and those rows' ``kinds``,
    computed once per tensor (references held, so an ``id`` is never reused while
    cached; versions catch writes in place, so rows made under inference_mode,
    which count no writes, are not cached)."""
    for entry in _HOST_ROWS:
        cached_rows, rows_version, cached_kinds, kinds_version, flat, flat_kinds = entry
        if (
            cached_rows is rows
            and rows_version == rows._version
            and (
                kinds is None
                or (cached_kinds is kinds and kinds_version == kinds._version)
            )
        ):
            return flat, flat_kinds
    flat = rows.reshape(-1).nonzero().squeeze(1)
    flat_kinds = None if kinds is None else kinds.reshape(-1).index_select(0, flat)
    if rows.is_inference() or (kinds is not None and kinds.is_inference()):
        return flat, flat_kinds  # made under inference_mode: no versions to check
    entry = (rows, rows._version, kinds, None if kinds is None else kinds._version)
    _HOST_ROWS.insert(0, (*entry, flat, flat_kinds))
    del _HOST_ROWS[_HOST_ROWS_ENTRIES:]
    return flat, flat_kinds


def _write_host_rows(
    tensor: torch.Tensor, flat: torch.Tensor, values: torch.Tensor | None
) -> None:
    """Rows ``flat`` of ``tensor`` (batch, tokens, features), in place: ``values``
    (one row each), or zeros."""
    try:  # contiguous, or columns of a wider output (joined int8 GEMMs)
        rows = tensor.view(-1, tensor.shape[-1])
    except RuntimeError:  # rows no 2-D view reaches
        index = torch.unravel_index(flat, tensor.shape[:-1])
        tensor[index] = 0.0 if values is None else values
        return
    if values is None:
        rows.index_fill_(0, flat, 0.0)
    else:
        rows.index_copy_(0, flat, values)


def _in_place_kernel(output: torch.Tensor, rows: torch.Tensor):
    """The row-writing kernel, where it may write ``output`` in place."""
    if (
        output.device.type not in KERNEL_DEVICES
        or output.numel() < KERNEL_MIN_ELEMENTS
        or not output.is_contiguous()
        or rows.shape != output.shape[:-1]
        or (output.requires_grad and torch.is_grad_enabled())
    ):
        return None
    return row_writer(output)


def insert_templates(
    output: torch.Tensor,
    rows: torch.Tensor,
    kinds: torch.Tensor,
    templates: torch.Tensor,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    kind: int | None = None,
) -> torch.Tensor:
    """Overwrite the spike rows of ``output`` with their kind's template.

    This is the one place templates enter activations; a fused kernel (norm +
    insertion + static quantization) replaces exactly this function. On a GPU it
    never synchronizes with the device (every row is selected by ``torch.where``);
    on the CPU, where nothing waits, only the spike rows are written, in place.

    :param output: activations (batch, tokens, features), a module's fresh output
        (it may be modified in place)
    :param rows: bool (batch, tokens), the rows to overwrite
    :param kinds: long (batch, tokens), each row's spike kind
    :param templates: (kinds, features), on ``output``'s device
    :param scale: optional (features,) factor, e.g. the norm's current weight
    :param shift: optional (features,) term added after it, e.g. a LayerNorm's bias
    :param kind: the one kind every row has, where the caller knows it (a decode
        step's tokens are all mid-sequence): then ``kinds`` is not read
    """
    values = templates if scale is None else templates * scale
    if shift is not None:
        values = values + shift
    values = values.to(device=output.device, dtype=output.dtype)
    if _indexed(output):
        flat, flat_kinds = _host_rows(rows, kinds)
        if flat.numel():
            _write_host_rows(output, flat, values.index_select(0, flat_kinds))
        return output
    if (kernel := _in_place_kernel(output, rows)) is not None:
        return kernel(output, rows, kinds, values)
    selected = values[kinds] if kind is None else values[kind]
    return torch.where(rows.unsqueeze(-1), selected, output)


def zero_rows(
    hidden: torch.Tensor, rows: torch.Tensor, kinds: torch.Tensor | None = None
) -> torch.Tensor:
    """``hidden`` (a fresh tensor) with ``rows`` set to zero, in place (``kinds``,
    any long tensor of ``rows``' shape, spares the kernel path a fill)."""
    if _indexed(hidden):
        flat, _ = _host_rows(rows, None)
        if flat.numel():
            _write_host_rows(hidden, flat, None)
        return hidden
    if (kernel := _in_place_kernel(hidden, rows)) is not None:
        width = hidden.shape[-1]
        key = (width, hidden.dtype, hidden.device)
        if key not in _ZEROS:
            _ZEROS[key] = hidden.new_zeros(len(KINDS), width)
        if kinds is None:
            kinds = torch.zeros_like(rows, dtype=torch.long)
        return kernel(hidden, rows, kinds, _ZEROS[key])
    return hidden.masked_fill_(rows.unsqueeze(-1), 0.0)


# transformers' RMSNorm classes whose arithmetic ``fused_norm_templates`` computes:
# Llama's (the weight times the normalized rows cast to the dtype) and Gemma's
# (float32 throughout, times ``1 + w``, cast once)
_CAST_BEFORE_WEIGHT_NORMS = frozenset(
    {
        "LlamaRMSNorm",
        "MistralRMSNorm",
        "Qwen2RMSNorm",
        "Qwen3RMSNorm",
        "GraniteRMSNorm",
        "Phi3RMSNorm",
    }
)
_FLOAT32_WEIGHT_NORMS = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm"})


def _exceeds_on_host(hidden: torch.Tensor, threshold: torch.Tensor | float) -> bool:
    """Whether any |x| of a host tensor exceeds ``threshold``: one reduction for
    both extremes, read by the host (an ``abs`` and an ``amax`` cost two ops and
    a copy)."""
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.item()
    low, high = hidden.detach().aminmax()
    return max(high.item(), -low.item()) > threshold


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


def _own_forward(norm: nn.Module):
    """The forward function ``norm`` runs, under compressed-tensors' offload
    wrapper (which ``oneshot`` leaves on every module) where there is one."""
    if "_original_forward_func" in vars(norm):
        return norm._original_forward_func
    forward = vars(norm).get("forward")
    return type(norm).forward if forward is None else getattr(forward, "__func__", None)


def _submodule(module: nn.Module, path: list[str]) -> nn.Module:
    """``module.get_submodule`` of a dotted name split into ``path``, straight
    from the children dicts (the runtime looks its norms up at every forward)."""
    for name in path:
        module = module._modules[name]
    return module


def _norms_state(fuses: bool, norms: list[nn.Module]) -> tuple:
    """What decides how a layer's norms are hooked: whether norms are fused where
    the layer runs, each norm and the forward it runs (its own, or the one inside
    an offload wrapper). Compared with ``==``, which for modules and functions is
    identity (a fresh bound method of the same function and module is the same
    forward)."""
    state = [fuses]
    for norm in norms:
        attributes = vars(norm)
        state += (
            norm,
            attributes.get("forward"),
            attributes.get("_original_forward_func"),
        )
    return tuple(state)


def _fused_norm_form(norm: nn.Module, arch: ArchSpec) -> bool | None:
    """``cast_before_weight`` of a norm the fused kernel computes, or ``None``
    (another class, or a forward someone else replaced: the norm then runs
    itself, with the templates inserted after it)."""
    name = type(norm).__name__
    if arch.norm_kind != "rms" or _own_forward(norm) is not type(norm).forward:
        return None
    if name in _CAST_BEFORE_WEIGHT_NORMS and arch.norm_weight_offset == 0.0:
        return True
    if name in _FLOAT32_WEIGHT_NORMS and arch.norm_weight_offset == 1.0:
        return False
    return None


def _norm_epsilon(norm: nn.Module) -> float:
    epsilon = _plain_attribute(norm, "variance_epsilon")
    return float(_plain_attribute(norm, "eps", 1e-6) if epsilon is None else epsilon)


def _parameter_on(module: nn.Module, name: str, device: torch.device):
    """``module``'s parameter ``name`` as its forward sees it on ``device``: where
    compressed-tensors' offload cache (which ``oneshot`` leaves on every module)
    stores it on that device already, the stored tensor, which is what onloading
    returns, without onloading's calls (microseconds a norm, per forward)."""
    stored = getattr(module._parameters, "offloaded_values", module._parameters)
    tensor = stored.get(name)
    if tensor is not None and tensor.device == device:
        return tensor
    return getattr(module, name, None)


def _effective_norm_weight(norm: nn.Module, arch: ArchSpec) -> torch.Tensor:
    """The factor the norm multiplies ``x / rms(x)`` by, as the module is *now*:
    llm-compressor swaps Gemma's ``(1 + w)`` norms for plain ``w`` ones in oneshot."""
    offset = 0.0 if isinstance(norm, CalibrationOffsetNorm) else arch.norm_weight_offset
    return norm.weight.float() + offset


def _norm_bias(norm: nn.Module) -> torch.Tensor | None:
    """A LayerNorm's bias as the module is now (SmoothQuant divides it too)."""
    bias = getattr(norm, "bias", None)
    return None if bias is None else bias.float()


def _normalized(x: torch.Tensor, eps: float, arch: ArchSpec) -> torch.Tensor:
    """What the norm scales by its weight: ``x / rms(x)``, or for a LayerNorm
    ``(x - mean) / std``."""
    x = x.float()
    if arch.norm_kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass(slots=True)
class _Tokens:
    """What every decoder layer of one model forward shares (computed once)."""

    valid: torch.Tensor
    # the padding mask, or None where every token is real (no mask ops then)
    mask: torch.Tensor | None
    kinds: torch.Tensor
    # the one kind of every token where the host knows it (a decode step), or None
    kind: int | None
    no_carriers: torch.Tensor


@dataclass(slots=True)
class _Forward:
    """What one layer knows about the forward in flight."""

    valid: torch.Tensor
    kinds: torch.Tensor
    carriers: torch.Tensor
    mask: torch.Tensor | None = None
    kind: int | None = None
    # False where ``carriers`` is known to be all False without reading the device:
    # the layer has no norm templates, or (where reading costs nothing) none was found
    has_carriers: bool = True
    _kind_rows: torch.Tensor | None = None
    # ``(layer input, detect)`` while the carriers are not detected yet: a decode
    # step's detection runs in the first norm's pass over the same rows
    # (``detect(write)`` also writes the norm's template rows), or when first asked
    pending: tuple | None = None
    # norms whose output the fused kernel computed with its template rows
    fused: set = field(default_factory=set)
    # a short sequence (a decode step) on a host-indexed device whose layer input
    # has no carrier: the down_proj threshold as a host float, so the down_proj
    # site is decided by one reduction the host reads for free
    down_limit: float | None = None

    def rows(self) -> torch.Tensor:
        """The carriers, detected now if they are still pending."""
        if self.pending is not None:
            self.resolve()
        return self.carriers

    def resolve(self, write: tuple | None = None) -> torch.Tensor:
        _, detect = self.pending
        self.pending = None
        self.carriers = detect(write)
        return self.carriers

    @property
    def kind_rows(self) -> torch.Tensor:
        """(kinds,) flat index of one carrier row of each kind: all carrier rows of
        a kind hold the same template, so the exact-row linears compute one row a
        kind (computed when a linear first asks)."""
        if self._kind_rows is None:
            self._kind_rows = _one_row_per_kind(self.rows(), self.kinds)
        return self._kind_rows


def _version(tensor: torch.Tensor | None) -> tuple | None:
    """Changes whenever ``tensor`` is replaced or written in place."""
    if tensor is None:
        return None
    return id(tensor), tensor.data_ptr(), write_count(tensor)


def write_count(tensor: torch.Tensor) -> int | None:
    """How often ``tensor`` was written in place, or ``None`` for one made under
    ``torch.inference_mode``, which counts no writes (only replacing it shows)."""
    return None if tensor.is_inference() else tensor._version


def _stored_version(module: nn.Module, name: str) -> tuple | None:
    """:func:`_version` of ``module``'s parameter ``name`` as stored. An offloaded
    module (compressed-tensors' cache: llm-compressor leaves a model so after
    ``oneshot`` on a GPU) onloads a fresh copy at every access, so the copy's
    version changes at every forward; the stored tensor is written in place when the
    parameter is assigned (a disk cache keeps its meta tensor and rewrites the file:
    there only a replaced entry counts)."""
    stored = getattr(module._parameters, "offloaded_values", None)
    if stored is not None and name in stored:
        return _version(stored[name])
    return _version(getattr(module, name, None))


_ABSENT = object()


def _plain_attribute(module: nn.Module, name: str, default=None):
    """``getattr(module, name, default)`` for an attribute set on the instance
    (compressed-tensors' ``quantization_scheme``, a converted linear's
    ``template_outputs``) or its class. Where it is absent, ``getattr`` goes
    through ``nn.Module.__getattr__``, whose raised and caught ``AttributeError``
    costs microseconds of host time per call, several per layer and forward."""
    value = vars(module).get(name, _ABSENT)
    return getattr(type(module), name, default) if value is _ABSENT else value


def _quantizes_input(module: nn.Module) -> bool:
    """Whether ``module`` quantizes its input (compressed-tensors) or carries
    precomputed template outputs: otherwise its template rows are exact already."""
    if _plain_attribute(module, "template_outputs") is not None:
        return True
    scheme = _plain_attribute(module, "quantization_scheme")
    return (
        scheme is not None
        and scheme.input_activations is not None
        and _plain_attribute(module, "quantization_enabled", True)
    )


# dynamic input quantization whose scales each cover part of one row only
_ROW_WISE_DYNAMIC = frozenset({"token", "group"})
_FINAL_STATUSES = frozenset(
    {
        QuantizationStatus.FROZEN,
        QuantizationStatus.COMPRESSED,
        QuantizationStatus.DECOMPRESSED,
    }
)


def _rows_stay_apart(module: nn.Module, own_hooks: tuple[int, int]) -> bool:
    """Whether a spike row left in ``module``'s input changes nothing but its own
    output row (which the output template then replaces): no hook but the
    runtime's reads the input (observers, GPTQ's Hessian, transforms; the onload
    hooks of :mod:`iq_transform.models.offload` read nothing), and its
    input quantization, if any, is final and takes no scale across rows (static,
    or dynamic per token or group; not dynamic per tensor)."""
    before, after = module._forward_pre_hooks, module._forward_hooks
    if len(before) + len(after) != len(own_hooks):  # (the runtime's alone: no scan)
        hooks = {**before, **after}
        readers = {
            hook_id for hook_id, hook in hooks.items() if not leaves_inputs_alone(hook)
        }
        if readers != set(own_hooks):
            return False
    elif own_hooks[0] not in before or own_hooks[1] not in after:
        return False
    if module._forward_pre_hooks_with_kwargs or module._forward_hooks_with_kwargs:
        return False
    scheme = _plain_attribute(module, "quantization_scheme")
    inputs = None if scheme is None else scheme.input_activations
    if inputs is None or not _plain_attribute(module, "quantization_enabled", True):
        return True
    if _plain_attribute(module, "quantization_status") not in _FINAL_STATUSES:
        return False
    return not inputs.dynamic or inputs.strategy in _ROW_WISE_DYNAMIC


class LayerRuntime:
    """The spike-free forward of one decoder layer: collects statistics while
    ``statistics`` is set, applies ``templates`` once they exist."""

    def __init__(self, runtime: SpikeFreeRuntime, index: int, layer: nn.Module):
        self.runtime, self.index, self.layer = runtime, index, layer
        self.arch = runtime.arch
        self.mlp = layer.get_submodule(self.arch.down_proj.rsplit(".", 1)[0])
        self._layer_index = _cache_layer_index(layer)
        self._templates: LayerTemplates | None = None
        self._carries = False  # the templates carry spikes
        self._resident: LayerTemplates | None = None
        self._resident_device: torch.device | None = None
        # (resident templates, their residual and down_proj thresholds as floats),
        # read once where the host reads them for free
        self._host_thresholds: tuple[LayerTemplates, float, float] | None = None
        # per norm: (key, template rows scaled by the norm's weight, in its dtype)
        self._norm_values: dict[str, tuple[tuple, torch.Tensor]] = {}
        # (key, the down_proj output template in the output's dtype and device)
        self._down_values_cast: tuple[tuple, torch.Tensor] | None = None
        # per linear with final weights: (key, norm rows, exact template outputs)
        self._frozen_outputs: dict[int, tuple] = {}
        self.statistics: LayerStatistics | None = None
        self.current: _Forward | None = None
        self._norm_handles: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._norm_paths = [name.split(".") for name in self.arch.norm_names()]
        # what _hook_norms last saw: the fusing decision, each norm and its forward
        self._norms_seen: list | None = None
        # norms whose forward runs the fused kernel while templates apply: (norm,
        # the forward function given to it)
        self._fused_norms: dict[int, tuple[nn.Module, object]] = {}
        # hooks registered only while the layer's state can act through them
        self._removed = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._linear_handles: list[torch.utils.hooks.RemovableHandle] = []
        # (path, norm name) of each linear whose output rows the templates can
        # make exact, and what _hook_linears last saw of them
        self._exact_row_sites: list[tuple[list[str], str]] = []
        self._linears_seen: tuple | None = None
        # the sequence (SpikeFreeRuntime.sequence) one of whose forwards found the
        # norms and linears, and the down_proj hooks, as they are: its later
        # forwards (decode steps) skip those checks
        self._settled_for: object | None = None
        self._down_settled_for: object | None = None
        self._down_rows_stay_apart = False
        self._down_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._down_proj = layer.get_submodule(self.arch.down_proj)
        self._down_hook_ids: tuple[int, int] | None = None
        self._down_rows: torch.Tensor | None = None
        self._down_collected: tuple[torch.Tensor, ...] | None = None
        self._sync_hooks()

    # -- state -----------------------------------------------------------------
    @property
    def templates(self) -> LayerTemplates | None:
        """The layer's templates as calibrated or loaded (float32, any device)."""
        return self._templates

    @templates.setter
    def templates(self, templates: LayerTemplates | None) -> None:
        self._templates, self._resident = templates, None
        self._carries = templates is not None and templates.carries_spikes
        self._resident_device = None
        self._norm_values, self._frozen_outputs = {}, {}
        self._down_values_cast = None
        self._sync_hooks()

    def resident_templates(self, device: torch.device) -> LayerTemplates:
        """The templates on ``device``, copied there once (not at every insertion)."""
        resident = self._resident
        if resident is not None and (
            device == self._resident_device
            or _indexed_device(self._resident_device) == _indexed_device(device)
        ):
            return resident
        self._resident = self._templates.to(device)
        self._resident_device = self._resident.device
        return self._resident

    def _thresholds_on_host(self, templates: LayerTemplates) -> tuple[float, float]:
        """The residual and ``down_proj`` thresholds of resident host templates as
        floats (a decode step's checks would otherwise read them at every site)."""
        cached = self._host_thresholds
        if cached is None or cached[0] is not templates:
            residual = templates.residual_threshold.item()
            cached = (templates, residual, templates.down_threshold.item())
            self._host_thresholds = cached
        return cached[1], cached[2]

    @property
    def collecting(self) -> bool:
        return self.statistics is not None

    @property
    def active(self) -> bool:
        return self.runtime.enabled and (self.collecting or self._carries)

    def start_collecting(self, hidden_size: int) -> None:
        self.statistics = LayerStatistics(hidden_size, self.arch.norm_names())
        self.templates = None

    def finish_collecting(self, carries: bool, down_site: bool) -> None:
        templates = self.statistics.finalize(carries, down_site)
        self.statistics = None
        self.templates = templates

    def handles(self) -> list[torch.utils.hooks.RemovableHandle]:
        """Every hook this layer has registered now."""
        return [
            *self._handles,
            *self._linear_handles,
            *self._down_handles,
            *self._norm_handles.values(),
        ]

    def remove(self) -> None:
        _remove_hooks([*self._handles, *self._linear_handles, *self._down_handles])
        self._handles, self._linear_handles, self._down_handles = [], [], []
        self._down_hook_ids, self._removed = None, True
        self._remove_norm_hooks()

    def _sync_hooks(self) -> None:
        """Register the hooks that the layer's state can act through, and remove
        the others: a hook that returns at once still makes its module's call the
        slow one (a SmolLM2 decode step called 271 modules through hooks before,
        77 since: ``benchmarks/runtime_overhead.py``). Called whenever the state
        changes; the norms and linears are hooked at the next forward with
        carriers (:meth:`_hook_norms`, :meth:`_hook_linears`)."""
        if self._removed:
            return
        templates = self._templates
        collecting = self.collecting
        norm_rows = templates is not None and bool(templates.norm_templates)
        down_rows = templates is not None and templates.down_template is not None
        # a layer without templates still ends a chain of followed carriers
        wants_layer = (
            collecting or norm_rows or down_rows or self.runtime.follow_carriers
        )
        if wants_layer and not self._handles:
            self._handles = [
                self.layer.register_forward_pre_hook(
                    self._before_layer, with_kwargs=True
                ),
                self.layer.register_forward_hook(self._after_layer),
            ]
        elif not wants_layer:
            _remove_hooks(self._handles)
            self._handles, self.current = [], None
        self._remove_linear_hooks()
        self._exact_row_sites = []
        if self.runtime.exact_template_rows and norm_rows and not collecting:
            self._exact_row_sites = self._template_fed_linears(templates)
        wants_down = collecting or down_rows
        if wants_down and not self._down_handles:
            self._hook_down_proj()
        elif not wants_down:
            _remove_hooks(self._down_handles)
            self._down_handles, self._down_hook_ids = [], None
        if not (collecting or norm_rows):
            self._remove_norm_hooks()

    def _remove_linear_hooks(self) -> None:
        _remove_hooks(self._linear_handles)
        self._linear_handles, self._linears_seen = [], None
        self._settled_for = None

    def _remove_norm_hooks(self) -> None:
        self._unhook_norms()
        self._unfuse_norms()

    def _unhook_norms(self) -> None:
        """Take the norms' hooks out (fused norms keep their forward); the next
        forward with carriers checks the norms again."""
        _remove_hooks(self._norm_handles.values())
        self._norm_handles.clear()
        self._norms_seen, self._settled_for = None, None

    # -- hooks -----------------------------------------------------------------
    def _before_layer(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        runtime, collecting = self.runtime, self.statistics is not None
        if (
            not (runtime.enabled and (collecting or self._carries))
            or not isinstance(hidden, torch.Tensor)
            or hidden.is_meta
        ):
            self.current = None
            return
        cache = kwargs.get("past_key_values")
        if collecting:
            state = self._collecting_state(hidden, cache)
        else:
            state = self._inference_state(hidden, cache)
        self.current = state
        set_excluded_rows(state.carriers)
        # the norms and linears act on carriers only: a layer that knows it has
        # none (a decode step on the host, mostly) leaves them as they are
        sequence = runtime.sequence
        inserts = collecting or state.has_carriers
        if inserts and (sequence is None or self._settled_for is not sequence):
            if collecting or self._templates.norm_templates:
                self._hook_norms(hidden)
            if self._exact_row_sites:
                self._hook_linears()
            self._settled_for = sequence
        elif not inserts and (self._norm_handles or self._linear_handles):
            self._unhook_insertions()
        if self._down_hook_ids is not None and (
            sequence is None or self._down_settled_for is not sequence
        ):
            self._order_down_proj_hooks()
            self._down_rows_stay_apart = _rows_stay_apart(
                self._down_proj, self._down_hook_ids
            )
            self._down_settled_for = sequence

    def _unhook_insertions(self) -> None:
        """Take the norm and linear hooks out while the host knows the layer has
        no carrier (most decode steps): each would return at once, but a hooked
        call is its module's slow one, several microseconds between a model's ops
        (an int8 SmolLM2 decode step hooks seven modules a layer with them, two
        without). The next forward with carriers hooks them again; fused norms
        keep their forward."""
        self._unhook_norms()
        self._remove_linear_hooks()

    def _collecting_state(self, hidden: torch.Tensor, cache) -> _Forward:
        """Calibration: the layer input's carriers, recorded into the statistics."""
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(
                f"NaN/inf activations entering decoder layer {self.index} during "
                "SpikeFree calibration: fix the model or its dtype (e.g. fp16 "
                "overflow) before calibrating."
            )
        batch, tokens = hidden.shape[:2]
        runtime = self.runtime
        token_max = detect_token_max(hidden)
        valid = runtime.valid_tokens(batch, tokens, hidden.device)
        kinds = _token_kinds(valid, _past_length(cache, self._layer_index))
        carriers = spike_token_mask(token_max, runtime.ratio, valid)
        carriers = carriers | runtime.still_carried(token_max)
        runtime.remember_carriers(token_max, carriers)
        self._record_residual(token_max, carriers, valid)
        runtime.note_spikes(carriers)
        return _Forward(valid=valid, kinds=kinds, carriers=carriers, mask=valid)

    def _inference_state(self, hidden: torch.Tensor, cache) -> _Forward:
        """Inference: the layer input's carriers, found now or (a short sequence
        where the detection kernel runs) by the first norm's pass."""
        runtime, device = self.runtime, hidden.device
        shared = runtime.tokens(
            hidden.shape[0], hidden.shape[1], device, cache, self._layer_index
        )
        templates = self.resident_templates(device)
        carriers, pending, down_limit = shared.no_carriers, None, None
        has_carriers = bool(templates.norm_templates)
        indexed = _indexed(hidden)
        host_short = _short_on_host(hidden, indexed)
        if host_short:
            residual_limit, down_limit = self._thresholds_on_host(templates)
        if has_carriers:
            threshold = templates.residual_threshold
            if host_short and not _exceeds_on_host(hidden, residual_limit):
                # no activation over the threshold: no carrier, and every
                # insertion of the layer is skipped
                carriers, has_carriers = runtime.no_rows(hidden), False
            elif not indexed and row_detector(hidden) is not None:
                pending = (hidden, self._carrier_detection(hidden, shared, threshold))
                carriers = None
                runtime.forget_carriers()
            else:
                carriers = runtime.spike_rows(
                    hidden, shared.mask, threshold, follow=True
                )
                # where reading the rows costs nothing, a layer whose input
                # has no carrier (most decode steps) skips every insertion
                has_carriers = not runtime.found_none(carriers)
        else:
            runtime.forget_carriers()
        if has_carriers or templates.down_template is None:
            down_limit = None  # the down_proj hook takes its full path
        return _Forward(
            valid=shared.valid,
            kinds=shared.kinds,
            carriers=carriers,
            mask=shared.mask,
            kind=shared.kind,
            has_carriers=has_carriers,
            pending=pending,
            down_limit=down_limit,
        )

    def _carrier_detection(self, hidden, shared: _Tokens, threshold: torch.Tensor):
        """The detection of a short sequence's carriers, for later: one pass over
        the layer input that can also write the first norm's template rows."""

        def detect(write: tuple | None) -> torch.Tensor:
            rows = self.runtime.spike_rows(hidden, shared.mask, threshold, write=write)
            set_excluded_rows(rows)
            return rows

        return detect

    def _after_layer(self, module, args, output):
        self.current = None
        set_excluded_rows(None)

    def _hook_norms(self, hidden: torch.Tensor) -> None:
        """Hook the norms as they are *now* (oneshot swaps Gemma's temporarily),
        fusing those the fused kernel computes; checked again only when a norm,
        its forward or where the layer runs has changed since the last forward."""
        norms = [_submodule(self.layer, path) for path in self._norm_paths]
        fuses = self.runtime.fuses_norms_on(hidden)
        if self._norms_seen == _norms_state(fuses, norms):
            return
        for name, norm in zip(self.arch.norm_names(), norms, strict=True):
            if id(norm) not in self._fused_norms:
                self._fuse_norm_where_it_runs(name, norm)
            if id(norm) in self._fused_norms:
                # its forward inserts where the kernel does not apply: a hook
                # would only make every call of the norm the slow one
                if (handle := self._norm_handles.pop(id(norm), None)) is not None:
                    handle.remove()
            elif id(norm) not in self._norm_handles:
                hook = self._norm_hook(name)
                self._norm_handles[id(norm)] = norm.register_forward_hook(hook)
        self._norms_seen = _norms_state(fuses, norms)

    def _fuse_norm_where_it_runs(self, name: str, norm: nn.Module) -> None:
        # not where the fused kernel never runs (by default, Triton off the
        # norm's device): its forward would only add a call around the norm's
        weight = getattr(norm, "weight", None)
        if not isinstance(weight, torch.Tensor):
            return
        if not self.runtime.fuses_norms_on(weight):
            return
        if (cast_before_weight := _fused_norm_form(norm, self.arch)) is not None:
            self._fuse_norm(name, norm, cast_before_weight)

    def _fuse_norm(self, name: str, norm: nn.Module, cast_before_weight: bool):
        """Let ``norm``'s forward compute its template rows in the same pass
        (:func:`~iq_transform.spikefree.norm_rows.fused_norm_templates`) wherever
        the fused kernel runs, and run the norm itself everywhere else."""

        epsilon = _norm_epsilon(norm)  # read once: not an attribute lookup a call

        def forward(module, hidden_states, *args, **kwargs):
            if not args and not kwargs and module is norm:
                output = self._fused_norm_output(
                    name, norm, hidden_states, cast_before_weight, epsilon
                )
                if output is not None:
                    return output
            output = type(module).forward(module, hidden_states, *args, **kwargs)
            if module is not norm:
                return output  # a copy that took this forward: hooked on its own
            inserted = self._after_norm(name, module, hidden_states, output)
            return output if inserted is None else inserted

        if "_original_forward_func" in vars(norm):  # inside the offload wrapper
            norm._original_forward_func = forward
        else:
            norm.forward = types.MethodType(forward, norm)
        self._fused_norms[id(norm)] = (norm, forward)

    def _unfuse_norms(self) -> None:
        """Give every fused norm its own forward back (inside the offload wrapper,
        if it still has one); the next forward checks the norms again (and fuses
        them again if the runtime still fuses)."""
        for norm, forward in self._fused_norms.values():
            if vars(norm).get("_original_forward_func") is forward:
                norm._original_forward_func = type(norm).forward
            elif getattr(vars(norm).get("forward"), "__func__", None) is forward:
                del norm.forward
        self._fused_norms.clear()
        self._norms_seen, self._settled_for = None, None

    def _fused_norm_output(
        self,
        name: str,
        norm: nn.Module,
        hidden: torch.Tensor,
        cast_before_weight: bool,
        epsilon: float,
    ) -> torch.Tensor | None:
        """The norm's output with its template rows, or ``None`` where the fused
        kernel does not apply (the norm then runs, and its hook inserts)."""
        state = self.current
        if state is None or self.collecting or not isinstance(hidden, torch.Tensor):
            return None
        device = hidden.device
        weight = _parameter_on(norm, "weight", device)
        if (
            weight is None
            or weight.device != device
            or not self.runtime.fuses_norms_on(hidden)
            or (cast_before_weight and weight.dtype != hidden.dtype)
            or not hidden.is_contiguous()
            or hidden.shape[-1] > FUSED_NORM_MAX_WIDTH
            or (hidden.requires_grad and torch.is_grad_enabled())
        ):
            return None
        layer_templates = self.resident_templates(device)
        templates = layer_templates.norm_templates.get(name)
        if templates is None:
            return None
        arguments = {
            "weight_offset": self.arch.norm_weight_offset,
            "templates": templates,
            "kinds": state.kinds,
            "cast_before_weight": cast_before_weight,
        }
        if state.pending is not None and hidden is state.pending[0]:
            # a decode step: the layer input's detection runs in this pass
            output, rows = fused_norm_templates(
                hidden,
                weight,
                epsilon,
                threshold=layer_templates.residual_threshold,
                valid=state.mask,
                record=self.runtime._record(hidden),
                **arguments,
            )
            state.pending, state.carriers = None, rows
            set_excluded_rows(rows)
        else:
            rows = state.rows()
            if rows.shape != hidden.shape[:-1]:
                return None
            output, _ = fused_norm_templates(
                hidden, weight, epsilon, rows=rows, **arguments
            )
        state.fused.add(name)
        return output

    def _norm_hook(self, name: str):
        def after_norm(module, args, output):
            return self._after_norm(name, module, args[0], output)

        return after_norm

    def _after_norm(
        self, name: str, norm: nn.Module, hidden: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        """What the norm ``name`` returns with its template rows, or ``None`` for
        its output as it is (collecting statistics; nothing to insert)."""
        state = self.current
        if state is None:
            return None
        if self.collecting:
            if bool(state.carriers.any()):
                normalized = _normalized(hidden, _norm_epsilon(norm), self.arch)
                self.statistics.add_rows(
                    self.statistics.norm_sums[name],
                    self.statistics.norm_counts[name],
                    normalized[state.carriers],
                    state.kinds[state.carriers],
                )
            return None
        if name in state.fused or not state.has_carriers:
            return None
        values = self._scaled_norm_template(name, norm, output)
        if values is None:
            return None
        if state.pending is not None and _fuses_detection(state, hidden, output):
            state.resolve(write=(output, state.kinds, values))
            return output
        return insert_templates(
            output, state.rows(), state.kinds, values, kind=state.kind
        )

    def _scaled_norm_template(
        self, name: str, norm: nn.Module, output: torch.Tensor
    ) -> torch.Tensor | None:
        """The norm's template rows times its weight as it is now (plus a
        LayerNorm's bias), in ``output``'s dtype: recomputed only when the weight
        or bias changes, not at every insertion."""
        template = self.resident_templates(output.device).norm_templates.get(name)
        if template is None:
            return None
        key = (
            id(norm),
            output.dtype,
            output.device,
            _stored_version(norm, "weight"),
            _stored_version(norm, "bias"),
        )
        cached = self._norm_values.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        values = template * _effective_norm_weight(norm, self.arch)
        if (shift := _norm_bias(norm)) is not None:
            values = values + shift
        values = values.to(device=output.device, dtype=output.dtype)
        self._norm_values[name] = (key, values)
        return values

    def _template_fed_linears(
        self, templates: LayerTemplates
    ) -> list[tuple[list[str], str]]:
        """(path, norm name) of the linears fed by a templated norm whose output
        rows need the exact template output: not those feeding a ``down_proj``
        with an output template (its carrier rows become that template anyway)."""
        sites = []
        for norm_name, linear_names in self.arch.norm_linears.items():
            if norm_name not in templates.norm_templates:
                continue
            for linear_name in linear_names:
                linear = self.layer.get_submodule(linear_name)
                feeds_down_proj = any(linear is m for m in self.mlp.modules())
                if feeds_down_proj and templates.down_template is not None:
                    continue
                sites.append((linear_name.split("."), norm_name))
        return sites

    def _hook_linears(self) -> None:
        """Hook the template-fed linears that quantize their input *now*
        (compressed-tensors attaches schemes after the runtime, ``to_int8_cpu``
        adds template outputs, calibration turns quantization off and on): a
        linear that does not gets its template rows exact already. Checked at
        every forward, as the norms are, and hooked again only on a change."""
        seen = tuple(
            (linear, _quantizes_input(linear))
            for linear in (
                _submodule(self.layer, path) for path, _ in self._exact_row_sites
            )
        )
        if seen == self._linears_seen:
            return
        self._remove_linear_hooks()
        for (linear, quantizes), (_, norm_name) in zip(
            seen, self._exact_row_sites, strict=True
        ):
            if quantizes:
                # prepend: ahead of output hooks such as QuIP's online output
                # rotation, which then treats the exact rows like every other row
                hook = self._exact_template_rows(norm_name)
                handle = linear.register_forward_hook(hook, prepend=True)
                self._linear_handles.append(handle)
        self._linears_seen = seen

    def _exact_template_rows(self, norm_name: str):
        def after_linear(module, args, output):
            state = self.current
            if self.collecting or state is None or not state.has_carriers:
                return None
            # it quantizes its input: _hook_linears checked at this forward's start
            outputs = _plain_attribute(module, "template_outputs")
            if outputs is not None:
                pass  # computed once from the templates (int8 CPU execution)
            elif frozen_weights(module):
                outputs = self._frozen_template_outputs(norm_name, module, args[0])
            else:
                outputs = template_row_outputs(module, args[0], state.kind_rows)
            return insert_templates(output, state.rows(), state.kinds, outputs)

        return after_linear

    def _frozen_template_outputs(
        self, norm_name: str, linear: nn.Module, inputs: torch.Tensor
    ) -> torch.Tensor:
        """(kinds, out) exact outputs of a linear whose weights are final, computed
        once from the templates (through its input rotation) instead of at every
        forward: each computation fake-quantizes the whole weight again, which
        doubled a fake-quantized model's forward at 8B widths. The linear's forward
        pre-hooks run on the template rows then, as its forward would run them.
        Recomputed when the weight, its quantization parameters or the norm's
        template rows change."""
        norm = self.layer.get_submodule(norm_name)
        values = self._scaled_norm_template(norm_name, norm, inputs)
        key = (
            _stored_version(linear, "weight"),
            _stored_version(linear, "weight_scale"),
            _stored_version(linear, "weight_zero_point"),
        )
        cached = self._frozen_outputs.get(id(linear))
        if cached is not None and cached[0] == key and cached[1] is values:
            return cached[2]
        rows = through_pre_hooks(linear, values)
        outputs = linear_with_unquantized_input(linear, rows)
        self._frozen_outputs[id(linear)] = (key, values, outputs)
        return outputs

    def _hook_down_proj(self) -> None:
        """Hooks on the MLP's output projection itself, so any MLP layout works:
        the input hook zeroes the spike rows before it (no quantized linear sees a
        spike), the output hook writes the output template into them."""
        down_proj = self._down_proj
        before = down_proj.register_forward_pre_hook(self._before_down_proj)
        after = down_proj.register_forward_hook(self._after_down_proj)
        self._down_handles = [before, after]
        self._down_hook_ids = (before.id, after.id)
        self._down_settled_for = None

    def _order_down_proj_hooks(self) -> None:
        """Ours first among the input hooks and last among the output hooks, so they
        act on the module's own input and output as a wrapper would: QuIP's online
        rotation, registered later (and prepended), acts inside. Re-done per
        forward, since stages add hooks after this runtime."""
        before, after = self._down_hook_ids
        pre_hooks = self._down_proj._forward_pre_hooks
        hooks = self._down_proj._forward_hooks
        if next(iter(pre_hooks), None) != before:
            pre_hooks.move_to_end(before, last=False)
        if next(reversed(hooks), None) != after:
            hooks.move_to_end(after)

    def _before_down_proj(self, module, args):
        self._down_rows, self._down_collected = None, None
        state, hidden = self.current, args[0]
        if state is None or hidden.is_meta:
            return None
        if state.down_limit is not None and not _exceeds_on_host(
            hidden, state.down_limit
        ):
            return None  # no spike row (a decode step on the host, mostly)
        if self.collecting:
            token_max = detect_token_max(hidden)
            detected = spike_token_mask(token_max, self.runtime.ratio, state.valid)
            rows = detected | state.carriers
            self.runtime.note_spikes(rows)
            self._down_collected = (token_max, detected, rows)
            return None
        templates = self.resident_templates(hidden.device)
        if templates.down_template is None:
            return None
        if self._down_rows_stay_apart:
            # nothing else sees the spike rows: they are found after the product,
            # with the output write (one pass on a decode step), and not zeroed
            self._down_rows = _DETECT_AFTER
            return None
        # the input is the MLP's fresh activation product in every known layout,
        # so its spike rows are zeroed in place
        self._down_rows = self.runtime.spike_rows(
            hidden,
            state.mask,
            templates.down_threshold,
            also=state.rows() if state.has_carriers else None,
            kinds=state.kinds,
            zero=True,
        )
        return (hidden, *args[1:])

    def _after_down_proj(self, module, args, output):
        state = self.current
        if state is None:
            return None
        if self._down_collected is not None:
            token_max, detected, rows = self._down_collected
            self._down_collected = None
            self._record_down(token_max, detected, rows, state, output)
            return None
        rows, self._down_rows = self._down_rows, None
        if rows is None:
            return None
        if rows is _DETECT_AFTER:
            hidden = args[0]
            threshold = self.resident_templates(hidden.device).down_threshold
            short = row_detector(hidden) is not None and output.is_contiguous()
            write = (output, state.kinds, self._down_values(output)) if short else None
            rows = self.runtime.spike_rows(
                hidden,
                state.mask,
                threshold,
                also=state.rows() if state.has_carriers else None,
                write=write,
            )
            if short:
                return output
        if self.runtime.found_none(rows):
            return None  # on the host the check is free, the insertion's calls not
        values = self._down_values(output)
        return insert_templates(output, rows, state.kinds, values, kind=state.kind)

    def _down_values(self, output: torch.Tensor) -> torch.Tensor:
        """The ``down_proj`` output template in ``output``'s dtype and device, cast
        once (not a cast kernel at every insertion)."""
        key = (output.dtype, output.device)
        cached = self._down_values_cast
        if cached is not None and cached[0] == key:
            return cached[1]
        template = self.resident_templates(output.device).down_template
        values = template.to(device=output.device, dtype=output.dtype)
        self._down_values_cast = (key, values)
        return values

    # -- calibration statistics -------------------------------------------------
    def _record_residual(self, token_max, carriers, valid) -> None:
        stats = self.statistics
        stats.residual_gap.update(token_max, valid & ~carriers, carriers)
        stats.sequences += valid.shape[0]
        stats.sequences_with_carriers += int(carriers.any(dim=-1).sum())

    def _record_down(self, token_max, detected, rows, state, output) -> None:
        stats = self.statistics
        stats.down_gap.update(token_max, state.valid & ~rows, detected)
        stats.sequences_with_down_spikes += int(detected.any(dim=-1).sum())
        if rows.any():
            stats.add_rows(
                stats.down_sums, stats.down_counts, output[rows], state.kinds[rows]
            )


def _fuses_detection(state: _Forward, norm_input, output: torch.Tensor) -> bool:
    """Whether the pending detection can run in this norm's insertion pass: the
    norm reads the layer input itself, and its output can be written in place."""
    return (
        norm_input is state.pending[0]
        and output.is_contiguous()
        and output.shape == norm_input.shape
        and not (output.requires_grad and torch.is_grad_enabled())
    )


def _one_row_per_kind(carriers: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(kinds,) flat index of a carrier row of each kind (0 where a kind has none:
    its output is then never selected)."""
    kind_ids = torch.arange(len(KINDS), device=kinds.device)
    matches = carriers.unsqueeze(-1) & (kinds.unsqueeze(-1) == kind_ids)
    return matches.flatten(0, -2).int().argmax(dim=0)


def template_row_outputs(
    module: nn.Module, inputs: torch.Tensor, kind_rows: torch.Tensor
) -> torch.Tensor:
    """(kinds, out) exact output of ``module`` for each kind's template row.

    A converted linear that precomputed them (``template_outputs``, from constants
    known before inference) returns those; otherwise one input row per kind is
    computed with its input quantization skipped.
    """
    precomputed = _plain_attribute(module, "template_outputs")
    if precomputed is not None:
        return precomputed
    rows = inputs.flatten(0, -2).index_select(0, kind_rows)
    return linear_with_unquantized_input(module, rows)


def _cache_layer_index(layer: nn.Module) -> int:
    """The index the KV cache knows ``layer`` by."""
    return getattr(getattr(layer, "self_attn", None), "layer_idx", 0)


def _past_length(past_key_values, layer_index: int) -> int | torch.Tensor:
    """Tokens already in the KV cache at layer ``layer_index`` (0 without a
    cache); a static cache keeps its length on the device, which is then returned
    unread."""
    if past_key_values is None or not hasattr(past_key_values, "get_seq_length"):
        return 0
    length = past_key_values.get_seq_length(layer_index)
    if isinstance(length, torch.Tensor) and not _indexed(length):
        return length.reshape(())
    return int(length)


def _token_kinds(
    valid: torch.Tensor, past: int | torch.Tensor, padded: bool = True
) -> torch.Tensor:
    """FIRST_TOKEN for each sequence's first valid token of a fresh sequence,
    MID_SEQUENCE for every other token (decode steps included). ``padded=False``
    says every token is valid (the first is then the first position)."""
    if isinstance(past, int) and past > 0:
        return torch.full(
            valid.shape, MID_SEQUENCE, dtype=torch.long, device=valid.device
        )
    if padded:
        # the first valid token is the one with no valid token before it
        first = valid & (valid.cumsum(dim=-1) == 1)
    else:
        first = torch.zeros_like(valid)
        first[..., :1].fill_(True)
    if isinstance(past, torch.Tensor):  # decided on the device
        first = first & (past == 0)
    return torch.where(first, FIRST_TOKEN, MID_SEQUENCE)


class SpikeFreeRuntime:
    """Installs the spike-free forward into every decoder layer of ``model``.

    :param model: a causal LM whose architecture :mod:`iq_transform.models.arch` knows
    :param arch: its :class:`ArchSpec`
    :param ratio: spike-token ratio to the median token max
    :param exact_template_rows: the linears fed by a templated norm compute the
        template rows from their unquantized input
    :param follow_carriers: at inference, a layer's carriers are, as in
        calibration, the ratio test's and the previous layer's carriers that keep
        ``CARRIER_DROP`` of their max; the absolute threshold then decides only
        sequences too short for a median (decode steps). Within a model forward
        only (llm-compressor's layer-major passes keep the threshold), and the chain
        restarts after a layer without carriers
    :param fuse_norms: the norms that feed templated linears compute their
        template rows in their own pass, one kernel
        (:func:`~iq_transform.spikefree.norm_rows.fused_norm_templates`), where the
        model's norm takes eight launches and the insertion one more. ``None``:
        where Triton runs it (CUDA); ``True``: everywhere, through its torch
        reference elsewhere (the same arithmetic as transformers' norms: how CPU
        tests check the fused path); ``False``: the norms run themselves and the
        templates are written after them. Transformers' Llama- and Gemma-style
        RMSNorms only; other norms always run themselves

    Set ``enabled = False`` to run the model's own forward with the runtime in
    place (templates and their copies on the device kept), ``True`` to resume.
    """

    def __init__(
        self,
        model: nn.Module,
        arch: ArchSpec,
        ratio: float = 64.0,
        exact_template_rows: bool = True,
        follow_carriers: bool = False,
        fuse_norms: bool | None = None,
    ):
        if hasattr(model, _RUNTIME_ATTRIBUTE):
            raise RuntimeError(
                "A SpikeFree runtime is already installed in this model; call "
                "get_runtime(model).remove() first."
            )
        self.model, self.arch, self.ratio = model, arch, ratio
        self.exact_template_rows = exact_template_rows
        self._follow_carriers = follow_carriers
        self._sequence = object()
        self._last_cache: weakref.ref | None = None
        self.fuse_norms = fuse_norms
        # False: every hook returns at once, templates and their device copies kept
        # (the model's own forward, e.g. to time or compare against)
        self.enabled = True
        self.attention_mask: torch.Tensor | None = None
        self._seen: torch.Tensor | None = None
        # the handled rows of forwards not counted into ``_seen`` yet
        self._unsummed: list[torch.Tensor] = []
        # (batch, tokens) tokens handled in the last model forward, for inspection
        self.last_spike_tokens: torch.Tensor | None = None
        self._forward_rows: torch.Tensor | None = None
        self._no_rows: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None
        # (key, tokens) shared by the layers of the model forward in flight
        self._in_forward = False
        self._tokens: tuple[tuple, _Tokens] | None = None
        # (sequence, key, tokens) of the last decode step without a padding mask:
        # the next step of its sequence has the same (nothing writes them)
        self._decode_tokens: tuple | None = None
        self.layers = [
            LayerRuntime(self, index, layer)
            for index, layer in enumerate(arch.decoder_layers(model))
        ]
        self._handles = [
            model.register_forward_pre_hook(self._before_model, with_kwargs=True),
            model.register_forward_hook(self._after_model),
        ]
        setattr(model, _RUNTIME_ATTRIBUTE, self)
        for callback in _INSTALL_CALLBACKS:
            callback(self)

    @property
    def follow_carriers(self) -> bool:
        return self._follow_carriers

    @follow_carriers.setter
    def follow_carriers(self, follow: bool) -> None:
        self._follow_carriers = follow
        for layer in self.layers:
            layer._sync_hooks()  # the layers without templates end a chain

    def fuses_norms_on(self, hidden: torch.Tensor) -> bool:
        """Whether the norms fed ``hidden`` compute their template rows fused."""
        if self.fuse_norms is None:
            return triton_runs_on(hidden)
        return self.fuse_norms

    # -- model-level bookkeeping ----------------------------------------------
    def _before_model(self, module, args, kwargs):
        self.begin_forward(kwargs.get("attention_mask"), kwargs.get("past_key_values"))

    def _after_model(self, module, args, output):
        self.end_forward()

    def begin_forward(self, attention_mask, past_key_values=None) -> None:
        """Start a model forward: its padding mask, and with its KV cache, whether
        it continues the previous forward's sequence (:attr:`sequence`)."""
        # fx tracing passes proxies here: keep only real 2-D padding masks.
        mask = attention_mask
        is_mask = type(mask) is torch.Tensor and mask.dim() == 2 and not mask.is_meta
        self.attention_mask = mask if is_mask else None
        self._forward_rows = None
        self._previous = None
        self._in_forward, self._tokens = True, None
        last = None if self._last_cache is None else self._last_cache()
        continues = last is not None and past_key_values is last
        if continues:
            # a static cache keeps its length on the device: not read here
            past = _past_length(past_key_values, 0)
            continues = not isinstance(past, int) or past > 0
        if not continues:
            self._sequence = object()
        try:
            self._last_cache = weakref.ref(past_key_values)
        except TypeError:  # None, or a cache without weak references
            self._last_cache = None

    @property
    def sequence(self) -> object | None:
        """The sequence the forward in flight belongs to (``None`` outside a
        model forward): a forward that carries the cache the previous forward
        filled continues its sequence, any other starts one. The layers check
        their norms, linears and ``down_proj`` hooks once per sequence, not at
        every decode step: what they check (a norm swapped or wrapped, a
        scheme attached or switched, another stage's hooks) changes between
        sequences (calibration forwards carry no cache), and changing
        ``fuse_norms`` starts a new one."""
        return self._sequence if self._in_forward else None

    @property
    def fuse_norms(self) -> bool | None:
        return self._fuse_norms

    @fuse_norms.setter
    def fuse_norms(self, fuse: bool | None) -> None:
        self._fuse_norms = fuse
        self._sequence = object()

    def end_forward(self) -> None:
        if self._forward_rows is not None:
            # counted when someone asks (or every few hundred forwards): a sum and an
            # add per forward are two launches a decode step pays for nothing
            self._unsummed.append(self._forward_rows)
            if len(self._unsummed) >= _UNSUMMED_FORWARDS:
                self._sum_seen()
        self.last_spike_tokens = self._forward_rows
        self.attention_mask, self._forward_rows = None, None
        self._in_forward, self._tokens = False, None

    def _sum_seen(self) -> None:
        for rows in self._unsummed:
            counted = rows.sum()
            if self._seen is not None:
                counted = counted + self._seen.to(counted.device)
            self._seen = counted
        self._unsummed.clear()

    @property
    def spike_tokens_seen(self) -> int:
        """Spike tokens handled since installation (reading it synchronizes)."""
        self._sum_seen()
        return 0 if self._seen is None else int(self._seen)

    @torch.no_grad()
    def calibration_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> None:
        """One forward through the decoder only: templates need no logits, and the
        ``lm_head`` is a large share of a small model's compute. For a vision
        transformer (``arch.inputs``), ``input_ids`` holds ``pixel_values``."""
        decoder = self.model.get_submodule(self.arch.decoder)
        self.begin_forward(attention_mask)
        try:
            if self.arch.inputs == "pixel_values":  # no mask, no cache
                decoder(pixel_values=input_ids)
            else:
                decoder(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                )
        finally:
            self.end_forward()

    def spike_rows(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        threshold: torch.Tensor,
        also: torch.Tensor | None = None,
        kinds: torch.Tensor | None = None,
        zero: bool = False,
        write: tuple | None = None,
        follow: bool = False,
    ) -> torch.Tensor:
        """The spike rows of ``hidden`` at one site of the forward in flight (ratio
        to the median and ``threshold``, or-ed with ``also``), noted as handled;
        with ``zero``, those rows of ``hidden`` (a fresh tensor) are set to zero;
        with ``write``, ``(output, kinds, values)``, ``values[kinds]`` is written
        into those rows of ``output`` (only where :func:`row_detector` runs).

        On a GPU this is one or two launches
        (:mod:`iq_transform.spikefree.row_decisions`): the per-token max and the
        decision, or for a decode step both in one pass over the activations;
        elsewhere the torch ops of
        :func:`~iq_transform.spikefree.detect.spike_token_mask`.

        :param hidden: (batch, tokens, features) activations at the site
        :param mask: bool (batch, tokens) real tokens, or ``None`` (all are)
        :param threshold: float32 scalar on ``hidden``'s device
        :param also: bool (batch, tokens) rows that are spike rows regardless
        :param kinds: the rows' kinds (spares the zeroing kernel a fill)
        :param zero: set the spike rows of ``hidden`` to zero, in place
        :param follow: a layer input: with ``follow_carriers``, in a model forward
            of sequences long enough for a median, the previous layer's carriers
            that keep their share stand in for the threshold, and these rows are
            remembered for the next layer
        """
        follow = (
            follow
            and self.follow_carriers
            and self._in_forward
            and hidden.shape[-2] >= MIN_TOKENS_FOR_MEDIAN
        )
        if (detect := row_detector(hidden)) is not None:
            record = self._record(hidden)
            return detect(hidden, threshold, mask, also, record, zero, write)
        if write is not None:
            raise ValueError("write= needs the short-sequence detection kernel")
        if (
            also is None
            and _short_on_host(hidden, _indexed(hidden))
            and not _exceeds_on_host(hidden, threshold)
        ):
            # a short sequence on the host (a decode step) without one activation
            # over the threshold has no spike row, found by one reduction that the
            # host reads for free, where the per-row decision takes six ops
            return self.no_rows(hidden)
        token_max = detect_token_max(hidden, float32=False)
        previous = self._previous_for(token_max) if follow else None
        if (decide := row_decider(token_max)) is not None:
            record = self._record(hidden)
            rows = decide(
                token_max,
                self.ratio,
                mask,
                threshold,
                also,
                record,
                threshold_without_median_only=follow,
                previous=None if previous is None else (*previous, CARRIER_DROP),
            )
        else:
            rows = spike_token_mask(
                token_max.float(),
                self.ratio,
                mask,
                threshold,
                threshold_without_median_only=follow,
                carried=None if previous is None else self.still_carried(token_max),
            )
            rows = rows if also is None else rows | also
            self.note_spikes(rows)
        if follow:
            self.remember_carriers(token_max, rows)
        if zero:
            zero_rows(hidden, rows, kinds)
        return rows

    def no_rows(self, hidden: torch.Tensor) -> torch.Tensor:
        """All-False rows for ``hidden``, one tensor per shape that nobody writes
        (:meth:`found_none` knows it without reading it), noted as this forward's
        handled rows if none were yet."""
        shape = hidden.shape[:-1]
        none = self._no_rows
        if none is None or none.shape != shape or none.device != hidden.device:
            none = self._no_rows = torch.zeros(
                shape, dtype=torch.bool, device=hidden.device
            )
        if self._forward_rows is None or self._forward_rows.shape != shape:
            self._forward_rows = none.clone()
        return none

    def found_none(self, rows: torch.Tensor) -> bool:
        """Whether ``rows`` is known to hold no row: :meth:`no_rows`, or a host
        tensor with none set."""
        return rows is self._no_rows or (_indexed(rows) and not bool(rows.any()))

    def _record(self, hidden: torch.Tensor) -> torch.Tensor:
        """The forward's handled rows, for a kernel to or into (zeros at first)."""
        shape = hidden.shape[:-1]
        if self._forward_rows is None or self._forward_rows.shape != shape:
            self._forward_rows = torch.zeros(
                shape, dtype=torch.bool, device=hidden.device
            )
        return self._forward_rows

    def note_spikes(self, rows: torch.Tensor) -> None:
        """Remember which tokens were handled in this model forward (counted once)."""
        if self._forward_rows is None or self._forward_rows.shape != rows.shape:
            self._forward_rows = rows.clone()
        else:
            self._forward_rows |= rows

    def tokens(
        self, batch: int, tokens: int, device, past_key_values, layer_index: int
    ) -> _Tokens:
        """Token mask and kinds of the current call, computed once per model
        forward (every decoder layer sees the same tokens, and the same cache:
        empty or not, which is all the kinds read of it), per call outside one
        (llm-compressor's layer-major pipeline).

        :param past_key_values: the layer's KV cache argument, or ``None``
        :param layer_index: the index the cache knows the layer by
        """
        key = (batch, tokens, device, id(past_key_values))
        if self._in_forward and self._tokens is not None and self._tokens[0] == key:
            return self._tokens[1]
        steady = self._decode_tokens
        if (
            self._in_forward
            and steady is not None
            and steady[0] is self._sequence
            and steady[1] == key
            and self.attention_mask is None
        ):
            # the previous decode step's: every token mid-sequence and real
            self._tokens = steady[1:]
            return steady[2]
        past = _past_length(past_key_values, layer_index)
        mask = self.attention_mask
        padded = mask is not None and mask.shape[0] == batch and mask.shape[1] >= tokens
        valid = self.valid_tokens(batch, tokens, device)
        shared = _Tokens(
            valid=valid,
            mask=valid if padded else None,
            kinds=_token_kinds(valid, past, padded),
            kind=MID_SEQUENCE if isinstance(past, int) and past > 0 else None,
            no_carriers=torch.zeros_like(valid),
        )
        if self._in_forward:
            self._tokens = (key, shared)
            if shared.kind is not None and not padded:
                self._decode_tokens = (self._sequence, key, shared)
        return shared

    def valid_tokens(self, batch: int, tokens: int, device) -> torch.Tensor:
        """(batch, tokens) real-token mask of the current call (all True without a
        padding mask, e.g. in llm-compressor's sequential calibration)."""
        mask = self.attention_mask
        if mask is not None and mask.shape[0] == batch and mask.shape[1] >= tokens:
            return mask[:, -tokens:].to(device=device, dtype=torch.bool)
        return torch.ones(batch, tokens, dtype=torch.bool, device=device)

    # -- calibration ------------------------------------------------------------
    def start_collecting(self) -> None:
        hidden_size = self.model.config.get_text_config().hidden_size
        for layer in self.layers:
            layer.start_collecting(hidden_size)

    def finish_collecting(
        self, min_fraction: float = 0.25, down_proj_layers: list[int] | None = None
    ) -> None:
        """Turn every layer's statistics into templates.

        A layer *carries* spikes when at least ``min_fraction`` of the calibration
        sequences had carriers in its input. Its carriers' MLP input is a constant
        norm template, so their MLP output is constant too: every carrier layer's
        ``down_proj`` gets an output template (this is where spikes are removed).
        So does the layer just before a run of carrier layers (where spikes are
        created) and any layer whose ``down_proj`` input shows token spikes that
        often. ``down_proj_layers`` overrides.

        Under ``torch.distributed`` the statistics are first all-reduced over the
        ranks (:func:`~iq_transform.spikefree.distributed.reduce_statistics`), so
        every rank decides and finalizes on all ranks' calibration tokens alike.
        """
        stats = [layer.statistics for layer in self.layers]
        reduce_statistics(stats)
        carries = [s.carrier_fraction() >= min_fraction for s in stats]
        if down_proj_layers is not None:
            down = [index in down_proj_layers for index in range(len(stats))]
        else:
            down = [
                layer_carries or s.down_spike_fraction() >= min_fraction
                for s, layer_carries in zip(stats, carries, strict=True)
            ]
            for index in range(len(stats) - 1):
                if carries[index + 1] and not carries[index]:  # a run starts
                    down[index] = True
        for layer, layer_carries, layer_down in zip(
            self.layers, carries, down, strict=True
        ):
            layer.finish_collecting(layer_carries, layer_down)
        self._previous = None

    def still_carried(self, token_max: torch.Tensor) -> torch.Tensor:
        """During calibration, and at inference with ``follow_carriers`` (layers
        in order within one forward): the previous
        layer's carriers whose max |x| keeps at least ``CARRIER_DROP`` of the
        previous layer's, i.e. spikes not yet removed. The ratio test alone loses
        them in late layers, where ordinary tokens grow."""
        previous = self._previous_for(token_max)
        if previous is None:
            return torch.zeros_like(token_max, dtype=torch.bool)
        previous_max, previous_carriers = previous
        return previous_carriers & (
            token_max.float() >= CARRIER_DROP * previous_max.float()
        )

    def _previous_for(self, token_max: torch.Tensor) -> tuple | None:
        """The previous layer's ``(token_max, carriers)`` where they describe the
        same tokens as ``token_max``, else ``None``."""
        previous = self._previous
        if previous is None or previous[0].shape != token_max.shape:
            return None
        return previous

    def remember_carriers(self, token_max: torch.Tensor, carriers: torch.Tensor):
        self._previous = (token_max, carriers)

    def forget_carriers(self) -> None:
        """The next layer's carriers start afresh (this layer remembered none)."""
        self._previous = None

    @property
    def templates(self) -> SpikeTemplates:
        return SpikeTemplates(
            {
                layer.index: layer.templates
                for layer in self.layers
                if layer.templates is not None
            }
        )

    def load_templates(self, templates: SpikeTemplates) -> None:
        """Install precomputed templates (e.g. from a checkpoint)."""
        for layer in self.layers:
            layer.statistics = None
            layer.templates = templates.layers.get(layer.index)

    def _registered_handles(self) -> list[torch.utils.hooks.RemovableHandle]:
        handles = [*self._handles]
        for layer in self.layers:
            handles += layer.handles()
        return handles

    def hook_ids(self) -> set[int]:
        """The ids of the hooks this runtime has registered on the model's modules
        (its input hooks act first on their module's input: it orders them so)."""
        return {handle.id for handle in self._registered_handles()}

    @contextmanager
    def detached(self) -> Iterator[None]:
        """The model without this runtime for the duration: every hook it registered
        taken out of its module and every fused norm given its own forward back, so
        the model runs exactly as if the runtime were not installed (``enabled =
        False`` still pays the calls of hooks that return at once); all back in
        place, in their order, after. Templates and device copies are kept."""
        for layer in self.layers:
            layer._unfuse_norms()
        handles = self._registered_handles()
        # every dict the handles live in (hooks, with_kwargs, always_called), as is
        dicts = {}
        for handle in handles:
            for ref in (handle.hooks_dict_ref, *handle.extra_dict_ref):
                hooks = ref()
                if hooks is not None:
                    dicts[id(hooks)] = hooks
        saved = [(hooks, list(hooks.items())) for hooks in dicts.values()]
        ours = {handle.id for handle in handles}
        for hooks in dicts.values():
            for key in ours & hooks.keys():
                del hooks[key]
        try:
            yield
        finally:
            for hooks, items in saved:
                before = {key for key, _ in items}
                added = [(k, v) for k, v in hooks.items() if k not in before]
                hooks.clear()
                hooks.update(items)
                hooks.update(added)

    def remove(self) -> None:
        """Restore the model's own forward; templates are dropped with the runtime."""
        for layer in self.layers:
            layer.remove()
        for handle in self._handles:
            handle.remove()
        if getattr(self.model, _RUNTIME_ATTRIBUTE, None) is self:
            delattr(self.model, _RUNTIME_ATTRIBUTE)
        set_excluded_rows(None)
        logger.debug("SpikeFree runtime removed")


def get_runtime(model: nn.Module) -> SpikeFreeRuntime | None:
    """The runtime installed in ``model``, if any."""
    return getattr(model, _RUNTIME_ATTRIBUTE, None)

"""A real FP8 execution path for Llama-style decoder layers.

:func:`convert_to_fp8` replaces every decoder layer of a model with an
:class:`Fp8DecoderLayer` whose linears run ``torch._scaled_mm`` on FP8 e4m3 codes
(per-channel weight scales) produced by one fused op each
(:mod:`iq_transform.kernels.fused_norm`):

- q/k/v and gate/up read the fused norm kernel's codes (q/k/v and gate/up are each
  one product on concatenated weights);
- ``o_proj`` reads a one-pass quantization of the attention output;
- ``down_proj`` reads :func:`~iq_transform.kernels.fused_norm.silu_mul_quant`, the
  GLU product quantized where it is made (that is where ``down_proj`` spikes live).

Modes: ``"static"`` runs static per-tensor activation scales (a spike-free model
from ``oneshot``: its compressed-tensors ``input_scale`` and weight scales) with
the SpikeFree templates applied inside the kernels: carriers found on the device by
the calibrated thresholds (or the runtime's full ratio rule, ``detect="ratio"``),
template rows in the norm kernel, exact template rows of q/k/v and gate/up from
precomputed constants, zeroed ``down_proj`` spike rows and the ``down_proj`` output
template. ``"dynamic"`` runs per-token scales from the same fused kernels (the
design vLLM ships); ``"dynamic_eager"`` is per-token quantization in plain PyTorch
ops, as a user writes it, and ``"dynamic_compiled"`` the same through
``torch.compile``. Nothing in a forward waits on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from iq_transform.kernels.fused_norm import (
    FP8_MAX,
    MIN_DYNAMIC_SCALE,
    QuantizedRows,
    fused_norm_templates_quant,
    quantize_rows,
    replace_rows,
    silu_mul_quant,
)
from iq_transform.kernels.rotations import online_rotations
from iq_transform.models.arch import ArchSpec, get_arch_spec
from iq_transform.spikefree.detect import spike_token_mask
from iq_transform.spikefree.templates import FIRST_TOKEN, MID_SEQUENCE, LayerTemplates

__all__ = [
    "MODES",
    "QuantizedWeight",
    "Fp8DecoderLayer",
    "convert_to_fp8",
    "scaled_mm",
    "to_fp8",
]

MODES = ("static", "dynamic", "dynamic_eager", "dynamic_compiled")


@dataclass
class QuantizedWeight:
    """FP8 e4m3 weight codes (N, K) and their per-output-channel scales (1, N)."""

    codes: torch.Tensor
    scales: torch.Tensor

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, scales: torch.Tensor | None = None
    ) -> QuantizedWeight:
        """Quantize ``weight`` (N, K) per channel, with ``scales`` (N,) / (N, 1)
        as calibrated (compressed-tensors' ``weight_scale``) or absmax ones."""
        weight = weight.detach().float()
        if scales is None:
            scales = (weight.abs().amax(-1) / FP8_MAX).clamp_min(MIN_DYNAMIC_SCALE)
        scales = scales.detach().float().reshape(-1, 1)
        codes = (weight / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(codes.contiguous(), scales.reshape(1, -1).contiguous())

    def dequantized(self) -> torch.Tensor:
        return self.codes.float() * self.scales.reshape(-1, 1)

    @classmethod
    def concatenated(cls, weights: list[QuantizedWeight]) -> QuantizedWeight:
        return cls(
            torch.cat([w.codes for w in weights]).contiguous(),
            torch.cat([w.scales for w in weights], dim=1).contiguous(),
        )

    def to(self, device) -> QuantizedWeight:
        return QuantizedWeight(self.codes.to(device), self.scales.to(device))


def scaled_mm(
    rows: QuantizedRows, weight: QuantizedWeight, out_dtype: torch.dtype
) -> torch.Tensor:
    """``dequant(rows) @ dequant(weight).T`` in ``out_dtype``: ``torch._scaled_mm``
    on CUDA (row-wise scales), the same arithmetic in float32 elsewhere."""
    if rows.codes.device.type == "cuda":
        if out_dtype == torch.bfloat16:
            return torch._scaled_mm(
                rows.codes,
                weight.codes.t(),
                scale_a=rows.row_scales,
                scale_b=weight.scales,
                out_dtype=out_dtype,
            )
        # row-wise scaled products return bf16 only: a float32 model gets the
        # float32 product of the codes, scaled after
        one = torch.ones((), device=rows.codes.device)
        product = torch._scaled_mm(
            rows.codes, weight.codes.t(), scale_a=one, scale_b=one,
            out_dtype=torch.float32,
        )  # fmt: skip
        return (product * rows.row_scales * weight.scales).to(out_dtype)
    product = (rows.codes.float() * rows.row_scales) @ weight.dequantized().t()
    return product.to(out_dtype)


# -- per-token quantization in plain PyTorch (what a user writes) ----------------
def _quantize_eager(y: torch.Tensor) -> QuantizedRows:
    scales = (y.abs().amax(-1, keepdim=True) / FP8_MAX).clamp_min(MIN_DYNAMIC_SCALE)
    codes = (y / scales).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return QuantizedRows(codes, scales, None)


def _norm_quantize_eager(x, weight, eps, weight_offset):
    x = x.float()
    y = (
        x
        * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        * (weight + weight_offset)
    )
    return _quantize_eager(y)


def _silu_mul_quantize_eager(gate_up):
    gate, up = gate_up.float().chunk(2, dim=-1)
    return _quantize_eager(nn.functional.silu(gate) * up)


def _quantize_input_eager(x):
    return _quantize_eager(x.float())


_COMPILED: dict[str, object] = {}
# the spike kinds of the forward in flight, computed by its first layer
_KINDS_OF_FORWARD: dict[str, tuple] = {}


def _compiled(name: str, function):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(function, dynamic=True)
    return _COMPILED[name]


def _scalar(value, device) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())


def _input_scale(modules: list[nn.Module]) -> torch.Tensor | None:
    """One static scale for linears that share an input: compressed-tensors
    calibrates each (on the same tensor); the largest never clips any of them."""
    scales = [getattr(m, "input_scale", None) for m in modules]
    if any(s is None for s in scales):
        return None
    return torch.stack([s.detach().float().reshape(()) for s in scales]).amax()


def _weight(module: nn.Linear) -> QuantizedWeight:
    if module.bias is not None:
        raise ValueError(
            f"{module} has a bias; the FP8 execution path covers bias-free Llama "
            "linears only"
        )
    return QuantizedWeight.from_weight(
        module.weight, getattr(module, "weight_scale", None)
    )


class Fp8DecoderLayer(nn.Module):
    """A Llama-style decoder layer executed in FP8 (see the module docstring).

    :param layer: the decoder layer to convert (bf16/fp32 weights, optionally
        fake-quantized by compressed-tensors with static ``input_scale`` s)
    :param arch: its :class:`~iq_transform.models.arch.ArchSpec`
    :param mode: one of :data:`MODES`
    :param templates: the layer's SpikeFree templates (``"static"`` only)
    :param detect: ``"threshold"`` finds carriers inside the kernels by the
        calibrated absolute thresholds (one pass); ``"ratio"`` adds the runtime's
        ratio-to-median test, an extra eager pass over the layer input
    :param ratio: the runtime's spike ratio (``detect="ratio"``)
    """

    def __init__(
        self,
        layer: nn.Module,
        arch: ArchSpec,
        mode: str = "static",
        templates: LayerTemplates | None = None,
        detect: str = "threshold",
        ratio: float = 64.0,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if detect not in ("threshold", "ratio"):
            raise ValueError(f"detect must be 'threshold' or 'ratio', got {detect!r}")
        if arch.norm_weight_offset or list(arch.norm_linears) != [
            "input_layernorm",
            "post_attention_layernorm",
        ]:
            raise ValueError(
                f"the FP8 execution path runs Llama-style layers, not {arch.name}"
            )
        if rotations := online_rotations(layer):
            raise ValueError(
                f"the FP8 execution path cannot run online rotations ({rotations[0]}"
                f"{' ...' if len(rotations) > 1 else ''}, QuIP's): its norm kernel "
                "quantizes the norm's output as it is. Quantize without QuIP (e.g. "
                "stages=gptq), or run the model in int8 on the CPU "
                "(execute=int8_cpu with a W8A8 static recipe), which rotates inside "
                "its kernels"
            )
        attn, mlp = layer.self_attn, layer.mlp
        self.mode, self.detect, self.ratio = mode, detect, ratio
        self.self_attn = attn  # config, head_dim, scaling, layer_idx for attention
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        gate_up = [mlp.gate_proj, mlp.up_proj]
        self.splits = [m.out_features for m in qkv]
        device = attn.q_proj.weight.device
        self.qkv = QuantizedWeight.concatenated([_weight(m) for m in qkv])
        self.o = _weight(attn.o_proj)
        self.gate_up = QuantizedWeight.concatenated([_weight(m) for m in gate_up])
        self.down = _weight(mlp.down_proj)
        self.scales: dict[str, torch.Tensor] = {}
        if mode == "static":
            for name, modules in (
                ("qkv", qkv),
                ("o", [attn.o_proj]),
                ("gate_up", gate_up),
                ("down", [mlp.down_proj]),
            ):
                scale = _input_scale(modules)
                if scale is None:
                    raise ValueError(
                        f"mode='static' needs static input scales: {name} has no "
                        "input_scale (quantize with a static recipe, e.g. "
                        "recipes/fp8_static_spikefree.yaml, or use mode='dynamic')"
                    )
                self.scales[name] = scale.to(device)
        self._set_templates(templates if mode == "static" else None, device)

    # -- SpikeFree constants ------------------------------------------------------
    def _set_templates(self, templates: LayerTemplates | None, device) -> None:
        self.norm_templates: dict[str, torch.Tensor] = {}
        self.exact_qkv = self.exact_gate_up = self.down_template = None
        self.residual_threshold = self.down_threshold = None
        if templates is None or not templates.carries_spikes:
            return
        norms = {"input_layernorm": self.input_norm}
        norms["post_attention_layernorm"] = self.post_norm
        for name, template in templates.norm_templates.items():
            self.norm_templates[name] = template.float().to(device).contiguous()
        weights = {
            "input_layernorm": self.qkv.dequantized(),
            "post_attention_layernorm": self.gate_up.dequantized(),
        }
        exact = {}
        for name, template in self.norm_templates.items():
            norm_output = template * norms[name].weight.float()
            exact[name] = (norm_output @ weights[name].t()).contiguous()
        self.residual_threshold = _scalar(templates.residual_threshold, device)
        if templates.down_template is not None:
            self.down_template = templates.down_template.float().to(device).contiguous()
            self.down_threshold = _scalar(templates.down_threshold, device)
        self.exact_qkv = exact.get("input_layernorm")
        if self.down_template is None:  # carriers' GLU rows are zeroed otherwise
            exact_gate_up = exact.get("post_attention_layernorm")
            if exact_gate_up is not None:  # read in the activations' dtype
                exact_gate_up = exact_gate_up.to(self.post_norm.weight.dtype)
            self.exact_gate_up = exact_gate_up

    @property
    def templated(self) -> bool:
        return bool(self.norm_templates) or self.down_template is not None

    # -- pieces ---------------------------------------------------------------------
    def _kinds(self, position_ids, batch: int, tokens: int, device) -> torch.Tensor:
        if position_ids is None:
            raise ValueError(
                "Fp8DecoderLayer needs position_ids (the model passes them)"
            )
        cached = _KINDS_OF_FORWARD.get("kinds")
        if (
            cached is not None
            and cached[0] is position_ids
            and cached[1]
            == (
                batch,
                tokens,
            )
        ):
            return cached[2]  # every layer of a forward gets the same position_ids
        positions = position_ids.to(device).expand(batch, tokens)
        first = torch.full_like(positions, FIRST_TOKEN)
        kinds = torch.where(positions == 0, first, MID_SEQUENCE).reshape(-1)
        _KINDS_OF_FORWARD["kinds"] = (position_ids, (batch, tokens), kinds)
        return kinds

    def _ratio_rows(self, values, batch, tokens, threshold) -> torch.Tensor:
        token_max = values.abs().amax(-1).float().reshape(batch, tokens)
        return spike_token_mask(token_max, self.ratio, None, threshold).reshape(-1)

    def _norm(self, x, norm, name, scale, kinds, rows, threshold) -> QuantizedRows:
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        if self.mode == "dynamic_eager":
            return _norm_quantize_eager(x, norm.weight.float(), eps, 0.0)
        if self.mode == "dynamic_compiled":
            function = _compiled("norm", _norm_quantize_eager)
            return function(x, norm.weight.float(), eps, 0.0)
        template = self.norm_templates.get(name)
        if template is None:
            return fused_norm_templates_quant(x, norm.weight, eps, scale)
        return fused_norm_templates_quant(
            x, norm.weight, eps, scale, templates=template, kinds=kinds, rows=rows,
            threshold=threshold,
        )  # fmt: skip

    def _quantize(self, x, scale) -> QuantizedRows:
        if self.mode == "dynamic_eager":
            return _quantize_input_eager(x)
        if self.mode == "dynamic_compiled":
            return _compiled("quant", _quantize_input_eager)(x)
        return quantize_rows(x, scale)

    def _glu(self, gate_up, kinds, carriers, batch, tokens) -> QuantizedRows:
        if self.mode == "dynamic_eager":
            return _silu_mul_quantize_eager(gate_up)
        if self.mode == "dynamic_compiled":
            return _compiled("glu", _silu_mul_quantize_eager)(gate_up)
        scale = self.scales.get("down")
        threshold = self.down_threshold
        rows = carriers
        if threshold is not None and self.detect == "ratio":
            gate, up = gate_up.float().chunk(2, dim=-1)
            hidden = nn.functional.silu(gate) * up
            detected = self._ratio_rows(hidden, batch, tokens, threshold)
            rows = detected if carriers is None else detected | carriers
            threshold = _scalar(math.inf, gate_up.device)
        if rows is None and threshold is None:
            return silu_mul_quant(gate_up, scale)
        return silu_mul_quant(
            gate_up, scale, rows=rows,
            exact_gate_up=self.exact_gate_up if carriers is not None else None,
            kinds=kinds, threshold=threshold,
        )  # fmt: skip

    # -- forward --------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        batch, tokens, hidden_size = hidden_states.shape
        dtype, device = hidden_states.dtype, hidden_states.device
        x = hidden_states.reshape(-1, hidden_size)
        kinds = carriers = None
        threshold = self.residual_threshold
        if self.templated:
            kinds = self._kinds(position_ids, batch, tokens, device)
        if self.norm_templates:
            # carriers: found by the norm kernel itself (threshold), or here
            if self.detect == "ratio":
                carriers = self._ratio_rows(x, batch, tokens, threshold)
                threshold = None
            elif "input_layernorm" not in self.norm_templates:
                carriers = x.abs().amax(-1) > threshold
                threshold = None
        normed = self._norm(
            x, self.input_norm, "input_layernorm", self.scales.get("qkv"), kinds,
            carriers, threshold,
        )  # fmt: skip
        if normed.rows is not None:
            carriers = normed.rows
        qkv = scaled_mm(normed, self.qkv, dtype)
        if self.exact_qkv is not None:
            qkv = replace_rows(qkv, carriers, kinds, self.exact_qkv)
        attn_output = self._attention(
            qkv, batch, tokens, attention_mask, past_key_values, position_embeddings,
            kwargs,
        )  # fmt: skip
        attn_rows = self._quantize(attn_output, self.scales.get("o"))
        residual = x + scaled_mm(attn_rows, self.o, dtype)
        normed = self._norm(
            residual, self.post_norm, "post_attention_layernorm",
            self.scales.get("gate_up"), kinds, carriers, None,
        )  # fmt: skip
        gate_up = scaled_mm(normed, self.gate_up, dtype)
        glu = self._glu(gate_up, kinds, carriers, batch, tokens)
        down = scaled_mm(glu, self.down, dtype)
        if self.down_template is not None:
            down = replace_rows(down, glu.rows, kinds, self.down_template)
        return (residual + down).reshape(batch, tokens, hidden_size)

    def _attention(
        self, qkv, batch, tokens, attention_mask, past_key_values, position_embeddings,
        kwargs,
    ) -> torch.Tensor:  # fmt: skip
        attn = self.self_attn
        query, key, value = qkv.split(self.splits, dim=-1)
        shape = (batch, tokens, -1, attn.head_dim)
        query = query.reshape(shape).transpose(1, 2)
        key = key.reshape(shape).transpose(1, 2)
        value = value.reshape(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, attn.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            attn.config._attn_implementation, eager_attention_forward
        )
        output, _ = interface(
            attn, query, key, value, attention_mask, dropout=0.0,
            scaling=attn.scaling, **kwargs,
        )  # fmt: skip
        return output.reshape(batch * tokens, -1)


def convert_to_fp8(
    model: nn.Module,
    mode: str = "static",
    templates=None,
    **layer_options,
) -> nn.Module:
    """Replace every decoder layer of ``model`` by an :class:`Fp8DecoderLayer`.

    :param model: a Llama-style causal LM (bf16/fp32 weights, or fake-quantized by
        compressed-tensors; any SpikeFree runtime must be removed first)
    :param mode: one of :data:`MODES`
    :param templates: :class:`~iq_transform.spikefree.templates.SpikeTemplates`
        (``"static"``; ``None``: no spike handling)
    :param layer_options: passed to :class:`Fp8DecoderLayer`
    :return: ``model``, converted in place
    """
    from iq_transform.spikefree.runtime import get_runtime

    if get_runtime(model) is not None:
        raise RuntimeError(
            "remove the SpikeFree runtime first (keep runtime.templates and pass "
            "them as templates=): its hooks sit on the layers being replaced"
        )
    arch = get_arch_spec(model)
    layers = arch.decoder_layers(model)
    converted = [
        Fp8DecoderLayer(
            layer,
            arch,
            mode,
            templates.layers.get(index) if templates is not None else None,
            **layer_options,
        )  # fmt: skip
        for index, layer in enumerate(layers)
    ]
    for index, layer in enumerate(converted):
        layers[index] = layer
    return model


def to_fp8(model: nn.Module) -> nn.Module:
    """The ``execute=fp8`` path: a static FP8 model from ``oneshot`` (its SpikeFree
    runtime, if any, is replaced by the templates inside the FP8 layers).

    :param model: a Llama-style model quantized with static FP8 activations
    :return: ``model``, converted in place
    """
    from iq_transform.spikefree.runtime import get_runtime

    runtime = get_runtime(model)
    if runtime is not None and runtime.follow_carriers:
        raise ValueError(
            "The fused FP8 layers find carriers by the calibrated thresholds (or the "
            "ratio test) per layer; follow_carriers is not implemented there. "
            "Quantize with follow_carriers=False (transform.follow_carriers=false)."
        )
    templates = runtime.templates if runtime is not None else None
    arch = get_arch_spec(model)
    # build every layer before touching the model: a refusal leaves it as it was
    converted = [
        Fp8DecoderLayer(
            layer,
            arch,
            "static",
            templates.layers.get(index) if templates is not None else None,
            ratio=runtime.ratio if runtime is not None else 64.0,
        )  # fmt: skip
        for index, layer in enumerate(arch.decoder_layers(model))
    ]
    if runtime is not None:
        runtime.remove()
    layers = arch.decoder_layers(model)
    for index, layer in enumerate(converted):
        layers[index] = layer
    return model

"""What replaces spike tokens: per-layer templates and detection thresholds.

Everything here is a tensor, so it can live in a state dict and a checkpoint:

- **norm templates**: the mean normalized hidden vector ``x / rms(x)`` of spike
  tokens at each norm that feeds quantized linears, stored *before* the norm weight,
  so that SmoothQuant's ``norm.weight /= s`` or a norm fusion is followed for free
  (the output is ``template * current_weight`` at use time);
- **down_proj output templates**: the mean MLP output of spike tokens at the layers
  that create or remove spikes (what the residual stream must receive);
- **thresholds**: absolute max |x| above which a token is a spike token, for
  sequences too short for a median (decode with a KV cache).

Spike kinds are kept apart (one template each): index 0 for the first token of a
sequence, 1 for mid-sequence spike tokens (delimiters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = [
    "KINDS",
    "FIRST_TOKEN",
    "MID_SEQUENCE",
    "LayerTemplates",
    "LayerStatistics",
    "SpikeGap",
    "SpikeTemplates",
]

KINDS = ("first_token", "mid_sequence")
FIRST_TOKEN, MID_SEQUENCE = 0, 1


@dataclass
class LayerTemplates:
    """The tensors one decoder layer needs at run time.

    :param residual_threshold: absolute token max |x| of the layer input above which
        a token is a spike carrier (``inf``: ratio test only)
    :param down_threshold: the same for the ``down_proj`` input
    :param norm_templates: per norm name, (kinds, hidden) pre-weight templates
    :param down_template: (kinds, hidden) ``down_proj`` output template, or ``None``
        when this layer neither carries, creates nor removes spikes
    """

    residual_threshold: torch.Tensor
    down_threshold: torch.Tensor
    norm_templates: dict[str, torch.Tensor] = field(default_factory=dict)
    down_template: torch.Tensor | None = None

    @property
    def carries_spikes(self) -> bool:
        return bool(self.norm_templates) or self.down_template is not None

    @property
    def device(self) -> torch.device:
        return self.residual_threshold.device

    def to(self, device: torch.device | str) -> LayerTemplates:
        """A copy with every tensor on ``device`` (float32 kept: insertion casts)."""
        return LayerTemplates(
            residual_threshold=self.residual_threshold.to(device),
            down_threshold=self.down_threshold.to(device),
            norm_templates={n: t.to(device) for n, t in self.norm_templates.items()},
            down_template=None
            if self.down_template is None
            else self.down_template.to(device),
        )


def _fill_missing_kinds(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Means per kind; a kind never seen takes the mean of the kinds that were."""
    means = sums / counts.clamp_min(1).unsqueeze(-1)
    seen = counts > 0
    if seen.any() and not seen.all():
        fallback = sums[seen].sum(0) / counts[seen].sum()
        means[~seen] = fallback
    return means


@dataclass
class SpikeGap:
    """The gap between ordinary and spike tokens' max |x| at one site; its
    geometric middle is the absolute threshold used when no median exists."""

    max_ordinary: float = 0.0
    min_spike: float = math.inf

    def update(
        self, token_max: torch.Tensor, ordinary: torch.Tensor, spikes: torch.Tensor
    ) -> None:
        """Widen by the tokens selected by the ``ordinary`` and ``spikes`` masks."""
        if ordinary.any():
            self.max_ordinary = max(self.max_ordinary, token_max[ordinary].max().item())
        if spikes.any():
            self.min_spike = min(self.min_spike, token_max[spikes].min().item())

    def threshold(self) -> float:
        """``inf`` when the two overlap (no absolute threshold separates them)."""
        if math.isinf(self.min_spike) or self.min_spike <= self.max_ordinary:
            return math.inf
        return math.sqrt(max(self.max_ordinary, 1e-12) * self.min_spike)


class LayerStatistics:
    """Running sums for one decoder layer during calibration (all float64)."""

    def __init__(self, hidden_size: int, norm_names: tuple[str, ...]):
        zeros = lambda: torch.zeros(len(KINDS), hidden_size, dtype=torch.float64)  # noqa: E731
        self.norm_sums = {name: zeros() for name in norm_names}
        self.norm_counts = {
            name: torch.zeros(len(KINDS), dtype=torch.float64) for name in norm_names
        }
        self.down_sums = zeros()
        self.down_counts = torch.zeros(len(KINDS), dtype=torch.float64)
        self.residual_gap = SpikeGap()
        self.down_gap = SpikeGap()
        self.sequences = 0
        self.sequences_with_carriers = 0
        self.sequences_with_down_spikes = 0

    def add_rows(
        self, sums: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, kinds
    ) -> None:
        """Add ``rows`` (N, hidden) to ``sums`` under their ``kinds`` (N,)."""
        rows = rows.detach().to(torch.float64).cpu()
        kinds = kinds.cpu()
        sums.index_add_(0, kinds, rows)
        counts.index_add_(0, kinds, torch.ones_like(kinds, dtype=torch.float64))

    def carrier_fraction(self) -> float:
        return self.sequences_with_carriers / max(self.sequences, 1)

    def down_spike_fraction(self) -> float:
        return self.sequences_with_down_spikes / max(self.sequences, 1)

    def finalize(self, carries: bool, down_site: bool) -> LayerTemplates:
        """Templates for this layer.

        :param carries: the layer's input carries spikes: norm templates and a
            residual threshold
        :param down_site: the layer's ``down_proj`` creates or removes spikes: an
            output template and a ``down_proj`` input threshold
        """
        templates = LayerTemplates(
            residual_threshold=torch.tensor(
                self.residual_gap.threshold() if carries else math.inf
            ),
            down_threshold=torch.tensor(
                self.down_gap.threshold() if down_site else math.inf
            ),
        )
        if carries:
            templates.norm_templates = {
                name: _fill_missing_kinds(sums, self.norm_counts[name]).float()
                for name, sums in self.norm_sums.items()
                if self.norm_counts[name].sum() > 0
            }
        if down_site and self.down_counts.sum() > 0:
            templates.down_template = _fill_missing_kinds(
                self.down_sums, self.down_counts
            ).float()
        return templates


@dataclass
class SpikeTemplates:
    """All layers' templates, keyed by decoder layer index."""

    layers: dict[int, LayerTemplates] = field(default_factory=dict)

    @property
    def carrier_layers(self) -> list[int]:
        return sorted(i for i, t in self.layers.items() if t.norm_templates)

    @property
    def down_proj_layers(self) -> list[int]:
        return sorted(i for i, t in self.layers.items() if t.down_template is not None)

    @property
    def has_spikes(self) -> bool:
        return any(t.carries_spikes for t in self.layers.values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat tensors, e.g. ``layers.11.down_template`` (checkpoint-ready)."""
        state = {}
        for index, t in self.layers.items():
            prefix = f"layers.{index}."
            state[prefix + "residual_threshold"] = t.residual_threshold
            state[prefix + "down_threshold"] = t.down_threshold
            for name, template in t.norm_templates.items():
                state[prefix + f"norm_templates.{name}"] = template
            if t.down_template is not None:
                state[prefix + "down_template"] = t.down_template
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> SpikeTemplates:
        """The inverse of :meth:`state_dict`.

        :param state: flat tensors as :meth:`state_dict` writes them
        :raises KeyError: a key that is not a template or threshold, or a layer
            without both thresholds
        """
        layers: dict[int, dict] = {}
        for key, tensor in state.items():
            parts = key.split(".", 2)
            if len(parts) < 3 or parts[0] != "layers" or not parts[1].isdigit():
                raise KeyError(f"not a SpikeFree tensor: {key!r}")
            fields = layers.setdefault(int(parts[1]), {"norm_templates": {}})
            name = parts[2]
            if name.startswith("norm_templates."):
                fields["norm_templates"][name.removeprefix("norm_templates.")] = tensor
            elif name in ("residual_threshold", "down_threshold", "down_template"):
                fields[name] = tensor
            else:
                raise KeyError(f"not a SpikeFree tensor: {key!r}")
        for index, fields in layers.items():
            for name in ("residual_threshold", "down_threshold"):
                if name not in fields:
                    raise KeyError(f"layers.{index}.{name} is missing")
        return cls({index: LayerTemplates(**f) for index, f in layers.items()})

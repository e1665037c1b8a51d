"""Massive-activation analysis: where spikes sit, where they are born and removed.

Hooks record, for every decoder layer's output (the residual stream) and every
``nn.Linear`` input, the top |activations|, the median |activation| and each token's
max |x|. Spike tokens are found per sample with :func:`iq_transform.spikefree.detect.
spike_token_mask`; a spike's life is the run of layers whose residual stream carries
it, and the ``down_proj``-style inputs at the ends of that run are the sites that
create and remove it.

Two kinds of outliers are told apart, since they need different remedies:

- **token spikes**: a few tokens whose max |x| dwarfs every other token's (the
  per-token scale is what is off). SpikeFree removes them;
- **channel outliers**: one channel large on (nearly) every token, as Gemma-3's
  residual channel 163. Each token is still quantized on its own scale's share of
  that channel, so this is per-channel smoothing's job (SmoothQuant) or a
  rotation's (QuIP), not SpikeFree's.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from iq_transform.models.arch import ArchSpec, get_arch_spec
from iq_transform.spikefree.detect import spike_token_mask, token_max_abs

__all__ = [
    "CHANNEL_RATIO",
    "ChannelOutlier",
    "TopActivation",
    "SiteReport",
    "SpikeToken",
    "SpikeReport",
    "analyze_spikes",
]

ANY_TOKEN = "<any>"
# A channel is a channel outlier at a site when its median |x| over tokens exceeds
# this many times the median over channels of that per-channel median.
CHANNEL_RATIO = 20.0
MAX_CHANNEL_LINES = 5
REMOVAL_DROP = 0.5
RESIDUAL = "residual"
LINEAR_INPUT = "linear_input"


@dataclass
class TopActivation:
    value: float
    sample: int
    token_index: int
    token: str
    channel: int


@dataclass
class ChannelOutlier:
    """One channel that is large on most tokens at a site.

    :param median_abs: median |x| of the channel over tokens (median over samples)
    :param ratio: ``median_abs`` over the median channel's
    """

    channel: int
    median_abs: float
    ratio: float


@dataclass
class ChannelOutlierSummary:
    """One outlier channel over all sites where it is one."""

    channel: int
    residual_layers: list[int]
    linear_inputs: list[str]
    max_ratio: float


@dataclass
class SiteReport:
    """Statistics of one hooked site.

    :param median_abs: median |x| over all elements, median over samples
    :param token_max_median: median over tokens of the per-token max |x|
    :param peak_token_ratio: the largest per-sample ratio of a token's max |x| to
        the median token max (a spike token exceeds ``ratio``)
    :param spike_tokens: ``(sample, token_index)`` pairs that are spike tokens here
    """

    name: str
    kind: str
    layer: int
    top: list[TopActivation]
    median_abs: float
    top1_over_median: float
    token_max_median: float
    peak_token_ratio: float
    spike_tokens: list[tuple[int, int]] = field(default_factory=list)
    channel_outliers: list[ChannelOutlier] = field(default_factory=list)


@dataclass
class SpikeToken:
    """One spike token, followed through the residual stream.

    :param created_at_layer: first decoder layer whose output carries the spike
    :param removed_at_layer: first layer after that whose output at least halves
        the token's max |x| (``None`` when none does)
    """

    sample: int
    token_index: int
    token: str
    kind: str
    max_abs: float
    channel: int
    created_at_layer: int
    removed_at_layer: int | None
    spike_sites: list[str]


@dataclass
class ConstantVector:
    """How alike one spike kind's normalized hidden vectors are across samples."""

    kind: str
    token: str
    layer: int
    num_vectors: int
    mean_cosine: float
    min_cosine: float


@dataclass
class SpikeReport:
    model: str
    num_samples: int
    seqlen: int
    ratio: float
    has_spikes: bool
    sites: list[SiteReport]
    spike_tokens: list[SpikeToken]
    creating_sites: list[str]
    removing_sites: list[str]
    constant_vectors: list[ConstantVector]
    channel_outliers: list[ChannelOutlierSummary] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines a person reads first."""
        closest = sorted(self.sites, key=lambda s: -s.peak_token_ratio)[:3]
        closest_line = "  highest token ratios: " + ", ".join(
            f"{s.name} {s.peak_token_ratio:,.0f}x" for s in closest
        )
        channel_lines = self._channel_lines()
        if not self.has_spikes:
            return "\n".join(
                [
                    f"{self.model}: no spike tokens at ratio {self.ratio:g} in "
                    f"{self.num_samples}x{self.seqlen} tokens (no massive "
                    "activations on tokens).",
                    closest_line,
                    *channel_lines,
                ]
            )
        residual = [s for s in self.sites if s.kind == RESIDUAL]
        peak = max(residual, key=lambda s: s.top[0].value)
        lines = [
            f"{self.model}: {len(self.spike_tokens)} spike tokens in "
            f"{self.num_samples}x{self.seqlen} tokens (ratio {self.ratio:g}).",
            f"  residual peak {peak.top[0].value:,.0f} at {peak.name}, channel "
            f"{peak.top[0].channel}, token {peak.top[0].token_index} "
            f"({peak.top[0].token!r}), {peak.top1_over_median:,.0f}x the median",
            f"  created at: {', '.join(self.creating_sites) or '-'}",
            f"  removed at: {', '.join(self.removing_sites) or '-'}",
            closest_line,
        ]
        for vector in self.constant_vectors:
            lines.append(
                f"  {vector.kind} {vector.token!r}: cosine across samples at layer "
                f"{vector.layer} mean {vector.mean_cosine:.4f}, min "
                f"{vector.min_cosine:.4f} ({vector.num_vectors} vectors)"
            )
        lines.append(
            "  these are token spikes (a few tokens, all channels' scale): "
            "SpikeFree handles them (transform=spikefree)"
        )
        return "\n".join([*lines, *channel_lines])

    def _channel_lines(self) -> list[str]:
        """The residual stream's outlier channels (linear inputs such as
        ``down_proj``'s are heavy-tailed per channel by design; they stay in the
        per-site lists of the JSON)."""
        residual = [o for o in self.channel_outliers if o.residual_layers]
        if not residual:
            return [
                "  no channel outliers in the residual stream (no channel's median "
                f"|x| over tokens above {CHANNEL_RATIO:g}x the median channel's)"
            ]
        lines = [
            "  channel outliers (one channel large on every token; not SpikeFree's "
            "job: SmoothQuant or a rotation, stages=smoothquant_rtn or quip_rtn):"
        ]
        for outlier in residual[:MAX_CHANNEL_LINES]:
            lines.append(
                f"    channel {outlier.channel}: residual of layers "
                f"{_ranges(outlier.residual_layers)}, up to {outlier.max_ratio:,.0f}x "
                "the median channel"
            )
        if len(residual) > MAX_CHANNEL_LINES:
            lines.append(f"    (+{len(residual) - MAX_CHANNEL_LINES} more channels)")
        return lines


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    runs: list[list[int]] = []
    for value in values:
        if runs and value == runs[-1][-1] + 1:
            runs[-1].append(value)
        else:
            runs.append([value])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


class _SiteRecorder:
    """Collects one site's statistics over samples (batch 1 per call)."""

    def __init__(self, name: str, kind: str, layer: int, top_k: int, ratio: float):
        self.name, self.kind, self.layer = name, kind, layer
        self.top_k, self.ratio = top_k, ratio
        self.top: list[tuple[float, int, int, int]] = []
        self.medians: list[float] = []
        self.token_max: list[torch.Tensor] = []
        self.token_channel: list[torch.Tensor] = []
        self.channel_median: list[torch.Tensor] = []
        # Hidden vectors of this site's spike tokens, keyed (sample, token_index).
        self.spike_vectors: dict[tuple[int, int], torch.Tensor] = {}

    def record(self, hidden: torch.Tensor, sample: int) -> None:
        hidden = hidden.detach()[0].float()
        if not torch.isfinite(hidden).all():
            raise FloatingPointError(
                f"NaN/inf activations at {self.name} on sample {sample}: the model or "
                "its inputs are broken; spikes cannot be analyzed."
            )
        magnitude = hidden.abs()
        values, flat = magnitude.flatten().topk(min(self.top_k, magnitude.numel()))
        width = magnitude.shape[-1]
        for value, index in zip(values.tolist(), flat.tolist(), strict=True):
            self.top.append((value, sample, index // width, index % width))
        self.top = sorted(self.top, reverse=True)[: self.top_k]
        self.medians.append(magnitude.median().item())
        self.channel_median.append(magnitude.median(dim=0).values.cpu())
        token_max, channel = token_max_abs(hidden)
        self.token_max.append(token_max)
        self.token_channel.append(channel)
        if self.kind == RESIDUAL:
            mask = spike_token_mask(token_max.unsqueeze(0), self.ratio)[0]
            for token_index in mask.nonzero().flatten().tolist():
                self.spike_vectors[(sample, token_index)] = hidden[token_index].clone()

    def hook(self, get_sample):
        def record_input(module, args, kwargs):
            hidden = args[0] if args else kwargs["input"]
            self.record(hidden, get_sample())

        def record_output(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.record(hidden, get_sample())

        return record_output if self.kind == RESIDUAL else record_input


def _register_sites(
    model: nn.Module, arch: ArchSpec, top_k: int, ratio: float, get_sample
) -> tuple[list[_SiteRecorder], list]:
    recorders, handles = [], []
    for index, layer in enumerate(arch.decoder_layers(model)):
        recorder = _SiteRecorder(
            f"{arch.layers}.{index}", RESIDUAL, index, top_k, ratio
        )
        handles.append(
            layer.register_forward_hook(recorder.hook(get_sample), with_kwargs=True)
        )
        recorders.append(recorder)
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                recorder = _SiteRecorder(
                    f"{arch.layers}.{index}.{name}", LINEAR_INPUT, index, top_k, ratio
                )
                handles.append(
                    module.register_forward_pre_hook(
                        recorder.hook(get_sample), with_kwargs=True
                    )
                )
                recorders.append(recorder)
    return recorders, handles


def _token_text(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    return tokenizer.decode([token_id])


def _image_token_name(config, token_index: int) -> str:
    """A vision transformer's token by position: CLS, registers, then patches."""
    registers = getattr(config, "num_register_tokens", 0) or 0
    if token_index == 0:
        return "<cls>"
    if token_index <= registers:
        return f"<register {token_index - 1}>"
    return f"<patch {token_index - 1 - registers}>"


def _spike_kind(token_index: int) -> str:
    return "first_token" if token_index == 0 else "mid_sequence"


@torch.no_grad()
def analyze_spikes(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    windows: torch.Tensor,
    ratio: float = 64.0,
    top_k: int = 3,
    model_name: str = "",
    progress: bool = True,
) -> SpikeReport:
    """Run ``windows`` (samples, seqlen) through ``model`` and report its spikes.

    For a vision transformer ``windows`` are ``pixel_values`` (samples, 3, h, w)
    and ``tokenizer`` may be its image processor; tokens are named by position
    (``<cls>``, ``<register i>``, ``<patch i>``).

    :param ratio: a token is a spike token at a site when its max |x| exceeds
        ``ratio`` x the median over the sample's tokens of that max
    :param top_k: how many of the largest |activations| to keep per site
    """
    arch = get_arch_spec(model)
    current = {"sample": 0}
    recorders, handles = _register_sites(
        model, arch, top_k, ratio, lambda: current["sample"]
    )
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    try:
        for sample, window in enumerate(
            tqdm(windows, desc="spike analysis", disable=not progress, leave=False)
        ):
            current["sample"] = sample
            if arch.inputs == "pixel_values":
                model(pixel_values=window.unsqueeze(0).to(device, dtype))
            else:
                model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def text(sample: int, token_index: int) -> str:
        if arch.inputs == "pixel_values":
            return _image_token_name(model.config, token_index)
        return _token_text(tokenizer, int(windows[sample, token_index]))

    sites = [_site_report(recorder, ratio, text) for recorder in recorders]
    residual = [r for r in recorders if r.kind == RESIDUAL]
    residual_reports = [s for s in sites if s.kind == RESIDUAL]
    spike_tokens = _follow_spikes(sites, residual_reports, residual, text)
    creating, removing = _birth_and_death_sites(spike_tokens, sites, arch)
    constant_vectors = _constant_vectors(spike_tokens, residual, text)
    return SpikeReport(
        channel_outliers=_summarize_channel_outliers(sites),
        model=model_name or getattr(model.config, "_name_or_path", ""),
        num_samples=windows.shape[0],
        seqlen=len(recorders[0].token_max[0]),
        ratio=ratio,
        has_spikes=bool(spike_tokens),
        sites=sites,
        spike_tokens=spike_tokens,
        creating_sites=creating,
        removing_sites=removing,
        constant_vectors=constant_vectors,
    )


def _site_report(recorder: _SiteRecorder, ratio: float, text) -> SiteReport:
    median_abs = float(torch.tensor(recorder.medians).median())
    spikes = []
    for sample, token_max in enumerate(recorder.token_max):
        mask = spike_token_mask(token_max.unsqueeze(0), ratio)[0]
        spikes.extend((sample, int(i)) for i in mask.nonzero().flatten())
    top = [
        TopActivation(value, sample, token_index, text(sample, token_index), channel)
        for value, sample, token_index, channel in recorder.top
    ]
    return SiteReport(
        name=recorder.name,
        kind=recorder.kind,
        layer=recorder.layer,
        top=top,
        median_abs=median_abs,
        top1_over_median=top[0].value / max(median_abs, 1e-12),
        token_max_median=float(torch.cat(recorder.token_max).median()),
        peak_token_ratio=max(
            float(t.max() / t.median().clamp_min(1e-12)) for t in recorder.token_max
        ),
        spike_tokens=spikes,
        channel_outliers=_channel_outliers(recorder.channel_median),
    )


def _channel_outliers(channel_median: list[torch.Tensor]) -> list[ChannelOutlier]:
    profile = torch.stack(channel_median).median(dim=0).values
    typical = profile.median().clamp_min(1e-12)
    ratios = profile / typical
    outliers = (ratios > CHANNEL_RATIO).nonzero().flatten().tolist()
    return [
        ChannelOutlier(channel, float(profile[channel]), float(ratios[channel]))
        for channel in sorted(outliers, key=lambda c: -float(ratios[c]))
    ]


def _summarize_channel_outliers(sites: list[SiteReport]) -> list[ChannelOutlierSummary]:
    by_channel: dict[int, ChannelOutlierSummary] = {}
    for site in sites:
        for outlier in site.channel_outliers:
            summary = by_channel.setdefault(
                outlier.channel, ChannelOutlierSummary(outlier.channel, [], [], 0.0)
            )
            if site.kind == RESIDUAL:
                summary.residual_layers.append(site.layer)
            else:
                summary.linear_inputs.append(site.name)
            summary.max_ratio = max(summary.max_ratio, outlier.ratio)
    # the residual stream's channels first: they are the model's own outliers
    return sorted(
        by_channel.values(), key=lambda s: (-len(s.residual_layers), -s.max_ratio)
    )


def _follow_spikes(sites, residual_reports, residual, text) -> list[SpikeToken]:
    """Each token that is a spike in the residual stream, with its life span."""
    layers_of: dict[tuple[int, int], list[int]] = defaultdict(list)
    for report in residual_reports:
        for key in report.spike_tokens:
            layers_of[key].append(report.layer)
    sites_of: dict[tuple[int, int], list[str]] = defaultdict(list)
    for report in sites:
        for key in report.spike_tokens:
            sites_of[key].append(report.name)
    tokens = []
    for (sample, token_index), layers in sorted(layers_of.items()):
        trajectory = [float(r.token_max[sample][token_index]) for r in residual]
        first = min(layers)
        peak_layer = max(layers, key=lambda layer: trajectory[layer])
        tokens.append(
            SpikeToken(
                sample=sample,
                token_index=token_index,
                token=text(sample, token_index),
                kind=_spike_kind(token_index),
                max_abs=trajectory[peak_layer],
                channel=int(residual[peak_layer].token_channel[sample][token_index]),
                created_at_layer=first,
                removed_at_layer=_removal_layer(trajectory, first),
                spike_sites=sites_of[(sample, token_index)],
            )
        )
    return tokens


def _removal_layer(trajectory: list[float], created_at: int) -> int | None:
    """First layer after ``created_at`` whose output at least halves the token's max
    |x|. The ratio test alone would end the spike too early in late layers, where
    ordinary tokens grow and the median catches up."""
    for layer in range(created_at + 1, len(trajectory)):
        if trajectory[layer] <= REMOVAL_DROP * trajectory[layer - 1]:
            return layer
    return None


def _birth_and_death_sites(
    spike_tokens: list[SpikeToken], sites: list[SiteReport], arch: ArchSpec
) -> tuple[list[str], list[str]]:
    """The ``down_proj`` inputs that carry a token spike where its life starts/ends.

    Where the MLP output projection of that layer shows no token spike, the layer
    itself (attention or another path) is named instead.
    """
    by_name = {site.name: site for site in sites}

    def site_for(layer: int, key: tuple[int, int]) -> str:
        down_proj = f"{arch.layers}.{layer}.{arch.down_proj}"
        if key in by_name[down_proj].spike_tokens:
            return down_proj
        return f"{arch.layers}.{layer}"

    creating, removing = [], []
    for token in spike_tokens:
        key = (token.sample, token.token_index)
        creating.append(site_for(token.created_at_layer, key))
        if token.removed_at_layer is not None:
            removing.append(site_for(token.removed_at_layer, key))
    return sorted(set(creating)), sorted(set(removing))


def _constant_vectors(spike_tokens, residual, text) -> list[ConstantVector]:
    """Cosine of spike tokens' normalized hidden vectors across different samples
    at the middle layer of their common life span. First tokens form one group
    whatever their text; mid-sequence spikes are grouped by token text."""
    groups: dict[tuple[str, str], list[SpikeToken]] = defaultdict(list)
    for token in spike_tokens:
        token_text = ANY_TOKEN if token.kind == "first_token" else token.token
        groups[(token.kind, token_text)].append(token)
    results = []
    for (kind, token_text), tokens in sorted(groups.items()):
        start = max(t.created_at_layer for t in tokens)
        stop = min(t.removed_at_layer or len(residual) for t in tokens)
        by_sample = {t.sample: t for t in tokens}
        if len(by_sample) < 2 or stop <= start:
            continue
        layer = (start + stop - 1) // 2
        vectors = torch.stack(
            [
                residual[layer].spike_vectors[(t.sample, t.token_index)]
                for t in by_sample.values()
            ]
        )
        vectors = nn.functional.normalize(vectors, dim=-1)
        cosines = [
            float(vectors[i] @ vectors[j])
            for i, j in itertools.combinations(range(len(vectors)), 2)
        ]
        results.append(
            ConstantVector(
                kind=kind,
                token=token_text,
                layer=layer,
                num_vectors=len(vectors),
                mean_cosine=sum(cosines) / len(cosines),
                min_cosine=min(cosines),
            )
        )
    return results

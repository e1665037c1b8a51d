"""Measurements: calibration and evaluation text, perplexity, where spikes sit
(:mod:`~iq_transform.evaluation.spike_analysis`) and how spiky the quantized
linears' inputs are (:mod:`~iq_transform.evaluation.spike_ratios`)."""

from iq_transform.evaluation.data import (
    DataError,
    TextSource,
    calibration_windows,
    evaluation_windows,
    load_documents,
    load_text,
)
from iq_transform.evaluation.perplexity import PerplexityResult, perplexity
from iq_transform.evaluation.spike_analysis import SpikeReport, analyze_spikes
from iq_transform.evaluation.spike_ratios import linear_input_ratios

__all__ = [
    "DataError",
    "PerplexityResult",
    "SpikeReport",
    "TextSource",
    "analyze_spikes",
    "calibration_windows",
    "evaluation_windows",
    "linear_input_ratios",
    "load_documents",
    "load_text",
    "perplexity",
]

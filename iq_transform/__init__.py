"""iq_transform: spike-free activations for static per-tensor quantization.

INSERTQUANT-style templates for llm-compressor recipes; see README.md.
"""

__version__ = "0.1.0"

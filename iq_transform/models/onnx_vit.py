"""Convert a DINOv2 backbone exported to ONNX back into transformers' ``Dinov2Model``.

The export (``torch.onnx.export`` of a ``Dinov2Model`` wrapped as ``backbone``)
keeps the names of every parameter except the linears, which became ``MatMul``
nodes with anonymous ``[in, out]`` weights; each ``MatMul`` node is still named after
its module (``/backbone/encoder/layer.3/mlp/fc1/MatMul``), which names the weight.
The position embeddings were split into the CLS row and the patch grid, the only
other anonymous initializers. What is left out (the exporter's decoder head) is not
part of the backbone.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

from iq_transform.models.registry import ModelSpecError, OfflineVisionModel

__all__ = ["convert_onnx_dinov2", "locate_onnx", "onnx_backbone_state"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def locate_onnx(model: OfflineVisionModel) -> Path:
    """The ONNX file inside its installed package (the package is not imported)."""
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSpecError(
            f"Offline model {model.name!r} needs the package "
            f"{', '.join(model.pip_packages)}: {model.install_command}"
        )
    path = Path(spec.submodule_search_locations[0]) / model.onnx_file
    if not path.is_file():
        raise ModelSpecError(
            f"Offline model {model.name!r}: {path} is missing; reinstall it with: "
            f"{model.install_command}"
        )
    return path


def onnx_backbone_state(
    onnx_path: Path, prefix: str
) -> tuple[dict[str, torch.Tensor], float]:
    """The backbone's state dict (transformers names) and its LayerNorm epsilon."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ModelSpecError(
            "Converting an ONNX backbone needs the onnx package: pip install "
            "'iq-transform[vision]' (or pip install onnx==1.19.1)"
        ) from err
    graph = onnx.load(str(onnx_path)).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    state = {
        name.removeprefix(prefix + "."): array
        for name, array in arrays.items()
        if name.startswith(prefix + ".")
    }
    # the exporter's own names for what it took apart or folded
    anonymous = {n: a for n, a in arrays.items() if n.startswith("onnx::")}
    for node in graph.node:
        module = node.name.removeprefix(f"/{prefix}/").removesuffix("/MatMul")
        if node.op_type != "MatMul" or module == node.name:
            continue
        weights = [i for i in node.input if i in anonymous]
        if len(weights) == 1:
            state[module.replace("/", ".") + ".weight"] = anonymous.pop(weights[0]).T
    state["embeddings.position_embeddings"] = _position_embeddings(anonymous)
    eps = _layer_norm_epsilon(graph, prefix)
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, eps


def _position_embeddings(anonymous: dict[str, np.ndarray]) -> np.ndarray:
    """The CLS row (1, 1, d) and the patch grid (1, n, d) the exporter split apart."""
    rows = {a.shape[1]: a for a in anonymous.values() if a.ndim == 3}
    grid = [a for n, a in rows.items() if n > 1]
    if 1 not in rows or len(grid) != 1 or len(anonymous) != 2:
        raise ValueError(
            "The ONNX file does not hold a DINOv2 backbone as exported by "
            f"transformers: unnamed initializers of shapes "
            f"{[a.shape for a in anonymous.values()]}"
        )
    return np.concatenate([rows[1], grid[0]], axis=1)


def _layer_norm_epsilon(graph, prefix: str) -> float:
    from onnx import numpy_helper

    constants = {
        output: node
        for node in graph.node
        if node.op_type == "Constant"
        for output in node.output
    }
    add = next(
        n for n in graph.node if n.name == f"/{prefix}/encoder/layer.0/norm1/Add"
    )
    eps = [
        numpy_helper.to_array(constants[i].attribute[0].t)
        for i in add.input
        if i in constants
    ]
    return float(eps[0])


def convert_onnx_dinov2(model: OfflineVisionModel, out_dir: Path) -> None:
    """Write ``model``'s backbone as a ``Dinov2Model`` folder with its image
    processor (DINOv2's: resize to 256, center crop 224, ImageNet statistics)."""
    onnx_path = locate_onnx(model)
    logger.info(f"Converting {onnx_path} into a Dinov2Model")
    state, eps = onnx_backbone_state(onnx_path, model.prefix)
    hidden = state["embeddings.cls_token"].shape[-1]
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    layers = 1 + max(
        int(key.split(".")[2]) for key in state if key.startswith("encoder.layer.")
    )
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=model.num_attention_heads,
        mlp_ratio=mlp // hidden,
        patch_size=patch,
        image_size=grid * patch,
        layer_norm_eps=eps,
        layerscale_value=1.0,
        architectures=["Dinov2Model"],
    )
    backbone = Dinov2Model(config).eval()
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    # mask_token is used for masked-image training only; the export dropped it
    if set(missing) - {"embeddings.mask_token"} or unexpected:
        raise ValueError(
            f"{onnx_path} does not match Dinov2Model: missing {missing}, "
            f"unexpected {unexpected}"
        )
    backbone.save_pretrained(out_dir)
    BitImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    ).save_pretrained(out_dir)

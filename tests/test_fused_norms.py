"""The runtime's fused norms: a norm that feeds templated linears computes its
template rows in its own pass (``fused_norm_templates``: one kernel on a GPU).

The torch reference has transformers' own norm arithmetic, so on the CPU the fused
path must give the hook path's logits bit for bit; the Triton kernel is checked
against the reference where Triton runs (CUDA, or ``TRITON_INTERPRET=1``)."""

import importlib
import os

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from iq_transform import SpikeFreeModifier, get_runtime
from iq_transform.composition.pipeline import apply_recipe
from iq_transform.models import load_model
from iq_transform.spikefree import runtime as runtime_module
from iq_transform.spikefree.norm_rows import (
    fused_norm_templates,
    fused_norm_templates_reference,
)
from iq_transform.spikefree.runtime import (
    SpikeFreeRuntime,
    _own_forward,
    insert_templates,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def calibrated(calibration):
    model, tokenizer = load_model("tiny-planted")
    apply_recipe(model, tokenizer, [SpikeFreeModifier()], calibration)
    return model.to(DEVICE), tokenizer


def _activations(dtype, rows=6, width=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows, width, generator=generator) * 3
    x[0, 0, 5] = 900.0  # a massive activation
    return x.to(dtype)


def _templates(width=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, width, generator=generator)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_transformers_norms_then_the_runtimes_rows(dtype):
    x = _activations(dtype)
    templates = _templates()
    rows = torch.zeros(2, 6, dtype=torch.bool)
    rows[0, 0] = rows[1, 3] = True
    kinds = torch.zeros(2, 6, dtype=torch.long)
    kinds[1, 3] = 1
    for norm, offset, cast_before_weight in (
        (LlamaRMSNorm(48, eps=1e-5), 0.0, True),
        (Gemma3RMSNorm(48, eps=1e-6), 1.0, False),
    ):
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 2.0, 48))
        norm.to(dtype)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        with torch.no_grad():
            expected = norm(x)
            plain, detected = fused_norm_templates_reference(
                x, norm.weight, eps, weight_offset=offset,
                cast_before_weight=cast_before_weight,
            )  # fmt: skip
            assert torch.equal(plain, expected) and detected is None
            inserted = insert_templates(
                expected.clone(), rows, kinds, templates,
                scale=norm.weight.float() + offset,
            )  # fmt: skip
            fused, _ = fused_norm_templates_reference(
                x, norm.weight, eps, weight_offset=offset, templates=templates,
                kinds=kinds, rows=rows, cast_before_weight=cast_before_weight,
            )  # fmt: skip
        assert torch.equal(fused, inserted)
        assert not torch.equal(fused[0, 0], expected[0, 0])


def _norm_class(name: str):
    family = name.removesuffix("RMSNorm").lower()
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    return getattr(module, name)


@pytest.mark.parametrize(
    "name",
    sorted(
        runtime_module._CAST_BEFORE_WEIGHT_NORMS | runtime_module._FLOAT32_WEIGHT_NORMS
    ),
)
def test_every_norm_class_the_runtime_fuses_computes_the_reference(name):
    cast_before_weight = name in runtime_module._CAST_BEFORE_WEIGHT_NORMS
    norm = _norm_class(name)(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-0.5, 2.0, 48))
    for dtype in (torch.float32, torch.bfloat16):
        x = _activations(dtype)
        norm.to(dtype)
        eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        with torch.no_grad():
            expected = norm(x)
        output, _ = fused_norm_templates_reference(
            x, norm.weight, eps, weight_offset=0.0 if cast_before_weight else 1.0,
            cast_before_weight=cast_before_weight,
        )  # fmt: skip
        assert torch.equal(output, expected), (name, dtype)


def test_reference_detection_is_threshold_on_valid_rows_or_rows():
    x = _activations(torch.float32)
    x[1, 2, 0] = 700.0
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 2] = False  # padding
    rows = torch.zeros(2, 6, dtype=torch.bool)
    rows[1, 4] = True
    record = torch.zeros(2, 6, dtype=torch.bool)
    record[0, 3] = True
    kinds = torch.zeros(2, 6, dtype=torch.long)
    output, detected = fused_norm_templates_reference(
        x, torch.ones(48), 1e-6, templates=_templates(), kinds=kinds, rows=rows,
        threshold=torch.tensor(100.0), valid=valid, record=record,
        cast_before_weight=True,
    )  # fmt: skip
    assert detected.nonzero().tolist() == [[0, 0], [1, 4]]
    assert record.nonzero().tolist() == [[0, 0], [0, 3], [1, 4]]
    assert torch.equal(output[0, 0], _templates()[0]) and output[1, 2, 0] > 1


def test_bad_norm_forms_are_refused():
    x = _activations(torch.bfloat16)
    with pytest.raises(ValueError, match="no weight offset"):
        fused_norm_templates_reference(
            x, torch.ones(48, dtype=torch.bfloat16), 1e-6, weight_offset=1.0,
            cast_before_weight=True,
        )  # fmt: skip
    with pytest.raises(ValueError, match="promoted dtype"):
        fused_norm_templates_reference(x, torch.ones(48), 1e-6, cast_before_weight=True)
    with pytest.raises(ValueError, match="kinds"):
        fused_norm_templates_reference(x, torch.ones(48), 1e-6, templates=_templates())


@pytest.mark.skipif(not TRITON, reason="the kernel needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cast_before_weight", [True, False])
def test_the_kernel_equals_the_reference(dtype, cast_before_weight):
    # 4 rows a program: 2 x 7 rows leaves a partial last program
    x = _activations(dtype, rows=7, width=4096).to(DEVICE)
    weight = torch.linspace(-0.5, 2.0, 4096, device=DEVICE).to(dtype)
    offset = 0.0 if cast_before_weight else 1.0
    templates = _templates(4096).to(DEVICE)
    rows = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
    rows[0, 0] = rows[1, 6] = True
    kinds = torch.zeros(2, 7, dtype=torch.long, device=DEVICE)
    kinds[1, 6] = 1
    arguments = dict(
        weight_offset=offset,
        templates=templates,
        kinds=kinds,
        rows=rows,
        cast_before_weight=cast_before_weight,
    )
    fused, _ = fused_norm_templates(x, weight, 1e-5, **arguments)
    reference, _ = fused_norm_templates_reference(x, weight, 1e-5, **arguments)
    assert fused.dtype == dtype and fused.shape == x.shape
    ulp = torch.finfo(dtype).eps
    gap = (fused.float() - reference.float()).abs()
    # template rows are exact (Triton's interpreter truncates to bfloat16 where
    # the GPU rounds to nearest: one ulp there); the norm's rows differ in the
    # last bits only (reduction order, rsqrt)
    if DEVICE == "cuda" or dtype == torch.float32:
        assert torch.equal(fused[rows], reference[rows])
    assert (gap[rows] <= ulp * reference[rows].float().abs()).all()
    assert (gap <= 2 * ulp * reference.float().abs() + 1e-30).all()
    plain, _ = fused_norm_templates(
        x, weight, 1e-5, weight_offset=offset, cast_before_weight=cast_before_weight
    )
    assert torch.equal(plain[~rows], fused[~rows])
    # a decode step's detection in the same pass: the planted 900 is over 100,
    # the padded row 1 of sequence 1 is not a spike row whatever its max
    x[1, 1, 7] = 500.0
    plain, _ = fused_norm_templates(
        x, weight, 1e-5, weight_offset=offset, cast_before_weight=cast_before_weight
    )
    valid = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    valid[1, 1] = False
    outputs = []
    for function in (fused_norm_templates, fused_norm_templates_reference):
        record = torch.zeros(2, 7, dtype=torch.bool, device=DEVICE)
        record[1, 2] = True
        output, detected = function(
            x, weight, 1e-5, weight_offset=offset, templates=templates, kinds=kinds,
            threshold=torch.tensor(100.0, device=DEVICE), valid=valid,
            record=record, cast_before_weight=cast_before_weight,
        )  # fmt: skip
        assert detected.nonzero().tolist() == [[0, 0]]
        assert record.nonzero().tolist() == [[0, 0], [1, 2]]
        outputs.append(output)
    assert torch.equal(outputs[0][0, 0], fused[0, 0])  # the same template row
    assert torch.equal(outputs[0][~detected], plain[~detected])
    gap = (outputs[0].float() - outputs[1].float()).abs()
    assert (gap <= 2 * ulp * outputs[1].float().abs() + 1e-30).all()


def _count_fused_calls(monkeypatch) -> list:
    calls = []

    def counting(*args, **kwargs):
        calls.append("threshold" in kwargs)
        return fused_norm_templates(*args, **kwargs)

    monkeypatch.setattr(runtime_module, "fused_norm_templates", counting)
    return calls


@pytest.mark.parametrize("padded", [False, True])
def test_fused_norms_give_the_hook_paths_logits(calibrated, monkeypatch, padded):
    model, tokenizer = calibrated
    runtime = get_runtime(model)
    batch = tokenizer(
        ["the cat sat, on the mat.", "a dog"], return_tensors="pt", padding=True
    ).to(DEVICE)
    if not padded:
        batch = tokenizer(["the cat sat, on the mat."], return_tensors="pt").to(DEVICE)
    calls = _count_fused_calls(monkeypatch)
    with torch.no_grad():
        runtime.fuse_norms = False
        hooked = model(**batch).logits
        assert calls == []
        runtime.fuse_norms = True
        fused = model(**batch).logits
    templated = [layer for layer in runtime.layers if layer.templates.norm_templates]
    assert len(templated) >= 2
    assert len(calls) == sum(len(t.templates.norm_templates) for t in templated)
    if not TRITON:  # the reference: the same float32 arithmetic
        assert torch.equal(fused, hooked)
    else:
        torch.testing.assert_close(fused, hooked, rtol=1e-4, atol=1e-4)


def test_fused_norms_in_generation_and_after_removal(calibrated, monkeypatch):
    model, tokenizer = calibrated
    runtime = get_runtime(model)
    prompt = tokenizer(["the cat sat, on the"], return_tensors="pt").to(DEVICE)
    calls = _count_fused_calls(monkeypatch)
    settings = dict(max_new_tokens=6, do_sample=False, use_cache=True)
    runtime.fuse_norms = False
    hooked = model.generate(**prompt, **settings)
    runtime.fuse_norms = True
    fused = model.generate(**prompt, **settings)
    assert torch.equal(fused, hooked)
    assert len(calls) > 6  # the prefill's and every decode step's norms
    if DEVICE == "cuda":  # decode steps detect their spike rows in the norm's pass
        assert any(calls) and not all(calls)
    norms = [
        layer.layer.get_submodule(name)
        for layer in runtime.layers
        for name in runtime.arch.norm_names()
    ]
    assert any(_own_forward(norm) is not LlamaRMSNorm.forward for norm in norms)
    runtime.remove()
    assert all(_own_forward(norm) is LlamaRMSNorm.forward for norm in norms)
    seen = len(calls)
    with torch.no_grad():
        model(**prompt)
    assert len(calls) == seen


def test_fuse_norms_false_leaves_the_norms_alone(calibrated):
    model, tokenizer = calibrated
    runtime = get_runtime(model)
    templates = runtime.templates
    runtime.remove()
    fresh = SpikeFreeRuntime(model, runtime.arch, fuse_norms=False)
    fresh.load_templates(templates)
    with torch.no_grad():
        model(**tokenizer(["the cat"], return_tensors="pt").to(DEVICE))
    for layer in fresh.layers:
        for name in fresh.arch.norm_names():
            norm = layer.layer.get_submodule(name)
            assert _own_forward(norm) is LlamaRMSNorm.forward


def test_a_fused_norm_inserts_its_rows_itself_where_the_kernel_declines(
    calibrated, monkeypatch
):
    """A fused norm carries no hook of the runtime (a hook makes each call of the
    norm the slow one); where the kernel does not apply, its forward runs the
    norm and writes the template rows as the hook would."""
    model, tokenizer = calibrated
    runtime = get_runtime(model)
    batch = tokenizer(["the cat sat, on the mat."], return_tensors="pt").to(DEVICE)
    with torch.no_grad():
        runtime.fuse_norms = False
        hooked = model(**batch).logits
        runtime.fuse_norms = True
        model(**batch)
        norms = [
            layer.layer.get_submodule(name)
            for layer in runtime.layers
            for name in layer.templates.norm_templates
        ]
        assert norms
        assert all(_own_forward(norm) is not LlamaRMSNorm.forward for norm in norms)
        assert not any(
            hook.__module__ == runtime_module.__name__
            for norm in norms
            for hook in norm._forward_hooks.values()
        )
        calls = _count_fused_calls(monkeypatch)
        monkeypatch.setattr(runtime_module, "FUSED_NORM_MAX_WIDTH", 0)
        declined = model(**batch).logits
    assert calls == []  # the kernel declined every norm
    assert torch.equal(declined, hooked)

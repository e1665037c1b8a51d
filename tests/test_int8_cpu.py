"""The spike-free static W8A8 model run in real int8 CPU kernels (oneDNN):
each linear computes what its fake-quantized forward did, template rows come from
precomputed constants and are never quantized, and a model the kernels cannot run
is refused untouched."""

import json
import os

import pytest
import torch
from compressed_tensors.quantization.lifecycle.forward import forward_quantize

import iq_transform
from iq_transform import get_runtime
from iq_transform.evaluation.host_syncs import count_host_syncs
from iq_transform.evaluation.perplexity import perplexity
from iq_transform.kernels import (
    Int8ExecutionError,
    is_int8_executed,
    rotations,
    to_int8_cpu,
)
from iq_transform.kernels.int8_cpu import (
    SMALL_GEMM_ROWS,
    Int8SiblingLinears,
    Int8StaticLinear,
    executed_kernels,
    fbgemm_available,
    fbgemm_products_saturate,
    kernel_of,
    u8_products_saturate,
)
from iq_transform.kernels.rotations import (
    KroneckerRotation,
    input_changing_hooks,
    input_rotation,
)
from iq_transform.models.offload import move_model
from iq_transform.spikefree.templates import FIRST_TOKEN
from tests.test_checkpoint import greedy, quantized

CARRIER_LAYER = 2  # the planted model carries its spikes in layers 2-4


def quantized_on_cpu(calibration, quant: str = "w8a8_static"):
    """The W8A8 (or ``quant``) static + SpikeFree toy, moved to the CPU after
    oneshot (which runs on a GPU where there is one): int8 CPU execution and its
    fake-quantized reference both run there."""
    model, tokenizer = quantized(quant, "rtn", calibration)
    return move_model(model, "cpu"), tokenizer


@pytest.fixture(scope="module")
def fake_quantized(calibration):
    return quantized_on_cpu(calibration)


@pytest.fixture(scope="module")
def executed(calibration):
    model, tokenizer = quantized_on_cpu(calibration)
    return to_int8_cpu(model), tokenizer


def _fake_quantized_linear(module, x: torch.Tensor) -> torch.Tensor:
    scheme = module.quantization_scheme
    x = forward_quantize(module, x, "input", scheme.input_activations)
    weight = forward_quantize(module, module.weight.data, "weight", scheme.weights)
    return torch.nn.functional.linear(x, weight, module.bias)


def test_every_linear_computes_its_fake_quantized_product(executed):
    assert_linears_compute_their_fake_quantized_products(executed[0])


def assert_linears_compute_their_fake_quantized_products(model) -> None:
    torch.manual_seed(0)
    linears = [m for m in model.modules() if hasattr(m, "quantization_scheme")]
    assert len(linears) == 6 * 7  # q k v o gate up down in every decoder layer
    for module in linears:
        x = torch.randn(2, 9, module.in_features) * float(module.input_scale) * 40
        with torch.no_grad():
            expected = _fake_quantized_linear(module, x)
            got = module(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def assert_follows(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Executed logits ``got`` follow the fake-quantized ``expected``: integer
    GEMMs round differently from float ones at a few code boundaries, which moves
    the logits slightly and flips the greedy token only where the top two were
    nearly tied (measured on the planted model: 6 of 192 tokens, at top-2 margins
    of 0.007-0.043 where the median margin is 0.23)."""
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    flipped = got.argmax(-1) != expected.argmax(-1)
    assert flipped.float().mean() < 0.05
    top2 = expected.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    assert (margins[flipped] < margins.median() / 4).all(), margins[flipped]


def _outputs(model, windows, names):
    captured = {}
    hooks = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, o, name=name: captured.__setitem__(name, o.detach())
        )
        for name in names
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return captured


def test_template_rows_are_exact_constants_never_quantized(
    executed, fake_quantized, planted_windows
):
    model, _ = executed
    layer = f"model.layers.{CARRIER_LAYER}"
    names = [f"{layer}.self_attn.{p}_proj" for p in "qkv"]
    got = _outputs(model, planted_windows, names)
    expected = _outputs(fake_quantized[0], planted_windows, names)
    for name in names:
        module = model.get_submodule(name)
        constant = module.template_outputs[FIRST_TOKEN]
        bos_rows = got[name][:, 0]  # every window starts with BOS, a carrier
        assert torch.equal(bos_rows, constant.expand_as(bos_rows))
        torch.testing.assert_close(bos_rows, expected[name][:, 0])
        # quantized with the ordinary tokens' static scale the row would differ
        norm = model.get_submodule(f"{layer}.input_layernorm")
        template = get_runtime(model).layers[CARRIER_LAYER].templates
        row = template.norm_templates["input_layernorm"][FIRST_TOKEN] * norm.weight
        with torch.no_grad():
            clipped = module(row.unsqueeze(0))
        assert (clipped[0] - constant).abs().max() > 0.1 * constant.abs().max()


def test_executed_logits_and_perplexity_follow_the_fake_quantized_model(
    executed, fake_quantized, planted_windows
):
    with torch.no_grad():
        got = executed[0](planted_windows).logits
        expected = fake_quantized[0](planted_windows).logits
    assert_follows(got, expected)
    ppl = perplexity(executed[0], planted_windows, progress=False).ppl
    reference = perplexity(fake_quantized[0], planted_windows, progress=False).ppl
    assert ppl == pytest.approx(reference, rel=5e-3)


def test_inference_mode_gives_what_no_grad_gives(
    executed, fake_quantized, planted_windows
):
    # tensors made under inference_mode track no writes (``_version`` raises), and
    # the runtime and the shared sibling product both cache on tensors
    for model in (executed[0], fake_quantized[0]):
        with torch.no_grad():
            expected = model(planted_windows).logits
        with torch.inference_mode():
            got = model(planted_windows).logits
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_greedy_generation_matches_the_fake_quantized_model(executed, fake_quantized):
    assert torch.equal(greedy(*executed), greedy(*fake_quantized))


def test_the_executed_forward_never_waits(executed, planted_windows, monkeypatch):
    from iq_transform.spikefree import runtime

    monkeypatch.setattr(runtime, "HOST_INDEXED_DEVICES", set())  # the GPU's path
    with torch.no_grad():
        assert count_host_syncs(lambda: executed[0](planted_windows)) == {}


def test_a_saved_checkpoint_runs_in_int8_as_it_ran_before_saving(
    calibration, planted_windows, tmp_path
):
    model, tokenizer = quantized_on_cpu(calibration)
    with torch.no_grad():
        expected = model(planted_windows).logits
    # save_compressed leaves int8 weights in memory too, until a forward
    model.save_pretrained(tmp_path, save_compressed=True)
    tokenizer.save_pretrained(tmp_path)
    for executed in (
        to_int8_cpu(iq_transform.load_pretrained(tmp_path)),
        to_int8_cpu(model),
    ):
        assert is_int8_executed(executed)
        with torch.no_grad():
            got = executed(planted_windows).logits
        assert_follows(got, expected)


@pytest.mark.parametrize(
    ("quant", "named"),
    [
        ("w8a8_dynamic", "int8 dynamic per-token"),
        ("fp8_static", "float8 static"),
        ("w4a8_static", "int4 static per-group"),
    ],
)
def test_a_scheme_the_kernels_cannot_run_is_refused_untouched(
    calibration, planted_windows, quant, named
):
    model, _ = quantized(quant, "rtn", calibration)
    forwards = {m: m.forward for m in model.modules() if hasattr(m, "weight_scale")}
    with pytest.raises(Int8ExecutionError) as error:
        to_int8_cpu(model)
    message = str(error.value)
    assert named in message and "W8A8 static" in message
    assert all(m.forward == f for m, f in forwards.items())
    assert not is_int8_executed(model)


def test_an_unquantized_model_is_refused(planted):
    with pytest.raises(Int8ExecutionError, match="No quantized Linear"):
        to_int8_cpu(planted[0])


def test_a_model_is_converted_once(executed):
    with pytest.raises(Int8ExecutionError, match="already runs in int8"):
        to_int8_cpu(executed[0])


def test_iq_quantize_evaluates_the_executed_model_beside_the_fake_quantized(
    tmp_path,
):
    from tests.test_cli import run_app
    from tests.test_quantize_cli import TINY_RUN

    run = run_app("iq-quantize", *TINY_RUN, "execute=int8_cpu", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert results["execute"] == "int8_cpu"
    assert results["ppl"] == pytest.approx(results["ppl_fake_quantized"], rel=5e-3)
    spikes, fake_spikes = (
        results["spike_tokens_in_eval"],
        results["spike_tokens_in_eval_fake_quantized"],
    )
    assert spikes > 0 and fake_spikes > 0
    if not torch.cuda.is_available():  # both on the CPU: the same decisions
        assert spikes == fake_spikes
        assert (
            results["eval"]["window_spike_tokens"]
            == results["eval_fake_quantized"]["window_spike_tokens"]
        )
    wrong = run_app("iq-quantize", *TINY_RUN, "execute=int4_npu", cwd=tmp_path)
    assert wrong.returncode == 1
    assert "execute='int4_npu' is not an execution path" in wrong.stderr


def test_bf16_elsewhere_keeps_perplexity_and_the_checkpoint_weights(
    calibration, planted_windows, fake_quantized
):
    model, _ = quantized_on_cpu(calibration)
    q_proj = model.model.layers[0].self_attn.q_proj
    weight = q_proj.weight.detach().clone()
    to_int8_cpu(model, dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(q_proj.weight, weight)  # what save_pretrained writes
    with torch.no_grad():
        assert model(planted_windows).logits.dtype == torch.bfloat16
    ppl = perplexity(model, planted_windows, progress=False).ppl
    reference = perplexity(fake_quantized[0], planted_windows, progress=False).ppl
    assert ppl == pytest.approx(reference, rel=1e-2)


@pytest.mark.parametrize("native", [True, False])
def test_bf16_elsewhere_warns_where_the_cpu_computes_no_bf16(
    calibration, loguru_warnings, monkeypatch, native
):
    from iq_transform.kernels import int8_cpu

    monkeypatch.setattr(int8_cpu, "cpu_computes_bf16", lambda: native)
    model, _ = quantized_on_cpu(calibration)
    to_int8_cpu(model, dtype=torch.bfloat16)
    assert ("neither AVX-512 BF16 nor AMX" in loguru_warnings.text) != native
    # 8-bit weights: the halves, and a warning naming 7-bit weights, where the
    # CPU's GEMM saturates
    halves = "split in two halves" in loguru_warnings.text
    assert halves == u8_products_saturate()
    assert ("w7a8_static_spikefree" in loguru_warnings.text) == halves


def test_a_bf16_output_is_cast_from_float32_where_the_cpu_has_no_bf16(monkeypatch):
    """Without AVX-512 BF16 or AMX oneDNN writes a bf16 output only from its
    reference GEMM (thousands of times slower): the GEMM writes float32 there."""
    from iq_transform.kernels import int8_cpu

    monkeypatch.setattr(int8_cpu, "cpu_computes_bf16", lambda: False)
    torch.manual_seed(0)
    codes = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    scale = torch.rand(48) / 100
    x = torch.randn(7, 64)
    bf16 = Int8StaticLinear(None, 0.02, codes, scale, torch.bfloat16)
    fp32 = Int8StaticLinear(None, 0.02, codes, scale, torch.float32)
    assert bf16.gemm_dtype == torch.float32
    assert torch.equal(bf16(x), fp32(x).to(torch.bfloat16))


def _extreme_products(
    halves: bool | None, weight_bits: int = 8, rows: int = 5, small_rows: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(got, exact) for ``rows`` of activation codes at the ends of int8 and
    weight codes at the ends of ``weight_bits`` (with 8 bits every pair of u8 x s8
    products overflows 16 bits), in oneDNN's GEMM unless ``small_rows``."""
    torch.manual_seed(0)
    scale = 0.02
    high = 2 ** (weight_bits - 1) - 1
    signs = torch.randint(0, 2, (24, 64), dtype=torch.int8)
    weight_codes = signs * -(2 * high + 1) + high
    weight_scale = torch.rand(24) / 100 + 1e-3
    sign = torch.randint(0, 2, (rows, 64)) * 2 - 1
    x = sign * 1000 * scale  # quantized to 127 and -128, clamped
    kernel = Int8StaticLinear(
        None,
        scale,
        weight_codes,
        weight_scale,
        torch.float32,
        halves=halves,
        small_rows=small_rows,
    )
    codes = torch.where(sign > 0, 127, -128)
    exact = (codes.double() @ weight_codes.double().T) * scale * weight_scale
    return kernel(x.float()).double(), exact


def test_int8_products_are_exact_where_the_gemm_would_saturate():
    """Without VNNI, oneDNN's int8 GEMM adds pairs of u8 x s8 products in 16 bits
    and clips them: the codes split in two halves never overflow, on any CPU, and
    the kernel chooses them by itself where the CPU needs them."""
    got, exact = _extreme_products(halves=True)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    got, exact = _extreme_products(halves=None)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    got, exact = _extreme_products(halves=False)  # one u8 GEMM, as VNNI runs it
    assert torch.allclose(got, exact, rtol=1e-6, atol=0) != u8_products_saturate()


def test_7_bit_weights_make_one_exact_gemm_on_any_cpu():
    """Weight codes within -64..63 keep every pair of u8 x s8 products within 16
    bits (2 * 255 * -64 = -32,640), so the kernel runs the codes as they are,
    where 8-bit weights at the same ends need the halves."""
    got, exact = _extreme_products(halves=False, weight_bits=7)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    got, exact = _extreme_products(halves=None, weight_bits=7)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    codes = torch.tensor([[63, -64], [-64, 0]], dtype=torch.int8)
    kernel = Int8StaticLinear(None, 0.02, codes, torch.ones(2), torch.float32)
    assert kernel.halves is False
    codes[0, 0] = 65  # beyond 7 bits: the halves where the CPU saturates
    kernel = Int8StaticLinear(None, 0.02, codes, torch.ones(2), torch.float32)
    assert kernel.halves is u8_products_saturate()


def test_a_w7a8_model_runs_one_gemm_per_linear_with_its_fake_quantized_products(
    calibration, planted_windows, loguru_warnings
):
    model, _ = quantized_on_cpu(calibration, "w7a8_static")
    weights = model.model.layers[CARRIER_LAYER].mlp.down_proj.quantization_scheme
    assert weights.weights.num_bits == 7
    with torch.no_grad():
        expected = model(planted_windows).logits
    to_int8_cpu(model)
    kernels = executed_kernels(model)
    assert kernels and not any(kernel.halves for kernel in kernels)
    assert "halves" not in loguru_warnings.text
    assert_linears_compute_their_fake_quantized_products(model)
    with torch.no_grad():
        assert_follows(model(planted_windows).logits, expected)


@pytest.mark.parametrize("weight_bits", [7, 8])
@pytest.mark.parametrize("rows", [1, 8, SMALL_GEMM_ROWS, SMALL_GEMM_ROWS + 1])
def test_small_inputs_run_in_fbgemm_with_the_same_exact_products(weight_bits, rows):
    """Decode-sized inputs go to FBGEMM's static int8 linear (a fraction of
    oneDNN's per-call cost) wherever it does not saturate with the weights; larger
    ones, and weights it would saturate with, stay with oneDNN. Exact either way."""
    got, exact = _extreme_products(None, weight_bits, rows, SMALL_GEMM_ROWS)
    torch.testing.assert_close(got, exact, rtol=1e-6, atol=0)
    codes = torch.full((4, 8), 2 ** (weight_bits - 1) - 1, dtype=torch.int8)
    kernel = Int8StaticLinear(None, 0.02, codes, torch.ones(4), torch.float32)
    usable = fbgemm_available() and (weight_bits == 7 or not fbgemm_products_saturate())
    assert (kernel.small_packed is not None) == usable
    if usable:
        x = torch.randn(rows, 8)
        small = kernel(x)
        kernel.small_rows = 0  # the same kernel in oneDNN
        torch.testing.assert_close(small, kernel(x), rtol=1e-6, atol=1e-6)


def test_the_int8_gemm_is_a_fast_onednn_kernel_on_this_cpu():
    """oneDNN runs s8 activations only in its reference GEMM on CPUs without AMX
    (~4,000x slower on AVX-512 VNNI): the executed linears feed it u8 codes."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from iq_transform.kernels.int8_cpu import Int8StaticLinear\n"
        "linear = torch.nn.Linear(64, 96, bias=False)\n"
        "codes = torch.randint(-127, 128, (96, 64), dtype=torch.int8)\n"
        "kernel = Int8StaticLinear(linear.bias, 0.02, codes, torch.rand(96) / 100,"
        " torch.float32)\n"
        f"kernel(torch.randn({SMALL_GEMM_ROWS + 1}, 64))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    matmuls = [
        line.split(",")[6]
        for line in run.stdout.splitlines()
        if line.startswith("onednn_verbose") and ",exec,cpu,matmul," in line
    ]
    assert matmuls, run.stdout[-2000:]
    assert not any(name.startswith("ref") for name in matmuls), matmuls


def test_siblings_share_one_gemm_with_their_own_outputs(calibration, planted_windows):
    """q/k/v and gate/up read one norm's output with one input scale: one
    quantization and one GEMM serve them, every output bit for bit its own."""
    own, _ = quantized_on_cpu(calibration)
    to_int8_cpu(own, join_siblings=False)
    joined, _ = quantized_on_cpu(calibration)
    to_int8_cpu(joined)
    groups = {
        id(m.int8_kernel.group)
        for m in joined.modules()
        if hasattr(getattr(m, "int8_kernel", None), "group")
    }
    assert len(groups) == 6 * 2  # every layer's q/k/v and gate/up
    with torch.no_grad():
        expected = own(input_ids=planted_windows).logits
        got = joined(input_ids=planted_windows).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_sibling_product_is_made_anew_for_another_or_rewritten_input():
    from iq_transform.kernels.int8_cpu import _SiblingColumns

    torch.manual_seed(0)
    first, second = torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)
    weights = [
        (torch.randint(-127, 128, (n, 16), dtype=torch.int8), torch.rand(n) / 50)
        for n in (8, 4)
    ]
    group = Int8SiblingLinears([first, second], 0.05, weights, torch.float32)
    alone = [
        Int8StaticLinear(m.bias, 0.05, c, s, torch.float32)
        for m, (c, s) in zip((first, second), weights, strict=True)
    ]
    forwards = [_SiblingColumns(group, m) for m in (first, second)]
    x = torch.randn(3, 5, 16)
    assert torch.equal(forwards[0](x), alone[0](x))
    x.mul_(2)  # written in place after the product was made: made anew
    assert torch.equal(forwards[1](x), alone[1](x))
    y = torch.randn(3, 5, 16)
    assert torch.equal(forwards[0](y), alone[0](y))
    assert torch.equal(forwards[0](y), alone[0](y))  # asked twice: made anew
    assert torch.equal(forwards[1](x), alone[1](x))


def test_siblings_behind_an_input_rotation_keep_their_own_gemms(calibration):
    model, _ = quantized_on_cpu(calibration)
    q_proj = get_runtime(model).layers[0].layer.self_attn.q_proj
    q_proj.register_forward_pre_hook(lambda module, args: None)
    to_int8_cpu(model)
    assert isinstance(q_proj.int8_kernel, Int8StaticLinear)


def _executed_quip(calibration, join_siblings: bool = True, structured: bool = True):
    """W8A8 static + SpikeFree behind QuIP's online rotations (GPTQ), on the CPU,
    executed with its rotations by their Kronecker factors (the toy's 64 and 128
    features are below the width where they pay, so they are asked for here) or,
    not ``structured``, by the transforms' own dense products."""
    model, tokenizer = quantized("w8a8_static", "quip_gptq", calibration)
    move_model(model, "cpu")
    with pytest.MonkeyPatch.context() as patch:
        if structured:
            patch.setattr(rotations, "STRUCTURED_FROM", 0)
        return to_int8_cpu(model, join_siblings=join_siblings), tokenizer


@pytest.fixture(scope="module")
def quip(calibration):
    fake, tokenizer = quantized("w8a8_static", "quip_gptq", calibration)
    return move_model(fake, "cpu"), _executed_quip(calibration)[0], tokenizer


def test_online_rotations_run_in_the_kernels_once_per_input(quip):
    _, executed, _ = quip
    linears = [m for m in executed.modules() if hasattr(m, "int8_kernel")]
    assert len(linears) == 6 * 7
    runtime_hooks = get_runtime(executed).hook_ids()
    for module in linears:
        # the rotation left its hook (the transform module stays, to be saved);
        # down_proj keeps the runtime's, which acts on the unrotated input
        assert not input_changing_hooks(module, besides=runtime_hooks)
        assert input_rotation(module) is not None
        assert isinstance(kernel_of(module).rotate, KroneckerRotation)
    groups = {
        id(m.int8_kernel.group) for m in linears if hasattr(m.int8_kernel, "group")
    }
    assert len(groups) == 6 * 2  # q/k/v and gate/up: one rotation, one GEMM


def test_executed_rotations_follow_the_fake_quantized_model(
    quip, planted_windows, calibration
):
    fake, executed, tokenizer = quip
    with torch.no_grad():
        got = executed(planted_windows).logits
        expected = fake(planted_windows).logits
    assert_follows(got, expected)
    ppl = perplexity(executed, planted_windows, progress=False).ppl
    reference = perplexity(fake, planted_windows, progress=False).ppl
    assert ppl == pytest.approx(reference, rel=5e-3)
    assert torch.equal(greedy(executed, tokenizer), greedy(fake, tokenizer))
    apart, _ = _executed_quip(calibration, join_siblings=False)
    with torch.no_grad():
        alone = apart(planted_windows).logits
    torch.testing.assert_close(got, alone, rtol=0, atol=0)
    # the narrow toy's own width: each rotation its transform's dense product,
    # moved into the kernel all the same
    dense, _ = _executed_quip(calibration, structured=False)
    for module in dense.modules():
        if hasattr(module, "int8_kernel"):
            # a transform (one of the equal ones, shared), not its factors
            assert type(kernel_of(module).rotate) is type(input_rotation(module))
    with torch.no_grad():
        assert_follows(dense(planted_windows).logits, expected)


def test_the_runtime_overhead_benchmark_times_the_executed_model(tmp_path):
    """``benchmarks/runtime_overhead.py --execute int8_cpu`` times the runtime in
    the model ``to_int8_cpu`` made right after oneshot: its linears run the int8
    kernels, and only the installed runtime hooks modules (oneshot's onload hooks
    went with its dispatch)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    output = tmp_path / "overhead.json"
    command = [
        *(sys.executable, "benchmarks/runtime_overhead.py", "--model", "tiny-planted"),
        *("--execute", "int8_cpu", "--shapes", "1x64", "--cached", "32"),
        *("--repeats", "1", "--output", str(output)),
    ]
    run = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(output.read_text())
    assert report["execute"] == "int8_cpu" and report["int8_linears"] == 6 * 7
    for row in report["rows"].values():
        assert row["hooked_calls_without"] == 0 < row["hooked_calls_with"]
        # the runtime's hooks were timed apart: they ran, inside the forward
        assert 0 < row["hook_s"] < row["with_s"]

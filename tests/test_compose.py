"""Config groups -> llm-compressor recipes, composed without running them."""

import itertools
from pathlib import Path

import pytest
from compressed_tensors.utils import match_modules_set
from hydra import compose, initialize_config_module
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import QuIPModifier
from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
from llmcompressor.recipe import Recipe
from omegaconf import OmegaConf

import iq_transform.cli.quantize  # noqa: F401  (registers the schemas)
from iq_transform import PrefixQuantModifier, SpikeFreeModifier
from iq_transform.composition.config import QuantConfig, StagesConfig, TransformConfig
from iq_transform.composition.pipeline import resolve_recipe
from iq_transform.composition.plan import TransformPlan
from iq_transform.composition.recipe import (
    ComposeError,
    check_group_size,
    compose_recipe,
    smoothquant_mappings,
)
from iq_transform.models.arch import GEMMA3, get_arch_spec

CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed_config(*overrides: str):
    with initialize_config_module(
        config_module="iq_transform.conf", version_base="1.3"
    ):
        config = compose(config_name="quantize", overrides=list(overrides))
    return OmegaConf.to_object(config)


def recipe_of(config, arch):
    return compose_recipe(config.quant, config.transform, config.stages, arch)


def test_groups_have_the_documented_options():
    assert options("quant") == sorted(
        [
            f"{fmt}_{mode}"
            for fmt in ("w8a8", "fp8", "w4a8", "w4a4")
            for mode in ("static", "dynamic")
        ]
        + ["w7a8_static"]  # one exact int8 GEMM on CPUs without VNNI
    )
    assert options("transform") == ["none", "prefix", "qfem", "spikefree"]
    assert options("stages") == sorted(
        ["rtn", "gptq", "smoothquant_rtn", "smoothquant_gptq", "quip_rtn", "quip_gptq"]
    )


def test_every_combination_composes(planted):
    arch = get_arch_spec(planted[0])
    spiky = "model.layers.1.mlp.down_proj"
    plan = TransformPlan(prefix_ids=[1, 13], unquantized=[spiky])
    combinations = itertools.product(
        options("quant"), options("transform"), options("stages")
    )
    for quant, transform, stages in combinations:
        config = composed_config(
            f"quant={quant}", f"transform={transform}", f"stages={stages}"
        )
        assert (config.quant.name, config.transform.name, config.stages.name) == (
            quant,
            transform,
            stages,
        )
        recipe = compose_recipe(
            config.quant, config.transform, config.stages, arch, plan
        )
        kinds = [type(m) for m in recipe]
        expected = [SpikeFreeModifier] if transform == "spikefree" else []
        expected += [PrefixQuantModifier] if transform == "prefix" else []
        expected += [SmoothQuantModifier] if stages.startswith("smoothquant") else []
        expected += [QuIPModifier] if stages.startswith("quip") else []
        expected += [GPTQModifier if stages.endswith("gptq") else QuantizationModifier]
        assert kinds == expected, (quant, transform, stages)
        scheme = recipe[-1].config_groups["group_0"]
        activations = scheme.input_activations
        assert activations.num_bits == (4 if "a4" in quant else 8)
        assert activations.dynamic is quant.endswith("dynamic")
        if quant.endswith("static"):
            assert activations.strategy == "tensor"
            assert activations.observer.startswith("spikefree_") is (
                transform in ("spikefree", "prefix")
            )
            # 4-bit static scales search clips far below llm-compressor's 0.8 x max
            wide_search = {"maxshrink": 0.9} if quant == "w4a4_static" else {}
            assert activations.observer_kwargs == wide_search
        else:
            assert activations.strategy == "token"
        weights = scheme.weights
        assert weights.num_bits == (int(quant[1]) if quant[0] == "w" else 8)
        assert weights.type == ("float" if quant.startswith("fp8") else "int")
        if quant.startswith("w4"):
            assert (weights.strategy, weights.group_size) == ("group", 128)
        assert (spiky in recipe[-1].ignore) is (transform == "qfem")
        if transform == "prefix":
            assert recipe[0].prefix_ids == [1, 13]
        # the whole chain serializes into recipe.yaml
        assert type(recipe[-1]).__name__ in Recipe.from_modifiers(recipe).yaml()


@pytest.mark.parametrize(
    ("recipe", "overrides"),
    [
        ("w8a8_static_spikefree", []),
        (
            "w4a4_static_spikefree_quip_gptq",
            ["quant=w4a4_static", "stages=quip_gptq", "quant.group_size=64"],
        ),
    ],
)
def test_runs_equal_their_recipe_yaml(planted, recipe, overrides):
    config = composed_config("model=tiny-planted", *overrides)
    assert config.recipe is None
    composed = recipe_of(config, get_arch_spec(planted[0]))
    path = resolve_recipe(recipe)
    reference = Recipe.create_instance(str(path)).modifiers
    assert [type(m) for m in composed] == [type(m) for m in reference]
    for ours, theirs in zip(composed, reference, strict=True):
        assert ours.model_dump(exclude={"group", "index"}) == theirs.model_dump(
            exclude={"group", "index"}
        )


@pytest.mark.parametrize(
    ("quant", "observer", "expected"),
    [
        ("w8a8_static", "minmax", "spikefree_minmax"),
        ("w8a8_static", "mse", "spikefree_mse"),
        ("fp8_static", "static_minmax", "spikefree_static_minmax"),
        ("w4a4_static", "spikefree_minmax", "spikefree_minmax"),
    ],
)
def test_spikefree_makes_static_observers_spike_free(quant, observer, expected):
    config = composed_config(f"quant={quant}", f"quant.observer={observer}")
    recipe = recipe_of(config, GEMMA3)
    assert isinstance(recipe[0], SpikeFreeModifier)
    activations = recipe[-1].config_groups["group_0"].input_activations
    assert activations.observer == expected
    plain = composed_config(
        f"quant={quant}", f"quant.observer={observer}", "transform=none"
    )
    assert (
        recipe_of(plain, GEMMA3)[-1].config_groups["group_0"].input_activations.observer
        == observer
    )


def test_unknown_or_unpaired_observers_are_named():
    with pytest.raises(ComposeError, match="no spike-free counterpart"):
        compose_recipe(
            QuantConfig(observer="memoryless_minmax"),
            TransformConfig(),
            StagesConfig(),
            GEMMA3,
        )
    with pytest.raises(ComposeError, match="Unknown observer 'nope'"):
        compose_recipe(
            QuantConfig(observer="nope"),
            TransformConfig(method="none"),
            StagesConfig(),
            GEMMA3,
        )
    with pytest.raises(ComposeError, match="stages.rotation='spin'"):
        compose_recipe(
            QuantConfig(), TransformConfig(), StagesConfig(rotation="spin"), GEMMA3
        )


def test_smoothquant_mappings_follow_the_arch(planted):
    model = planted[0]
    mappings = smoothquant_mappings(get_arch_spec(model))
    assert mappings[1][1] == r"re:.*post_attention_layernorm$"
    assert smoothquant_mappings(GEMMA3)[1] == [
        [r"re:.*mlp\.gate_proj$", r"re:.*mlp\.up_proj$"],
        r"re:.*pre_feedforward_layernorm$",
    ]
    layers = model.config.num_hidden_layers
    for mapping in mappings:
        matches = list(match_modules_set(model, [*mapping[0], mapping[1]]))
        assert len(matches) == layers  # one (linears, norm) set per decoder layer


def test_recipe_wins_over_the_groups():
    config = composed_config("recipe=w8a8_static", "quant=fp8_dynamic")
    assert config.recipe == "w8a8_static"
    assert config.recipe_label() == "w8a8_static"
    assert composed_config().recipe_label() == "w8a8_static+rtn+spikefree"


@pytest.mark.parametrize("experiment", ["ablation_w8a8", "ablation_w4"])
def test_ablation_presets_name_valid_options(experiment):
    with initialize_config_module(
        config_module="iq_transform.conf", version_base="1.3"
    ):
        raw = compose(
            config_name="quantize",
            overrides=[f"experiment={experiment}"],
            return_hydra_config=True,
        )
    params = raw.hydra.sweeper.params
    assert set(params) == {"model", "quant", "transform", "stages"}
    for group in ("quant", "transform", "stages"):
        for option in params[group].split(","):
            assert option in options(group), (experiment, group, option)


def test_group_size_must_split_every_linear(planted):
    model = planted[0]  # hidden size 64
    with pytest.raises(ComposeError, match=r"model\.layers\.0\.self_attn\.q_proj"):
        check_group_size(model, composed_config("quant=w4a8_static").quant)
    check_group_size(
        model, composed_config("quant=w4a4_dynamic", "quant.group_size=64").quant
    )
    check_group_size(
        model,
        composed_config("quant=w4a8_static", "quant.weight_strategy=channel").quant,
    )
    preset = composed_config("experiment=ablation_w4", "quant=w4a8_static")
    assert preset.quant.group_size == 64
    check_group_size(model, preset.quant)

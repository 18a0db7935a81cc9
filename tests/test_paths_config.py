"""Leaf names, path rules, and config validation."""

import re

import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcomp import paths
from jaxcomp.config import default_config, load_config_file, validate_config
from jaxcomp.prune.transform import prune_end_step
from jaxcomp.recipe import load_recipe

PARAMS = {
    "backbone": {
        "stem": {"conv": {"kernel": jnp.zeros((3, 3, 3, 8))}, "bn": {"scale": jnp.ones(8)}}
    },
    "heatmap": {"out": {"kernel": jnp.zeros((1, 1, 8, 3)), "bias": jnp.zeros(3)}},
}
PRUNE_LEVERS = tuple(
    f"{scope}_{steps}" for steps in (600, 3000) for scope in ("layer", "global", "lamp", "erk")
)


def test_leaf_names_join_key_paths():
    assert paths.leaf_names(PARAMS) == [
        "backbone/stem/bn/scale",
        "backbone/stem/conv/kernel",
        "heatmap/out/bias",
        "heatmap/out/kernel",
    ]
    assert paths.leaf_names([{"a": 1}, (2,)]) == ["0/a", "1/0"]


def test_first_matching_rule_wins_and_none_leaves_alone():
    values = paths.resolve_rules(
        PARAMS, [("heatmap/out/.*", None), (".*/kernel", 0.5), (".*", 0.0)]
    )
    assert values["backbone"]["stem"]["conv"]["kernel"] == 0.5
    assert values["backbone"]["stem"]["bn"]["scale"] == 0.0
    assert values["heatmap"]["out"]["kernel"] is None
    assert values["heatmap"]["out"]["bias"] is None


def test_rule_matching_nothing_is_reported():
    with pytest.raises(ValueError, match=r"rules matched no leaf: \['.*/kernal'\]"):
        paths.resolve_rules(PARAMS, [(".*/kernal", 0.5)])
    with pytest.warns(UserWarning, match="matched no leaf"):
        paths.resolve_rules(PARAMS, [(".*/kernal", 0.5)], on_unmatched="warn")


def test_bad_rules_name_the_rule():
    with pytest.raises(ValueError, match=r"rule 0 regex '\(' does not compile"):
        paths.resolve_rules(PARAMS, [("(", 1)])
    with pytest.raises(ValueError, match="rule 1 must be a \\(regex, value\\) pair"):
        paths.resolve_rules(PARAMS, [(".*", 1), ".*"])


# No deadline: a first call that compiles, or a busy machine, is not a failure.
@settings(deadline=None)
@given(st.lists(st.text(alphabet="abcnkt.*/()[]?+", max_size=8), max_size=4))
def test_rule_parser_gives_first_match_or_a_clear_error(patterns):
    rules = [(pattern, index) for index, pattern in enumerate(patterns)]
    try:
        compiled = [re.compile(pattern) for pattern in patterns]
    except re.error:
        with pytest.raises(ValueError, match="does not compile"):
            paths.resolve_rules(PARAMS, rules, on_unmatched="ignore")
        return
    values = paths.resolve_rules(PARAMS, rules, on_unmatched="ignore")
    flat = jax.tree_util.tree_flatten(values, is_leaf=lambda x: x is None)[0]
    for name, value in zip(paths.leaf_names(PARAMS), flat, strict=True):
        first = next((i for i, regex in enumerate(compiled) if regex.fullmatch(name)), None)
        assert value == first


def test_config_files_load_and_validate():
    for spec in [
        "configs/student.py",
        "configs/teacher.py",
        *(f"configs/demo.py:{stage}" for stage in load_recipe("configs/demo.py")[0]),
        *(f"configs/compress.py:{stage}" for stage in load_recipe("configs/compress.py")[0]),
        *(
            f"configs/compress_alone.py:{stage}"
            for stage in load_recipe("configs/compress_alone.py")[0]
        ),
        "configs/distill.py",
        "configs/distill.py:centernet_student_w035",
        "configs/student.py:centernet_student_w075",
        "configs/prune_magnitude.py",
        "configs/prune_magnitude.py:0.9",
        *(f"configs/prune_levers.py:{lever}" for lever in PRUNE_LEVERS),
        "configs/prune_levers.py:lamp_3000:0.9",
        "configs/prune_nm.py",
        "configs/prune_channels.py",
        "configs/ptq_int8.py",
        "configs/qat_int8.py",
        "configs/voc.py:teacher",
        "configs/coco.py:student",
    ]:
        validate_config(load_config_file(spec), device_count=1)


def test_prune_levers_share_one_budget_and_differ_in_scope():
    levers = {lever: load_config_file(f"configs/prune_levers.py:{lever}") for lever in PRUNE_LEVERS}
    assert levers["layer_600"] == load_config_file("configs/prune_magnitude.py")
    assert load_config_file("configs/prune_levers.py:erk_3000:0.9").prune.sparsity == 0.9
    budgets = {}
    for lever, config in levers.items():
        scope, steps = lever.split("_")
        assert config.prune.scope == scope
        if steps == "3000":
            assert (config.train.steps, prune_end_step(config)) == (3000, 2400)
        config.prune.scope = "layer"
        budget = budgets.setdefault(steps, config)
        assert config == budget, lever
    with pytest.raises(ValueError, match="unknown lever 'lamp'; configs/prune_levers.py has"):
        load_config_file("configs/prune_levers.py:lamp")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.name", "resnet50", "config.model.name='resnet50' is not a model"),
        ("model.depthwise_impl", "fast", "config.model.depthwise_impl='fast'"),
        ("model.dtype", "float16", r"config.model.dtype='float16'; use one of \('float32', "),
        ("data.image_size", 100, "multiple of 32.*try 96"),
        ("data.image_size", 0, "data.image_size must be a positive integer"),
        ("train.batch_size", 6, "train.batch_size=6 is not divisible by the 4 devices"),
        ("train.steps", -5, "train.steps must be a positive integer"),
        ("optim.learning_rate", 0.0, "learning_rate must be > 0"),
        ("optim.warmup_steps", 5000, "warmup_steps=5000 must be in"),
        ("loss.size_weight", -1.0, "config.loss.size_weight must be >= 0"),
        ("data.num_workers", -1, "num_workers must be >= 0"),
    ],
)
def test_invalid_configs_name_the_field(field, value, message):
    config = default_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config, device_count=4)


@pytest.mark.parametrize(
    "steps, begin_step, end_step, expected",
    [
        (1000, 0, None, 750),  # three quarters of training, leaving a quarter to fine-tune
        (10, 0, None, 7),  # rounded down
        (1000, 800, None, 801),  # a late start still prunes, over one step
        (1000, 0, 40, 40),  # an explicit end is kept
    ],
)
def test_prune_end_step_defaults_to_three_quarters_of_training(
    steps, begin_step, end_step, expected
):
    config = default_config()
    config.train.steps = steps
    config.prune.begin_step = begin_step
    config.prune.end_step = end_step
    assert prune_end_step(config) == expected


def test_recipe_configs_reject_unknown_stages():
    with pytest.raises(ValueError, match="unknown stage 'techer'; configs/demo.py has"):
        load_config_file("configs/demo.py:techer")


def test_role_configs_reject_unknown_roles():
    with pytest.raises(ValueError, match="must be one of \\['student', 'teacher'\\].*got 'techer'"):
        load_config_file("configs/voc.py:techer")

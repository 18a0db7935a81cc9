"""Bad inputs: each is refused with a message that names the field or example and the fix,
or handled and counted.

Every case carries the two sentences of its row in docs/bad_input.md's table
(`given`, `outcome`), so the table says what these tests check.
"""

import functools
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import app

from jaxcomp import cluster, paths, prune, quant, training
from jaxcomp.config import default_config, validate_config
from jaxcomp.data import pipeline
from jaxcomp.models import create_model

SIZE = 64
NUM_CLASSES = 3
MAX_OBJECTS = 4


class Refused(NamedTuple):
    """An input that must raise `error` with a message matching `match`."""

    id: str
    given: str
    outcome: str
    run: Callable[..., Any]
    error: type[Exception]
    match: str


def _cases(cases: list[Refused]) -> list:
    return [pytest.param(case, id=case.id) for case in cases]


# --- configs ---------------------------------------------------------------------------------


def _set(**fields: Any) -> Callable[[ml_collections.ConfigDict], None]:
    """A config mutation; `train__steps=5` sets config.train.steps."""

    def mutate(config: ml_collections.ConfigDict) -> None:
        for key, value in fields.items():
            section, name = key.split("__")
            config[section][name] = value

    return mutate


def _add_field(config: ml_collections.ConfigDict) -> None:
    config.train.setps = 100  # A typo of `steps` in a config file.


CONFIG_CASES = [
    Refused(
        "model_unknown",
        "`config.model.name='resnet50'`",
        "ValueError naming the field and listing the models",
        _set(model__name="resnet50"),
        ValueError,
        r"config\.model\.name='resnet50' is not a model; use one of \[",
    ),
    Refused(
        "batch_not_divisible_by_devices",
        "`config.train.batch_size=6` on 4 devices",
        "ValueError: not divisible by the 4 devices, use a multiple of 4",
        _set(train__batch_size=6),
        ValueError,
        r"config\.train\.batch_size=6 is not divisible by the 4 devices it is split over "
        r"\(config\.mesh\.batch_axes=\('data',\)\); use a multiple of 4",
    ),
    Refused(
        "eval_batch_not_divisible_by_devices",
        "`config.eval.batch_size=10` on 4 devices",
        "ValueError: not divisible by the 4 devices, use a multiple of 4",
        _set(eval__batch_size=10),
        ValueError,
        r"config\.eval\.batch_size=10 is not divisible by the 4 devices it is split over "
        r"\(config\.mesh\.batch_axes=\('data',\)\); use a multiple of 4",
    ),
    Refused(
        "mesh_not_the_device_count",
        "`config.mesh.axes=(('data', 3),)` on 4 devices",
        "ValueError: the mesh spans 3 devices of 4, make one size -1",
        _set(mesh__axes=(("data", 3),)),
        ValueError,
        r"config\.mesh\.axes \[\('data', 3\)\] spans 3 devices, but there are 4; "
        r"make one size -1 to take the rest",
    ),
    Refused(
        "steps_wrong_type",
        "`config.train.steps='100'` (a string)",
        "TypeError from ml_collections naming the field and the expected type",
        _set(train__steps="100"),
        TypeError,
        r"field 'steps'.*cannot be casted to type <class 'int'>",
    ),
    Refused(
        "batch_size_float",
        "`config.train.batch_size=8.0` (a float)",
        "TypeError from ml_collections naming the field and the expected type",
        _set(train__batch_size=8.0),
        TypeError,
        r"field 'batch_size'.*cannot be casted to type <class 'int'>",
    ),
    Refused(
        "steps_negative",
        "`config.train.steps=-5`",
        "ValueError: must be a positive integer",
        _set(train__steps=-5),
        ValueError,
        r"config\.train\.steps must be a positive integer, got -5",
    ),
    Refused(
        "image_size_not_multiple_of_32",
        "`config.data.image_size=100`",
        "ValueError: must be a multiple of 32, try 96",
        _set(data__image_size=100),
        ValueError,
        r"config\.data\.image_size must be a multiple of 32.*got 100; try 96",
    ),
    Refused(
        "learning_rate_zero",
        "`config.optim.learning_rate=0.0`",
        "ValueError: must be > 0",
        _set(optim__learning_rate=0.0),
        ValueError,
        r"config\.optim\.learning_rate must be > 0, got 0\.0",
    ),
    Refused(
        "warmup_longer_than_training",
        "`config.optim.warmup_steps=5000` with 3000 steps",
        "ValueError: must be in [0, config.train.steps)",
        _set(optim__warmup_steps=5000),
        ValueError,
        r"config\.optim\.warmup_steps=5000 must be in \[0, config\.train\.steps=3000\)",
    ),
    Refused(
        "loss_weight_negative",
        "`config.loss.size_weight=-1.0`",
        "ValueError: must be >= 0",
        _set(loss__size_weight=-1.0),
        ValueError,
        r"config\.loss\.size_weight must be >= 0, got -1\.0",
    ),
    Refused(
        "prune_method_unknown",
        "`config.prune.method='magnitude'` (a score, not a method)",
        "ValueError listing the methods",
        _set(prune__method="magnitude"),
        ValueError,
        r"config\.prune\.method='magnitude'; use one of \('none', 'unstructured', 'nm', ",
    ),
    Refused(
        "prune_score_unknown",
        "`config.prune.score='taylor'`",
        "ValueError listing the scores",
        _set(prune__score="taylor"),
        ValueError,
        r"config\.prune\.score='taylor'; use one of "
        r"\('magnitude', 'random', 'saliency', 'movement'\)",
    ),
    Refused(
        "prune_schedule_unknown",
        "`config.prune.schedule='cosine'`",
        "ValueError listing the schedules",
        _set(prune__schedule="cosine"),
        ValueError,
        r"config\.prune\.schedule='cosine'; use one of \('one_shot', 'iterative', 'polynomial'\)",
    ),
    Refused(
        "prune_sparsity_one",
        "`config.prune.sparsity=1.0` (everything pruned)",
        "ValueError: must be in [0, 1)",
        _set(prune__method="unstructured", prune__sparsity=1.0),
        ValueError,
        r"config\.prune\.sparsity must be in \[0, 1\), got 1\.0",
    ),
    Refused(
        "prune_schedule_ends_before_it_starts",
        "`config.prune.begin_step=800, end_step=400`",
        "ValueError: needs 0 <= begin_step < end_step <= config.train.steps",
        _set(prune__method="unstructured", prune__begin_step=800, prune__end_step=400),
        ValueError,
        r"begin_step=800 and end_step=400 must satisfy 0 <= begin_step < end_step",
    ),
    Refused(
        "nm_n_above_m",
        "`config.prune.n=4, m=2` (N:M)",
        "ValueError: N:M needs 0 < n <= m, e.g. n=2, m=4",
        _set(prune__method="nm", prune__n=4, prune__m=2),
        ValueError,
        r"config\.prune\.n=4, m=2: .*needs 0 < n <= m \(e\.g\. n=2, m=4\)",
    ),
    Refused(
        "quant_mode_unknown",
        "`config.quant.mode='int4'`",
        "ValueError listing the modes",
        _set(quant__mode="int4"),
        ValueError,
        r"config\.quant\.mode='int4'; use one of \('none', 'ptq', 'qat', 'lsq'\)",
    ),
    Refused(
        "quant_bits_out_of_range",
        "`config.quant.weight_bits=16`",
        "ValueError: must be an integer in [2, 8]",
        _set(quant__mode="qat", quant__weight_bits=16),
        ValueError,
        r"config\.quant\.weight_bits must be an integer in \[2, 8\], got 16",
    ),
    Refused(
        "ptq_without_trained_model",
        "`config.quant.mode='ptq'` without `config.init_from`",
        "ValueError: PTQ calibrates a trained model, set config.init_from",
        _set(quant__mode="ptq"),
        ValueError,
        r"mode='ptq' calibrates a trained model: set config\.init_from",
    ),
    Refused(
        "quant_freeze_after_end",
        "`config.quant.freeze_bn_step=5000` with 3000 steps",
        "ValueError: must be None or in [0, config.train.steps]",
        _set(quant__mode="qat", quant__freeze_bn_step=5000),
        ValueError,
        r"config\.quant\.freeze_bn_step=5000 must be None or in \[0, config\.train\.steps=3000\]",
    ),
    Refused(
        "none_for_a_number",
        "`config.train.eval_every=None`",
        "ValueError naming the field",
        _set(train__eval_every=None),
        ValueError,
        r"config\.train\.eval_every must be >= 0",
    ),
    Refused(
        "unknown_field",
        "`config.train.setps = 100` in a config file (a typo)",
        "ValueError naming the field and the closest one",
        _add_field,
        ValueError,
        r"config\.train\.setps is not a field.*config\.train\.steps",
    ),
]


@pytest.mark.parametrize("case", _cases(CONFIG_CASES))
def test_bad_config_is_refused(case):
    config = default_config()
    with pytest.raises(case.error, match=case.match):
        case.run(config)
        validate_config(config, device_count=4)


# --- command line --------------------------------------------------------------------------

CLI_CASES = [
    Refused(
        "cluster_flags_without_distributed",
        "`--coordinator_address=... --num_processes=2` without `--distributed`",
        "UsageError: they need --distributed (without it each host would train alone)",
        lambda: cluster.check_distributed_flags(False, "10.0.0.2:1234", 2, 0),
        app.UsageError,
        r"--coordinator_address, --num_processes, --process_id given without --distributed, "
        r"which they need: add --distributed",
    ),
    Refused(
        "coordinator_without_port",
        "`--coordinator_address=10.0.0.2` (no port)",
        "UsageError: must be host:port of process 0",
        lambda: cluster.check_distributed_flags(True, "10.0.0.2", 2, 0),
        app.UsageError,
        r"--coordinator_address must be host:port of process 0, got '10\.0\.0\.2'",
    ),
    Refused(
        "process_id_out_of_range",
        "`--process_id=2 --num_processes=2`",
        "UsageError: must be in [0, --num_processes), number the processes from 0",
        lambda: cluster.check_distributed_flags(True, "10.0.0.2:1234", 2, 2),
        app.UsageError,
        r"--process_id must be in \[0, --num_processes=2\), got 2; number the processes 0",
    ),
    Refused(
        "no_processes",
        "`--num_processes=0`",
        "UsageError: must be >= 1",
        lambda: cluster.check_distributed_flags(True, "10.0.0.2:1234", 0, None),
        app.UsageError,
        r"--num_processes must be >= 1, got 0",
    ),
]


@pytest.mark.parametrize("case", _cases(CLI_CASES))
def test_bad_cluster_flags_are_refused(case):
    with pytest.raises(case.error, match=case.match):
        case.run()


def test_good_cluster_flags_pass():
    cluster.check_distributed_flags(False, None, None, None)
    cluster.check_distributed_flags(True, None, None, None)  # TPU VMs, SLURM: auto-detected
    cluster.check_distributed_flags(True, "localhost:1234", 2, 1)


# --- rules, masks and quantization -----------------------------------------------------------

PARAMS = {
    "conv": {"kernel": jnp.arange(48.0).reshape(3, 2, 2, 4) - 20.0, "bias": jnp.zeros(4)},
    "dense": {"kernel": jnp.arange(24.0).reshape(6, 4) - 12.0},
}


def _masks() -> Any:
    return prune.magnitude_masks(PARAMS, 0.5)


TRANSFORM_CASES = [
    Refused(
        "sparsity_one",
        "`prune.magnitude_masks(params, 1.0)`",
        "ValueError: sparsity must be in [0, 1)",
        lambda: prune.magnitude_masks(PARAMS, 1.0),
        ValueError,
        r"sparsity must be in \[0, 1\), got 1\.0",
    ),
    Refused(
        "sparsity_nan",
        "a NaN sparsity",
        "ValueError: sparsity must be in [0, 1)",
        lambda: prune.magnitude_masks(PARAMS, float("nan")),
        ValueError,
        r"sparsity must be in \[0, 1\), got nan",
    ),
    Refused(
        "rule_sparsity_one",
        "a rule `('conv/kernel', 1.0)`",
        "ValueError naming the rule",
        lambda: prune.magnitude_masks(PARAMS, [("conv/kernel", 1.0)]),
        ValueError,
        r"rule 0 \('conv/kernel'\) sparsity must be in \[0, 1\), got 1\.0",
    ),
    Refused(
        "prune_rule_matches_nothing",
        "a prune rule `('.*/kernal', 0.5)` matching no leaf",
        "ValueError listing the rule and example leaf names",
        lambda: prune.magnitude_masks(PARAMS, [(".*/kernal", 0.5)]),
        ValueError,
        r"rules matched no leaf: \['\.\*/kernal'\]; leaf names look like \['conv/bias'",
    ),
    Refused(
        "rule_regex_does_not_compile",
        "a rule regex `'conv/(kernel'`",
        "ValueError naming the rule and the regex error",
        lambda: prune.magnitude_masks(PARAMS, [("conv/(kernel", 0.5)]),
        ValueError,
        r"rule 0 regex 'conv/\(kernel' does not compile: missing \)",
    ),
    Refused(
        "rule_regex_repeat_too_large",
        "a rule regex `'a{99999999999}'`",
        "ValueError naming the rule (before: OverflowError)",
        lambda: paths.resolve_rules(PARAMS, [("conv/.*", 0.5), ("a{99999999999}", 0.5)]),
        ValueError,
        r"rule 1 regex 'a\{99999999999\}' does not compile: the repetition number is too large",
    ),
    Refused(
        "rules_as_string",
        "rules given as one string `'.*/kernel'`",
        "ValueError: rules must be a list of (regex, value) pairs",
        lambda: paths.resolve_rules(PARAMS, ".*/kernel"),
        ValueError,
        r"rules must be a list of \(regex, value\) pairs such as \[\(r'\.\*/kernel', 0\.5\)\]",
    ),
    Refused(
        "rules_as_dict",
        "rules given as a dict `{'.*/kernel': 0.5}`",
        "ValueError: rules must be a list of pairs; pass list(rules.items())",
        lambda: paths.resolve_rules(PARAMS, {".*/kernel": 0.5}),
        ValueError,
        r"got dict .*; pass list\(rules\.items\(\)\)",
    ),
    Refused(
        "rule_not_a_pair",
        "a rule that is not a pair, `'.*'`",
        "ValueError naming the rule",
        lambda: paths.resolve_rules(PARAMS, [(".*", 1), ".*"]),
        ValueError,
        r"rule 1 must be a \(regex, value\) pair, got '\.\*'",
    ),
    Refused(
        "prune_method_unknown_in_api",
        "`magnitude_masks(..., method='structured')`",
        "ValueError listing the methods",
        lambda: prune.magnitude_masks(PARAMS, 0.5, method="structured"),
        ValueError,
        r"unknown method 'structured'; valid values are \['unstructured', 'nm', 'channel'\]",
    ),
    Refused(
        "prune_score_unknown_in_api",
        "`make_pruner(..., score='taylor')`",
        "ValueError listing the scores",
        lambda: prune.make_pruner(0.5, prune.one_shot_schedule(0.5), score="taylor"),
        ValueError,
        r"unknown score 'taylor'; valid scores are "
        r"\['magnitude', 'movement', 'random', 'saliency'\]",
    ),
    Refused(
        "nm_axis_not_divisible",
        "2:4 sparsity on a kernel with 6 input channels",
        "ValueError naming the leaf and a rule that leaves it alone",
        lambda: prune.magnitude_masks(PARAMS, [("dense/kernel", 0.5)], method="nm"),
        ValueError,
        r"leaf 'dense/kernel' of shape \(6, 4\) to be divisible by 4.*leave such leaves alone",
    ),
    Refused(
        "mask_missing_a_leaf",
        "masks without a leaf that params have",
        "ValueError naming the first differing leaf; build masks from these params",
        lambda: prune.apply_masks(PARAMS, {"conv": _masks()["conv"]}),
        ValueError,
        r"first difference at params leaf 'dense/kernel' vs masks leaf None; build masks",
    ),
    Refused(
        "mask_other_container",
        "masks holding a list where params hold a dict",
        "ValueError naming the first differing leaf",
        lambda: prune.apply_masks(PARAMS, {**_masks(), "dense": [_masks()["dense"]["kernel"]]}),
        ValueError,
        r"first difference at params leaf 'dense/kernel' vs masks leaf 'dense/0'",
    ),
    Refused(
        "mask_wrong_shape",
        "a mask of shape (4, 6) for a (6, 4) kernel",
        "ValueError naming the leaf and both shapes",
        lambda: prune.apply_masks(
            PARAMS, {**_masks(), "dense": {"kernel": jnp.ones((4, 6), bool)}}
        ),
        ValueError,
        r"mask for leaf 'dense/kernel' has shape \(4, 6\) but the leaf has shape \(6, 4\)",
    ),
    Refused(
        "mask_float_dtype",
        "float masks instead of bool",
        "ValueError naming the leaf: use bool",
        lambda: prune.apply_masks(PARAMS, jax.tree.map(lambda m: m.astype(jnp.float32), _masks())),
        ValueError,
        r"mask for leaf 'conv/bias' has dtype float32; use bool",
    ),
    Refused(
        "quant_rule_matches_nothing",
        "a quantization rule `('convv', True)` matching no layer",
        "ValueError listing the rule",
        lambda: quant.quantized_layers(PARAMS, quant.QuantConfig(rules=(("convv", True),))),
        ValueError,
        r"rules matched no leaf: \['\(\?:convv\)/kernel'\]",
    ),
    Refused(
        "quant_rule_value",
        "a quantization rule value `0.5`",
        "ValueError: rule values must be True or None",
        lambda: quant.QuantConfig(rules=((".*", 0.5),)),
        ValueError,
        r"rule values must be True \(quantize\) or None \(keep float\), got 0\.5 for '\.\*'",
    ),
    Refused(
        "quant_selects_a_bias",
        "weight fake-quant rules selecting a bias",
        "ValueError naming the leaf: select kernels only",
        lambda: quant.fake_quant_weights(PARAMS, [(".*", True)]),
        ValueError,
        r"selected conv/bias of shape \(4,\).*rules must select float kernels",
    ),
    Refused(
        "quant_bits_field",
        "`QuantConfig(weight_bits=16)`",
        "ValueError naming weight_bits",
        lambda: quant.QuantConfig(weight_bits=16),
        ValueError,
        r"weight_bits must be an int in \[2, 8\], got 16",
    ),
    Refused(
        "observer_never_updated",
        "serving an activation observer that saw no batch",
        "ValueError naming the layer: run calibration first",
        lambda: quant.observer_qparams(quant.init_observer(), name="backbone/stem/conv"),
        ValueError,
        r"observer for backbone/stem/conv was never updated: run calibration first",
    ),
    Refused(
        "observer_saw_nan",
        "an activation observer that saw NaN",
        "ValueError naming the layer: fix the model or data, recalibrate",
        lambda: quant.observer_qparams(
            quant.observe(quant.init_observer(), jnp.array([1.0, jnp.nan])), name="neck/up"
        ),
        ValueError,
        r"observer for neck/up holds a non-finite range.*recalibrate",
    ),
    Refused(
        "fake_quant_zero_scale",
        "`quant.fake_quant` with scale 0",
        "ValueError: scale must be finite and > 0; derive it with scale_and_zero_point",
        lambda: quant.fake_quant(jnp.ones(3), 0.0, 0, -128, 127),
        ValueError,
        r"scale must be finite and > 0, got 0\.0; derive it with scale_and_zero_point",
    ),
]


@pytest.mark.parametrize("case", _cases(TRANSFORM_CASES))
def test_bad_transform_input_is_refused(case):
    with pytest.raises(case.error, match=case.match):
        case.run()


@pytest.mark.parametrize("value", [0.7, -3.0, 0.0])
def test_quantizing_a_constant_tensor_is_finite_and_exact(value):
    kernel = jnp.full((3, 3, 2, 4), value)
    quantized = quant.fake_quant_weights({"c": {"kernel": kernel}}, [(".*kernel", True)])
    np.testing.assert_allclose(quantized["c"]["kernel"], kernel, rtol=1e-6)
    grad = jax.grad(
        lambda k: quant.fake_quant_weights({"c": {"kernel": k}}, [(".*", True)])["c"][
            "kernel"
        ].sum()
    )(kernel)
    assert np.all(np.isfinite(grad))
    activations = jnp.full((5,), value)
    observed = quant.observe(quant.init_observer(), activations)
    output = quant.fake_quant(activations, *quant.observer_qparams(observed))
    assert np.all(np.isfinite(output))
    np.testing.assert_allclose(output, activations, atol=abs(value) / 127 + 1e-6)


# --- datasets --------------------------------------------------------------------------------


def _example(image=None, bboxes=((0.1, 0.1, 0.9, 0.9),), labels=(1,), **extra) -> dict:
    image = np.full((20, 30, 3), 200, np.uint8) if image is None else image
    bboxes = np.asarray(bboxes, np.float32) if not isinstance(bboxes, np.ndarray) else bboxes
    return {"image": image, "objects": {"bbox": bboxes, "label": np.asarray(labels)}, **extra}


def _batch(source: list, augment: bool = False) -> dict[str, np.ndarray]:
    dataset = pipeline.train_dataset(
        source,
        image_size=SIZE,
        global_batch_size=1,
        max_objects=MAX_OBJECTS,
        num_classes=NUM_CLASSES,
        seed=0,
        augment=augment,
    )
    return dataset[0]


def _eval_batches(source: list) -> list:
    return list(
        pipeline.eval_batches(
            source,
            image_size=SIZE,
            batch_size=2,
            max_objects=MAX_OBJECTS,
            num_classes=NUM_CLASSES,
        )
    )


DATA_REFUSED = [
    Refused(
        "image_five_channels",
        "an image of shape [H, W, 5]",
        "ValueError naming the example (index and image/id): fix or remove it",
        lambda: _batch([_example(np.zeros((20, 30, 5), np.uint8), **{"image/id": 17})]),
        ValueError,
        r"example 0 \(image/id 17\) of the split: images must be .*C in 1-4.*fix or remove",
    ),
    Refused(
        "image_float",
        "a float32 image",
        "ValueError naming the example: decode the image feature as uint8",
        lambda: _batch([_example(np.zeros((20, 30, 3), np.float32))]),
        ValueError,
        r"example 0 of the split: images must be uint8, got float32; decode",
    ),
    Refused(
        "image_empty",
        "an image with 0 rows",
        "ValueError naming the example (before: ZeroDivisionError)",
        lambda: _batch([_example(np.zeros((0, 30, 3), np.uint8))]),
        ValueError,
        r"example 0 of the split: the image is empty \(shape \(0, 30, 3\)\); fix or remove",
    ),
    Refused(
        "image_missing",
        "an example without `image`",
        "ValueError naming the example and the expected layout",
        lambda: _batch([{"objects": {"bbox": np.zeros((0, 4)), "label": []}}]),
        ValueError,
        r"example 0 of the split: example has no 'image' \(keys: \['objects'\]\)",
    ),
    Refused(
        "objects_missing",
        "an example without `objects/bbox`",
        "ValueError naming the example and the expected layout",
        lambda: _batch([{"image": np.zeros((8, 8, 3), np.uint8)}]),
        ValueError,
        r"example 0 of the split: example has no objects/bbox and objects/label",
    ),
    Refused(
        "boxes_wrong_shape",
        "`objects/bbox` of shape [N, 3]",
        "ValueError naming the example: boxes must be [N, 4]",
        lambda: _batch([_example(bboxes=np.zeros((2, 3), np.float32), labels=(0, 1))]),
        ValueError,
        r"example 0 of the split: bboxes must have shape \[N, 4\], got \(2, 3\)",
    ),
    Refused(
        "labels_not_numbers",
        "string labels",
        "ValueError naming the example: labels must be integer class ids",
        lambda: _batch([_example(labels=("cat",))]),
        ValueError,
        r"example 0 of the split: labels must be integer class ids, got dtype <U3",
    ),
    Refused(
        "eval_example_broken",
        "a broken example in the eval split",
        "ValueError naming its index",
        lambda: _eval_batches([_example(), _example(np.zeros((4, 4, 7), np.uint8))]),
        ValueError,
        r"example 1 of the split: images must be",
    ),
    Refused(
        "dataset_report_broken_example",
        "`dataset_report` over a split with a broken example",
        "ValueError naming its index",
        lambda: pipeline.dataset_report([_example(), _example(), {"image": 0}], 3, 4),
        ValueError,
        r"example 2 of the split: images must be uint8",
    ),
    Refused(
        "split_empty",
        "an empty split",
        "ValueError: check config.data.train_split / eval_split",
        lambda: _batch([]),
        ValueError,
        r"the split has no examples; check config\.data\.train_split / eval_split",
    ),
    Refused(
        "dataset_unknown",
        "`config.data.name='vocc/2007'`",
        "ValueError: not a TFDS dataset, did you mean ['voc'] (before: TFDS's list of 250 names)",
        lambda: pipeline.get_builder("vocc/2007", data_dir="/nonexistent"),
        ValueError,
        r"dataset 'vocc/2007' \(config\.data\.name\) is not a TFDS dataset \(did you mean "
        r"\['voc'\]\?\); jaxcomp reads",
    ),
    Refused(
        "embedded_config_unknown",
        "`config.data.name='jaxcomp_embedded/huge'`",
        "ValueError listing the embedded configs",
        lambda: pipeline.get_builder("jaxcomp_embedded/huge", data_dir="/nonexistent"),
        ValueError,
        r"jaxcomp_embedded has no config 'huge'; use one of \['default', 'tiny'\]",
    ),
]


@pytest.mark.parametrize("case", _cases(DATA_REFUSED))
def test_bad_example_is_refused_naming_it(case):
    with pytest.raises(case.error, match=case.match):
        case.run()


def test_unknown_split_names_the_splits(tiny_data_dir):
    builder = pipeline.get_builder("jaxcomp_embedded/tiny", data_dir=tiny_data_dir)
    with pytest.raises(ValueError, match=r"Unknown split 'trian'\. Should be one of"):
        builder.as_data_source("trian")


class Handled(NamedTuple):
    """An example the pipeline repairs or drops, counting what it did."""

    id: str
    given: str
    outcome: str
    example: dict
    counts: dict[str, int]  # sanitize_example counts that must be non-zero (others 0)
    num_objects: int  # objects left in the batch row


def _objects(count: int) -> dict:
    sides = np.linspace(0.2, 0.9, count, dtype=np.float32)
    bboxes = np.stack([np.zeros(count), np.zeros(count), sides, sides], axis=1)
    return _example(bboxes=bboxes.astype(np.float32), labels=np.arange(count) % NUM_CLASSES)


DATA_HANDLED = [
    Handled(
        "image_grey",
        "a grey image [H, W]",
        "converted to RGB, trained on",
        _example(np.full((20, 30), 200, np.uint8)),
        {"kept": 1},
        1,
    ),
    Handled(
        "image_grey_alpha",
        "a grey+alpha image [H, W, 2]",
        "alpha dropped, converted to RGB",
        _example(np.full((20, 30, 2), 200, np.uint8)),
        {"kept": 1},
        1,
    ),
    Handled(
        "image_rgba",
        "an RGBA image",
        "alpha dropped",
        _example(np.full((20, 30, 4), 200, np.uint8)),
        {"kept": 1},
        1,
    ),
    Handled(
        "image_one_pixel",
        "a 1x1 image",
        "letterboxed to the input size",
        _example(np.full((1, 1, 3), 200, np.uint8), bboxes=((0, 0, 1, 1),)),
        {"kept": 1},
        1,
    ),
    Handled(
        "image_thin_strip",
        "a 3x500 image",
        "letterboxed (one row high), box kept",
        _example(np.full((3, 500, 3), 200, np.uint8), bboxes=((0, 0.2, 1, 0.8),)),
        {"kept": 1},
        1,
    ),
    Handled(
        "box_inverted",
        "a box with ymin > ymax",
        "corners swapped; counted `swapped`",
        _example(bboxes=((0.6, 0.1, 0.2, 0.5),)),
        {"swapped": 1, "fixed": 1, "kept": 1},
        1,
    ),
    Handled(
        "box_partly_outside",
        "a box reaching outside the image",
        "clipped to the image; counted `clipped`",
        _example(bboxes=((-0.2, 0.5, 0.5, 1.3),)),
        {"clipped": 1, "fixed": 1, "kept": 1},
        1,
    ),
    Handled(
        "box_outside",
        "a box entirely outside the image",
        "dropped; counted `outside`",
        _example(bboxes=((1.2, 0.1, 1.5, 0.5),)),
        {"outside": 1, "background": 1},
        0,
    ),
    Handled(
        "box_degenerate",
        "a box of zero height",
        "dropped; counted `degenerate`",
        _example(bboxes=((0.3, 0.1, 0.3, 0.5),)),
        {"degenerate": 1, "background": 1},
        0,
    ),
    Handled(
        "box_nan",
        "a NaN coordinate",
        "dropped; counted `non_finite`",
        _example(bboxes=((np.nan, 0.1, 0.5, 0.5), (0.1, 0.1, 0.5, 0.5)), labels=(0, 1)),
        {"non_finite": 1, "kept": 1},
        1,
    ),
    Handled(
        "box_inf",
        "an infinite coordinate",
        "dropped; counted `non_finite`",
        _example(bboxes=((0.1, -np.inf, 0.5, 0.5),)),
        {"non_finite": 1, "background": 1},
        0,
    ),
    Handled(
        "label_too_large",
        "label 3 with 3 classes",
        "dropped; counted `bad_label`",
        _example(labels=(3,)),
        {"bad_label": 1, "background": 1},
        0,
    ),
    Handled(
        "label_negative",
        "label -1",
        "dropped; counted `bad_label`",
        _example(labels=(-1,)),
        {"bad_label": 1, "background": 1},
        0,
    ),
    Handled(
        "label_fractional",
        "label 1.5",
        "dropped; counted `bad_label`",
        _example(labels=(1.5,)),
        {"bad_label": 1, "background": 1},
        0,
    ),
    Handled(
        "labels_more_than_boxes",
        "2 labels for 1 box",
        "the extra label dropped; counted `mismatched`",
        _example(labels=(1, 2)),
        {"mismatched": 1, "kept": 1},
        1,
    ),
    Handled(
        "no_objects",
        "an image without objects",
        "kept as a background image; counted `background`",
        _example(bboxes=np.zeros((0, 4), np.float32), labels=()),
        {"background": 1},
        0,
    ),
    Handled(
        "too_many_objects",
        "6 objects with `data.max_objects=4`",
        "the 4 largest kept; `num_truncated` 2",
        _objects(6),
        {"kept": 6},
        MAX_OBJECTS,
    ),
]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in DATA_HANDLED])
def test_bad_example_is_handled_and_counted(case):
    objects = case.example["objects"]
    _, _, counts = pipeline.sanitize_example(objects["bbox"], objects["label"], NUM_CLASSES)
    assert {key: value for key, value in counts.items() if value} == case.counts
    for augment in (False, True):
        batch = _batch([case.example], augment=augment)
        assert batch["image"].shape == (1, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        mask = batch["box_mask"][0]
        assert batch["num_bad_boxes"][0] == pipeline.num_bad_boxes(counts)
        assert mask.sum() + batch["num_truncated"][0] + batch["num_cropped"][0] == counts["kept"]
        boxes = batch["boxes"][0][mask]
        assert np.all((boxes >= 0) & (boxes <= SIZE)) and np.all(boxes[:, 2:] > boxes[:, :2])
        assert np.all((batch["labels"][0][mask] >= 0) & (batch["labels"][0][mask] < NUM_CLASSES))
        targets = training.batch_targets(batch, NUM_CLASSES)
        assert all(np.all(np.isfinite(value)) for value in targets.values())
        if not augment:  # letterboxed: nothing is cropped away
            assert mask.sum() == case.num_objects


# --- checkpoints -----------------------------------------------------------------------------


@functools.cache
def _abstract_variables(model_name: str, num_classes: int) -> dict:
    return training.abstract_variables(create_model(model_name, num_classes=num_classes), SIZE)


def _zeros(tree: Any) -> Any:
    return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), tree)


def _write_checkpoint(workdir, items: dict) -> None:
    """An orbax checkpoint laid out as `training.save_checkpoint` writes it."""
    with ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(create=True)
    ) as manager:
        manager.save(0, args=ocp.args.StandardSave({"step": np.int32(0), **items}))
        manager.wait_until_finished()


def _tiny_variables(num_classes: int = NUM_CLASSES) -> dict:
    return _zeros(dict(_abstract_variables("centernet_tiny", num_classes)))


def _restore_tiny(workdir, num_classes: int = NUM_CLASSES) -> dict:
    return training.restore_variables(
        str(workdir), _abstract_variables("centernet_tiny", num_classes)
    )


def _missing_dir(tmp_path):
    return _restore_tiny(tmp_path / "never_trained")


def _empty_dir(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    return _restore_tiny(tmp_path)


def _other_model(tmp_path):
    _write_checkpoint(tmp_path, _tiny_variables())
    return training.restore_variables(
        str(tmp_path), _abstract_variables("centernet_student", NUM_CLASSES)
    )


def _other_num_classes(tmp_path):
    _write_checkpoint(tmp_path, _tiny_variables(NUM_CLASSES))
    return _restore_tiny(tmp_path, num_classes=5)


def _no_batch_stats(tmp_path):
    _write_checkpoint(tmp_path, {"params": _tiny_variables()["params"]})
    return _restore_tiny(tmp_path)


def _unfinished_run(tmp_path):
    """A workdir whose config.json (as training writes it) asks for more steps than it has."""
    config = default_config()
    config.train.steps = 100
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    _write_checkpoint(tmp_path, _tiny_variables())
    return _restore_tiny(tmp_path)


def _resume_other_model(tmp_path):
    """Resuming a workdir after config.model.name changed."""
    config = default_config()
    optimizer = training.make_optimizer(config.optim, 10)

    def state(model_name):
        model = create_model(model_name, num_classes=NUM_CLASSES)
        abstract = jax.eval_shape(
            functools.partial(training.create_train_state, model, optimizer, SIZE),
            jax.random.key(0),
        )
        return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), abstract)

    with training.checkpoint_manager(str(tmp_path), config.train) as manager:
        training.save_checkpoint(manager, state("centernet_tiny"))
    with training.checkpoint_manager(str(tmp_path), config.train) as manager:
        return training.restore_latest(manager, state("centernet_student"))


CHECKPOINT_CASES = [
    Refused(
        "init_from_missing",
        "`config.init_from` naming a directory that does not exist",
        "FileNotFoundError naming the field: train that model first",
        _missing_dir,
        FileNotFoundError,
        r"config\.init_from='.*never_trained' holds no checkpoint.*train that model first",
    ),
    Refused(
        "init_from_without_checkpoints",
        "`config.init_from` naming a workdir without checkpoints",
        "FileNotFoundError naming the field and where it looked: train that model first",
        _empty_dir,
        FileNotFoundError,
        r"holds no checkpoint \(looked in .*checkpoints\); train that model first",
    ),
    Refused(
        "init_from_other_model",
        "`config.init_from` holding another model (tiny into student)",
        "ValueError listing missing/unexpected leaves: point init_from at the same model",
        _other_model,
        ValueError,
        r"\(config\.init_from\) does not fit config\.model\.name: missing \[.*block_10.*"
        r"a run of the same model",
    ),
    Refused(
        "init_from_other_shapes",
        "`config.init_from` holding the model for another number of classes",
        "ValueError listing the leaves whose shapes differ",
        _other_num_classes,
        ValueError,
        r"shapes \[.*heatmap/out/.*\(3,\) != \(5,\)",
    ),
    Refused(
        "init_from_without_batch_stats",
        "`config.init_from` holding a checkpoint without `batch_stats`",
        "ValueError naming the missing item",
        _no_batch_stats,
        ValueError,
        r"\(config\.init_from\) has no \['batch_stats'\]",
    ),
    Refused(
        "init_from_unfinished_run",
        "`config.init_from` naming a run stopped (or still training) before its steps",
        "ValueError giving the step reached: finish that run first",
        _unfinished_run,
        ValueError,
        r"init_from=.* is an unfinished run: its newest checkpoint is step 0 of the 100",
    ),
    Refused(
        "resume_with_other_model",
        "resuming a workdir after changing `config.model.name`",
        "ValueError naming the workdir: use a new --workdir or the original config",
        _resume_other_model,
        ValueError,
        r"does not fit .*new --workdir",
    ),
]


@pytest.mark.parametrize("case", _cases(CHECKPOINT_CASES))
def test_bad_checkpoint_is_refused(case, tmp_path):
    with pytest.raises(case.error, match=case.match):
        case.run(tmp_path)


ALL_CASES = (
    CONFIG_CASES,
    CLI_CASES,
    TRANSFORM_CASES,
    DATA_REFUSED,
    DATA_HANDLED,
    CHECKPOINT_CASES,
)


def test_every_case_has_a_distinct_id():
    ids = [case.id for cases in ALL_CASES for case in cases]
    assert len(ids) == len(set(ids)) >= 25
    assert all(re.fullmatch(r"[a-z0-9_]+", case_id) for case_id in ids)

"""The default experiment configuration and its validation.

Experiment files in `configs/` start from `default_config()` and override a few
fields. `validate_config` runs before any work, so a typo fails in a second with
a message that names the field and the fix instead of after a compile.
"""

import difflib

import ml_collections
from ml_collections import config_dict

from jaxcomp import sharding
from jaxcomp.models import COMPUTE_DTYPES, DEPTHWISE_IMPLS, MODELS

# The two roles of the compression recipe, as config files take them (`file.py:teacher`).
MODEL_ROLES = {"teacher": "centernet_teacher", "student": "centernet_student"}


def model_for_role(role: str) -> str:
    """The model variant of 'teacher' or 'student', for configs taking `get_config(role)`."""
    if role not in MODEL_ROLES:
        raise ValueError(
            f"the config argument must be one of {sorted(MODEL_ROLES)} "
            f"(as in configs/voc.py:teacher), got {role!r}"
        )
    return MODEL_ROLES[role]


def default_config() -> ml_collections.ConfigDict:
    """The common base: student detector on the embedded dataset at 128x128."""
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    # 'jaxcomp_embedded' (built offline on first use), 'voc/2007', 'coco/2017'.
    config.data.name = "jaxcomp_embedded"
    config.data.data_dir = config_dict.placeholder(str)
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 128
    config.data.max_objects = 16
    # Worker processes that decode and augment; 0 reads in the main process.
    config.data.num_workers = 2

    config.model = ml_collections.ConfigDict()
    config.model.name = "centernet_student"
    # 'auto' picks nine shifted multiply-adds on CPU, XLA's grouped conv elsewhere.
    config.model.depthwise_impl = "auto"
    # Compute dtype of convolutions and activations: 'float32' or 'bfloat16';
    # parameters, BatchNorm statistics and the loss stay float32.
    config.model.dtype = "float32"
    # Width overrides by channel-group name, set when a channel-pruned model is shrunk.
    config.model.channels = ()

    # Workdir of a finished run whose params and BatchNorm statistics start this one
    # (fine-tuning: pruning or quantizing a trained model); '' trains from scratch.
    config.init_from = ""

    config.train = ml_collections.ConfigDict()
    config.train.steps = 3000
    # Global, over all devices and hosts. From scratch, 8 learned faster per image seen
    # than 16 here (student AP50 after 6400 images: 1.8% at batch 8 vs 0.3% at 16).
    config.train.batch_size = 8
    config.train.log_every = 25
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 3
    config.train.eval_every = 0  # 0: evaluate only at the end

    config.optim = ml_collections.ConfigDict()
    # Student AP50 after 800 steps of batch 8: 1.8% at 2e-3, 11.2% at 8e-3, 13.1% at 1.6e-2.
    config.optim.learning_rate = 1e-2
    config.optim.warmup_steps = 100
    config.optim.weight_decay = 1e-4
    config.optim.grad_clip_norm = 10.0

    config.loss = ml_collections.ConfigDict()
    config.loss.heatmap_weight = 1.0
    config.loss.size_weight = 0.1
    config.loss.offset_weight = 1.0

    config.prune = ml_collections.ConfigDict()
    # 'none' or a key of jaxcomp.prune.METHODS: 'unstructured', 'nm' (N:M along input
    # channels) or 'channel' (+ shrinking).
    config.prune.method = "none"
    # Final sparsity; for 'channel' the fraction of each selected group's channels removed.
    config.prune.sparsity = 0.8
    # [(regex, sparsity or None), ...] over leaf names (group names for 'channel'); None
    # picks the detector defaults (`jaxcomp.methods.default_prune_rules`).
    config.prune.rules = config_dict.placeholder(tuple)
    # A key of jaxcomp.prune.SCORES: 'magnitude', 'random', 'saliency', 'movement' (the
    # accumulated -w * g of movement pruning) or one registered there.
    config.prune.score = "magnitude"
    # How the sparsity is allocated across the selected leaves: 'layer' (each at its
    # target), 'global' (one ranking of the scores), 'lamp' (one ranking of LAMP scores,
    # Lee et al. 2021; magnitude only) or 'erk' (Erdős–Rényi-Kernel densities, Evci et
    # al. 2020); 'lamp' and 'erk' need method 'unstructured' (docs/pruning.md).
    config.prune.scope = "layer"
    config.prune.schedule = "polynomial"  # 'one_shot', 'iterative', 'polynomial'
    config.prune.begin_step = 0
    # None: three quarters of config.train.steps, leaving the rest to fine-tune.
    config.prune.end_step = config_dict.placeholder(int)
    config.prune.frequency = 50  # steps between mask updates (polynomial)
    config.prune.num_prunes = 4  # rounds (iterative)
    config.prune.n = 2
    config.prune.m = 4
    config.prune.norm = "l1"  # channel score: 'l1' or 'l2' norm of each filter

    config.quant = ml_collections.ConfigDict()
    # 'none' or a key of jaxcomp.quant.QUANT_MODES: 'ptq': calibrate activation ranges
    # over config.train.steps batches, no gradient steps; 'qat': fine-tune with
    # fake-quantized weights and activations (observed ranges); 'lsq': the same with
    # learned step sizes (Esser et al. 2020).
    config.quant.mode = "none"
    config.quant.weight_bits = 8  # symmetric per output channel, [-127, 127]
    config.quant.activation_bits = 8  # per tensor
    config.quant.activation_symmetric = False
    config.quant.observer = "minmax"  # 'minmax' or 'ema'
    config.quant.momentum = 0.9  # of the 'ema' observer
    # QAT: observers stop updating, and BatchNorm switches to its running statistics,
    # at these steps (None: never); the usual recipe freezes both for the last part.
    config.quant.freeze_observers_step = config_dict.placeholder(int)
    config.quant.freeze_bn_step = config_dict.placeholder(int)
    # [(regex over layer paths, True or None), ...]; None picks the detector defaults
    # (`jaxcomp.methods.default_quant_rules`: first conv and heatmap output stay float).
    config.quant.rules = config_dict.placeholder(tuple)

    config.distill = ml_collections.ConfigDict()
    # Workdir of a trained teacher run; '' trains without distillation. The teacher
    # runs frozen, in inference mode, on the same augmented batch inside the train step.
    config.distill.teacher = ""
    config.distill.teacher_model = "centernet_teacher"
    config.distill.teacher_channels = ()  # the teacher's config.model.channels, if shrunk
    # Loss names are keys of jaxcomp.distill.LOSSES; a weight of 0 turns a term off.
    config.distill.temperature = 1.0  # of the heatmap soft targets
    config.distill.heatmap_loss = "sigmoid_kl"
    config.distill.heatmap_weight = 1.0
    config.distill.heatmap_weighting = "teacher"  # 'none', 'teacher' or 'foreground'
    config.distill.regression_loss = "l1"
    config.distill.size_weight = 0.1
    config.distill.offset_weight = 1.0
    config.distill.regression_at = "teacher_peaks"  # or 'gt_centers'
    config.distill.peak_threshold = 0.1
    config.distill.feature_loss = "pkd"  # 'pkd' or 'cwd'
    config.distill.feature_weight = 1.0
    config.distill.feature_temperature = 1.0  # of 'cwd'
    # ((module path, weight), ...): feature maps compared, each through a 1x1 adapter
    # when the widths differ; e.g. (("backbone/block_6", 0.5), ("neck", 1.0)).
    config.distill.feature_layers = (("neck", 1.0),)

    # The compression methods, in the order they compose: names of
    # jaxcomp.methods.METHODS, each built from its own section (off when that says so).
    config.methods = ("prune", "quant", "distill")

    config.eval = ml_collections.ConfigDict()
    config.eval.batch_size = 32
    config.eval.top_k = 100

    # The device mesh and where the train state lives on it (`jaxcomp.sharding`).
    config.mesh = ml_collections.ConfigDict()
    # ((axis name, size), ...) over every device of every process; one size may be -1.
    config.mesh.axes = sharding.DATA_PARALLEL
    # The axes each batch is split over; the batch is replicated over the others.
    config.mesh.batch_axes = ("data",)
    # ((regex over train-state leaf names, PartitionSpec as a tuple), ...), first match
    # wins; unmatched leaves are replicated. E.g. FSDP with axes (('data', -1), ('fsdp', 4))
    # and batch_axes ('data', 'fsdp'): ((r".*backbone/.*/kernel", (None, None, None, "fsdp")),).
    config.mesh.rules = ()
    return config


def finetune_config(init_from: str = "workdirs/student") -> ml_collections.ConfigDict:
    """The base of the compression configs: 1000 steps fine-tuning a trained student.

    Args:
      init_from: the workdir of the trained model (configs/student.py's by default).
    """
    config = default_config()
    config.model.name = "centernet_student"
    config.init_from = init_from
    config.train.steps = 1000
    config.train.checkpoint_every = 250
    # Fine-tuning a trained model: a fifth of the from-scratch peak, short warmup.
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 50
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"invalid config: {message}")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_known_fields(
    config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str = "config"
) -> None:
    """Raises for a field `default_config()` does not have: a typo would silently do nothing.

    A top-level section named in `config.methods` is a method's own options (a method
    registered outside jaxcomp reads them), so it is not checked.
    """
    methods = config.get("methods", ()) if prefix == "config" else ()
    for name, value in config.items():
        if name in methods and name not in reference:
            continue
        if name not in reference:
            close = difflib.get_close_matches(name, list(reference.keys()), n=1)
            hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
            raise ValueError(f"invalid config: {prefix}.{name} is not a field{hint}")
        if isinstance(value, ml_collections.ConfigDict) and isinstance(
            reference[name], ml_collections.ConfigDict
        ):
            _check_known_fields(value, reference[name], f"{prefix}.{name}")


def _positive_int(config: ml_collections.ConfigDict, field: str) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    _require(
        isinstance(value, int) and not isinstance(value, bool) and value > 0,
        f"config.{field} must be a positive integer, got {value!r}",
    )


def validate_config(config: ml_collections.ConfigDict, device_count: int) -> None:
    """Raises ValueError naming the field and the fix for the first problem found.

    Args:
      config: the experiment config.
      device_count: `jax.device_count()`, the number of devices the mesh spans.
    """
    _check_known_fields(config, default_config())
    _require(
        config.model.name in MODELS,
        f"config.model.name={config.model.name!r} is not a model; use one of {sorted(MODELS)}",
    )
    _require(
        config.model.depthwise_impl in DEPTHWISE_IMPLS,
        f"config.model.depthwise_impl={config.model.depthwise_impl!r}; "
        f"use one of {DEPTHWISE_IMPLS}",
    )
    _require(
        config.model.dtype in COMPUTE_DTYPES,
        f"config.model.dtype={config.model.dtype!r}; use one of {COMPUTE_DTYPES}",
    )
    for field in (
        "data.image_size",
        "data.max_objects",
        "train.steps",
        "train.batch_size",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "eval.batch_size",
        "eval.top_k",
    ):
        _positive_int(config, field)
    _require(
        config.data.image_size % 32 == 0,
        f"config.data.image_size must be a multiple of 32 (the backbone's stride), "
        f"got {config.data.image_size}; try {max(32, round(config.data.image_size / 32) * 32)}",
    )
    splits = sharding.batch_split(
        sharding.mesh_shape(config.mesh.axes, device_count), config.mesh.batch_axes
    )
    for field in ("train.batch_size", "eval.batch_size"):
        section, name = field.split(".")
        size = config[section][name]
        _require(
            size % splits == 0,
            f"config.{field}={size} is not divisible by the {splits} devices it is split "
            f"over (config.mesh.batch_axes={tuple(config.mesh.batch_axes)}); "
            f"use a multiple of {splits}",
        )
    _require(
        _is_number(config.train.eval_every) and config.train.eval_every >= 0,
        f"config.train.eval_every must be >= 0 (0 = at the end only), "
        f"got {config.train.eval_every}",
    )
    _require(
        _is_number(config.data.num_workers) and config.data.num_workers >= 0,
        f"config.data.num_workers must be >= 0, got {config.data.num_workers}",
    )
    _require(
        _is_number(config.optim.learning_rate) and config.optim.learning_rate > 0,
        f"config.optim.learning_rate must be > 0, got {config.optim.learning_rate}",
    )
    _require(
        _is_number(config.optim.warmup_steps)
        and 0 <= config.optim.warmup_steps < config.train.steps,
        f"config.optim.warmup_steps={config.optim.warmup_steps} must be in "
        f"[0, config.train.steps={config.train.steps})",
    )
    for name, weight in config.loss.items():
        _require(
            _is_number(weight) and weight >= 0, f"config.loss.{name} must be >= 0, got {weight}"
        )
    _validate_methods(config)
    _validate_prune(config)
    _validate_quant(config)
    _validate_distill(config)


def _validate_distill(config: ml_collections.ConfigDict) -> None:
    settings = config.distill
    if not settings.teacher:
        return
    _require(
        settings.teacher_model in MODELS,
        f"config.distill.teacher_model={settings.teacher_model!r} is not a model; use one of "
        f"{sorted(MODELS)}",
    )
    _require(
        config.quant.mode != "ptq",
        "config.quant.mode='ptq' takes no gradient steps, so there is nothing to distil; "
        "set config.distill.teacher='' or use config.quant.mode='qat'",
    )
    _require(
        all(isinstance(pair, tuple | list) and len(pair) == 2 for pair in settings.feature_layers),
        f"config.distill.feature_layers={settings.feature_layers!r} must be ((module path, "
        "weight), ...), e.g. (('neck', 1.0),)",
    )
    # The values (temperatures, weights, choices) as the distillation method checks them,
    # so that validating a config catches them too.
    from jaxcomp.detection.distill import spec_of

    try:
        spec_of(config)
    except ValueError as error:
        raise ValueError(f"invalid config: config.distill: {error}") from None


def _validate_methods(config: ml_collections.ConfigDict) -> None:
    from jaxcomp.methods import METHODS  # read when validating: methods registered later count

    names = config.methods
    _require(
        isinstance(names, tuple | list) and all(isinstance(name, str) for name in names),
        f"config.methods must be a tuple of method names, got {names!r}",
    )
    for name in names:
        _require(
            name in METHODS,
            f"config.methods names {name!r}; use names of {sorted(METHODS)} (or register a "
            "builder in jaxcomp.methods.METHODS)",
        )
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    _require(not repeated, f"config.methods names {repeated} more than once")


def _validate_quant(config: ml_collections.ConfigDict) -> None:
    from jaxcomp.quant import OBSERVERS
    from jaxcomp.quant.transform import QUANT_MODES

    quant = config.quant
    modes = ("none", *QUANT_MODES)
    _require(quant.mode in modes, f"config.quant.mode={quant.mode!r}; use one of {modes}")
    if quant.mode == "none":
        return
    for field in ("weight_bits", "activation_bits"):
        bits = quant[field]
        _require(
            isinstance(bits, int) and 2 <= bits <= 8,
            f"config.quant.{field} must be an integer in [2, 8], got {bits!r}",
        )
    _require(
        quant.observer in OBSERVERS,
        f"config.quant.observer={quant.observer!r}; use one of {tuple(OBSERVERS)}",
    )
    for field in ("freeze_observers_step", "freeze_bn_step"):
        step = quant[field]
        _require(
            step is None or (_is_number(step) and 0 <= step <= config.train.steps),
            f"config.quant.{field}={step} must be None or in [0, config.train.steps="
            f"{config.train.steps}]",
        )
    _require(
        quant.mode != "ptq" or config.init_from,
        "config.quant.mode='ptq' calibrates a trained model: set config.init_from to its "
        "workdir (e.g. workdirs/student)",
    )


def _validate_prune(config: ml_collections.ConfigDict) -> None:
    # Read when validating: scores and schedules registered later count.
    from jaxcomp.prune import METHODS, NORMS, SCHEDULES, SCOPES, SCORES
    from jaxcomp.prune.transform import prune_end_step

    prune = config.prune
    _require(
        prune.score in SCORES,
        f"config.prune.score={prune.score!r}; use one of {tuple(SCORES)} (or register a new "
        "one in jaxcomp.prune.SCORES)",
    )
    choices = {
        "method": ("none", *METHODS),
        "scope": SCOPES,
        "schedule": tuple(SCHEDULES),
        "norm": NORMS,
    }
    for field, valid in choices.items():
        _require(
            prune[field] in valid,
            f"config.prune.{field}={prune[field]!r}; use one of {tuple(valid)}",
        )
    if prune.method == "none":
        return
    _require(
        prune.scope not in ("lamp", "erk") or prune.method == "unstructured",
        f"config.prune.scope={prune.scope!r} allocates sparsity to single weights and needs "
        f"config.prune.method='unstructured', got {prune.method!r}; use scope 'layer' or "
        "'global'",
    )
    _require(
        prune.scope != "lamp" or prune.score == "magnitude",
        "config.prune.scope='lamp' rescales squared weight magnitudes and needs "
        f"config.prune.score='magnitude', got {prune.score!r}; use scope 'global' or 'erk' "
        "for other scores",
    )
    _require(
        isinstance(prune.sparsity, int | float) and 0 <= prune.sparsity < 1,
        f"config.prune.sparsity must be in [0, 1), got {prune.sparsity!r}",
    )
    end_step = prune_end_step(config)
    _require(
        0 <= prune.begin_step < end_step <= config.train.steps,
        f"config.prune.begin_step={prune.begin_step} and end_step={end_step} must satisfy "
        f"0 <= begin_step < end_step <= config.train.steps={config.train.steps} "
        "(the schedule's end must come after its start)",
    )
    _require(
        isinstance(prune.n, int) and isinstance(prune.m, int) and 0 < prune.n <= prune.m,
        f"config.prune.n={prune.n!r}, m={prune.m!r}: N:M keeps n of every m weights, "
        "so it needs 0 < n <= m (e.g. n=2, m=4)",
    )
    _require(
        prune.frequency > 0 and prune.num_prunes > 0,
        f"config.prune.frequency={prune.frequency} and num_prunes={prune.num_prunes} "
        "must be positive",
    )


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py` or `path/to/config.py:arg` as `--config` flags do.

    Args:
      spec: a config file path, optionally followed by ':' and the argument of its
        `get_config(arg)`.

    Returns:
      The ConfigDict.
    """
    import importlib.util
    import os

    path, _, argument = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist (from {spec!r})")
    module_spec = importlib.util.spec_from_file_location("_jaxcomp_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()

"""An experiment built from a config: data, model, methods, optimizers and jitted steps."""

import dataclasses
import functools
import os
from collections.abc import Callable, Hashable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import methods as methods_registry
from jaxcomp import sharding, transforms
from jaxcomp.config import validate_config
from jaxcomp.data import pipeline
from jaxcomp.models import OUTPUT_STRIDE, centernet, create_model
from jaxcomp.training.checkpoints import restore_variables
from jaxcomp.training.state import (
    TrainState,
    abstract_variables,
    create_train_state,
    init_state,
    make_optimizer,
)
from jaxcomp.training.steps import evaluate, jit_eval_step, jit_train_step


def enable_compilation_cache(cache_dir: str | None) -> None:
    """Keeps compiled XLA programs in `cache_dir`, so a second start skips the compiles.

    Call it after `jax.distributed.initialize`: it asks how many processes there are.

    Args:
      cache_dir: a directory (created if missing; '~' expanded), or None/'' to disable.
    """
    if not cache_dir:
        return
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # JAX writes cache entries from process 0 only. A resumed two-process CPU run
        # failed as if process 0 loaded its step while process 1 compiled: gloo gives
        # up on the first collective after 30 s. Compiling everywhere keeps them level.
        return
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    # Cache every program: the train step's compile takes seconds, but so do many small ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@dataclasses.dataclass
class Experiment:
    """What `train_and_evaluate` builds from a config, exposed so tests and notebooks reuse it.

    Attributes:
      config: the experiment config.
      mesh: the device mesh (`config.mesh.axes`).
      state_sharding: where each leaf of the train state lives (`config.mesh.rules`).
      batch_axes: the mesh axes each batch is split over (`config.mesh.batch_axes`).
      builder: the TFDS dataset builder.
      model: the detector.
      variables: its abstract variables (shapes and dtypes only).
      optimizer: the model's optimizer, with the methods' `optimizer` hooks.
      method_optimizer: trains the methods' parameters.
      methods: the compression methods, (name, Transform) pairs in order.
      constants: each method's constants (a teacher's variables), replicated.
      eval_step: the jitted eval step f(state, images).
    """

    config: ml_collections.ConfigDict
    mesh: Mesh
    state_sharding: Any
    batch_axes: tuple[str, ...]
    builder: Any
    model: nn.Module
    variables: Any
    optimizer: optax.GradientTransformation
    method_optimizer: optax.GradientTransformation
    methods: tuple[tuple[str, transforms.Transform], ...]
    constants: dict[str, Any]
    eval_step: Callable
    _train_steps: dict[tuple[Hashable, ...], Callable] = dataclasses.field(default_factory=dict)

    def train_step_at(self, step: int) -> Callable:
        """The compiled step that takes the state from `step` to `step + 1`, as f(state, batch)."""
        compiled = self.jitted_train_step(step)
        return lambda state, batch: compiled(state, batch, self.constants)

    def jitted_train_step(self, step: int) -> Callable:
        """The jitted f(state, batch, constants) for `step`.

        Each set of method phases (`Transform.phase`) is its own program, compiled on
        first use.
        """
        phases = transforms.phases(self.methods, step)
        if phases not in self._train_steps:
            self._train_steps[phases] = jit_train_step(
                self.model,
                self.optimizer,
                dict(self.config.loss),
                self.mesh,
                self.methods,
                phases,
                self.method_optimizer,
                self.state_sharding,
                self.batch_axes,
            )
        return self._train_steps[phases]

    def init_state(self, variables: dict | None = None, seed: int | None = None) -> TrainState:
        """The initial state, placed by `state_sharding`: from `variables` if given, else
        random from `seed` (default `config.seed`)."""
        return init_state(
            self.model,
            self.optimizer,
            self.config.data.image_size,
            self.config.seed if seed is None else seed,
            self.mesh,
            variables,
            self.methods,
            self.method_optimizer,
            self.state_sharding,
        )


def method_context(
    config: ml_collections.ConfigDict, model: nn.Module, variables: Any, num_classes: int
) -> methods_registry.MethodContext:
    """What the detector tells the methods' builders (`jaxcomp.methods.MethodContext`)."""
    size = config.data.image_size

    def make_model(name: str, channels=()) -> nn.Module:
        return create_model(
            name,
            num_classes=num_classes,
            depthwise_impl=config.model.depthwise_impl,
            channels=channels,
            dtype=config.model.dtype,
        )

    return methods_registry.MethodContext(
        model=model,
        variables=variables,
        image_size=size,
        num_classes=num_classes,
        prune_rules=methods_registry.default_prune_rules,
        quant_rules=methods_registry.default_quant_rules(),
        channel_groups=centernet.channel_groups,
        rebuild=lambda widths: make_model(config.model.name, widths),
        create_model=make_model,
        load_variables=restore_variables,
        abstract_variables=functools.partial(_abstract_variables_of, image_size=size),
    )


def _abstract_variables_of(model: nn.Module, *, image_size: int) -> Any:
    return abstract_variables(model, image_size)


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """Validates `config` and builds dataset builder, model, methods, optimizers and steps.

    Everything that can fail on a bad config (names, rules, a missing teacher) fails
    here, before any file is written.
    """
    validate_config(config, jax.device_count())
    builder = pipeline.get_builder(config.data.name, config.data.data_dir)
    num_classes = pipeline.num_classes(builder)
    model = create_model(
        config.model.name,
        num_classes=num_classes,
        depthwise_impl=config.model.depthwise_impl,
        channels=config.model.channels,
        dtype=config.model.dtype,
    )
    variables = abstract_variables(model, config.data.image_size)
    methods = methods_registry.build_methods(
        config, method_context(config, model, variables, num_classes)
    )
    base_optimizer = make_optimizer(config.optim, config.train.steps)
    optimizer = optax.with_extra_args_support(transforms.compose_optimizer(base_optimizer, methods))
    # Checks the methods and the sharding rules against the real names and shapes now
    # (rules that match nothing, layers that cannot be quantized), before any file is
    # written.
    abstract_state = jax.eval_shape(
        functools.partial(
            _abstract_state, model, optimizer, config.data.image_size, methods, base_optimizer
        ),
        variables,
    )
    mesh = sharding.make_mesh(config.mesh.axes)
    state_sharding = sharding.state_shardings(abstract_state, mesh, config.mesh.rules)
    batch_axes = tuple(config.mesh.batch_axes)
    replicated = NamedSharding(mesh, PartitionSpec())
    constants = {}
    for name, transform in methods:
        value = transform.constants()
        if value is not None:
            constants[name] = jax.device_put(value, replicated)
    return Experiment(
        config=config,
        mesh=mesh,
        state_sharding=state_sharding,
        batch_axes=batch_axes,
        builder=builder,
        model=model,
        variables=variables,
        optimizer=optimizer,
        method_optimizer=base_optimizer,
        methods=methods,
        constants=constants,
        eval_step=jit_eval_step(
            model,
            config.eval.top_k,
            mesh,
            methods,
            state_sharding=state_sharding,
            batch_axes=batch_axes,
        ),
    )


def _abstract_state(model, optimizer, image_size, methods, method_optimizer, variables):
    return create_train_state(
        model,
        optimizer,
        image_size,
        jax.random.key(0),
        variables,
        methods=methods,
        method_optimizer=method_optimizer,
    )


def experiment_train_dataset(experiment: Experiment):
    """This process's training batches: `dataset[step]` is its rows of global batch `step`."""
    config = experiment.config
    return pipeline.train_dataset(
        experiment.builder.as_data_source(config.data.train_split),
        image_size=config.data.image_size,
        global_batch_size=config.train.batch_size,
        max_objects=config.data.max_objects,
        num_classes=pipeline.num_classes(experiment.builder),
        seed=config.seed,
        stride=OUTPUT_STRIDE,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def evaluate_experiment(
    experiment: Experiment, state: Any, eval_step: Callable | None = None
) -> dict[str, float]:
    """COCO metrics on the config's eval split (this process's shard).

    Args:
      experiment: the experiment.
      state: what `eval_step` takes (a TrainState, or an exported form's tree).
      eval_step: the jitted eval step (default: the experiment's).
    """
    config = experiment.config
    source = experiment.builder.as_data_source(config.data.eval_split)
    batches = pipeline.eval_batches(
        source,
        image_size=config.data.image_size,
        batch_size=config.eval.batch_size // jax.process_count(),
        max_objects=config.data.max_objects,
        num_classes=pipeline.num_classes(experiment.builder),
        stride=OUTPUT_STRIDE,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    return evaluate(
        eval_step or experiment.eval_step,
        state,
        batches,
        experiment.mesh,
        class_names=pipeline.class_names(experiment.builder),
        batch_axes=experiment.batch_axes,
    )

"""The train state, the optimizer and batch placement."""

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcomp import paths, transforms
from jaxcomp.sharding import batch_sharding


@flax.struct.dataclass
class TrainState:
    """Everything a checkpoint restores.

    Attributes:
      step: the number of steps taken.
      params: the model's parameters.
      batch_stats: its BatchNorm statistics.
      opt_state: the model's optimizer state (pruning masks live here).
      methods: each compression method's state, by name (observers, scores).
      method_params: each method's trainable parameters, by name (adapters, step sizes).
      method_opt_state: the optimizer state of `method_params`.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    methods: Any = None
    method_params: Any = None
    method_opt_state: Any = None


def global_batch(
    local_batch: dict[str, np.ndarray],
    mesh: Mesh,
    fields: Iterable[str],
    batch_axes: Sequence[str] = ("data",),
):
    """Assembles each process's rows into global arrays split over `batch_axes`."""
    sharding = batch_sharding(mesh, batch_axes)
    return {
        name: jax.make_array_from_process_local_data(sharding, local_batch[name]) for name in fields
    }


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay; weight decay on conv/dense kernels only.

    Args:
      optim: `config.optim` (learning_rate, warmup_steps, weight_decay, grad_clip_norm).
      total_steps: length of the cosine schedule.

    Returns:
      The optax transformation.
    """
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(total_steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * 0.01,
    )
    decay_mask = functools.partial(paths.map_with_names, lambda name, _: name.endswith("kernel"))
    return optax.chain(
        optax.clip_by_global_norm(optim.grad_clip_norm),
        optax.adamw(schedule, weight_decay=optim.weight_decay, mask=decay_mask),
    )


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    image_size: int,
    rng: jax.Array,
    variables: dict | None = None,
    methods: transforms.Methods = (),
    method_optimizer: optax.GradientTransformation | None = None,
) -> TrainState:
    """Initializes parameters, statistics, optimizer and method states (call under `jax.jit`).

    Args:
      model: the detector.
      optimizer: the model's optax transformation (with the methods' `optimizer` hooks).
      image_size: side of the square input; parameters do not depend on it.
      rng: PRNG key of the parameters; the methods get `fold_in(rng, 1)`.
      variables: {'params', 'batch_stats'} to start from (fine-tuning) instead of `rng`.
      methods: the compression methods, (name, Transform) pairs.
      method_optimizer: trains the methods' parameters (needed when any has some).

    Returns:
      A TrainState at step 0.
    """
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)
    if variables is None:
        variables = model.init(rng, images, train=False)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    method_states, method_params = transforms.init_all(
        methods, variables, jax.random.fold_in(rng, 1)
    )
    method_opt_state = None
    if method_params:
        method_opt_state = method_optimizer.init(method_params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=optimizer.init(variables["params"]),
        methods=method_states or None,
        method_params=method_params or None,
        method_opt_state=method_opt_state,
    )


def jit_init_state(
    model,
    optimizer,
    image_size: int,
    mesh: Mesh,
    methods: transforms.Methods = (),
    method_optimizer=None,
    state_sharding: Any = None,
) -> Callable:
    """`create_train_state` jitted: f(rng, variables) -> the TrainState, placed on `mesh`
    by `state_sharding` (`jaxcomp.sharding.state_shardings`; None: replicated)."""
    return jax.jit(
        functools.partial(
            create_train_state,
            model,
            optimizer,
            image_size,
            methods=methods,
            method_optimizer=method_optimizer,
        ),
        out_shardings=state_sharding or NamedSharding(mesh, PartitionSpec()),
    )


def init_state(
    model,
    optimizer,
    image_size: int,
    seed: int,
    mesh: Mesh,
    variables: dict | None = None,
    methods: transforms.Methods = (),
    method_optimizer=None,
    state_sharding: Any = None,
) -> TrainState:
    """Creates the initial TrainState in one jitted call (eager init is far slower).

    Args:
      model, optimizer, image_size, methods, method_optimizer: as for `create_train_state`.
      seed: the run's seed (`config.seed`).
      mesh: the device mesh.
      variables: optional {'params', 'batch_stats'} to start from (see `restore_variables`).
      state_sharding: where each leaf lives (`jaxcomp.sharding.state_shardings`);
        None replicates the state over `mesh`.
    """
    init_fn = jit_init_state(
        model, optimizer, image_size, mesh, methods, method_optimizer, state_sharding
    )
    return init_fn(jax.random.key(seed), variables)


def abstract_variables(model: nn.Module, image_size: int) -> dict:
    """Shapes and dtypes of the model's variables, traced without computing anything."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)

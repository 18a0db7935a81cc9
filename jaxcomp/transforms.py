"""The protocol every compression method implements, and how the train step composes them.

A method is a `Transform`: a NamedTuple of pure functions, as optax's
`GradientTransformation` is `init` + `update`. Every hook has a default that does
nothing, so a method defines only what it changes:

* `init(variables, key) -> state`: its state (a pytree of arrays; `{}` for none),
  kept in the train state under the method's name and checkpointed with it.
* `init_params(variables, key) -> params`: its trainable parameters (an adapter,
  learned step sizes; `{}` for none), optimised alongside the model's and never
  exported with it.
* `apply(apply_fn, view) -> apply_fn`: how it changes the forward pass. It wraps
  a Flax `model.apply`: changes the weights the model sees, intercepts
  activations (`flax.linen.intercept_methods`), adds collections to `mutable`.
* `prepare(view, constants, batch) -> prepared`: work outside the gradient before
  the forward pass (a frozen teacher's outputs); `constants` are arrays the step
  takes as an argument and never updates or saves (the teacher's variables).
* `loss(view, inputs) -> (loss, terms)`: a term added to the task loss.
* `optimizer(tx) -> tx`: how it changes the model's updates (pruning masks
  inside the optimizer state).
* `update(view, info) -> (state, params)`: its state (and parameters) after a
  step: observers, accumulated scores.
* `export(view, inputs) -> {name: Export}`: the forms it exports (an int8 tree, a
  shrunk model), each evaluated and measured into `compression.json`.
* `phase(step) -> hashable`: host-side; a change of phase compiles another train
  step (QAT freezes BatchNorm late in training).
* `trains`: False for a method that takes no gradient step (PTQ calibration).
* `constants() -> pytree`: the arrays `prepare` reads, loaded once.

Methods are built from a config by a builder `build(config, context) ->
Transform | None` registered in `jaxcomp.methods.METHODS`; `config.methods`
names them in the order they compose.

Example, a method that adds an L2 penalty on every parameter (README, "Write your
own method", has a complete one that the tests run):

    def l2_penalty(weight):
        def loss(view, inputs):
            value = weight * sum(jnp.sum(p**2) for p in jax.tree.leaves(inputs.params))
            return value, {"l2": value}

        return Transform(loss=loss)
"""

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ApplyFn = Callable[..., Any]


class View(NamedTuple):
    """What a hook sees of its method during a step.

    Attributes:
      state: the method's state.
      params: the method's trainable parameters.
      step: the train step (a traced int32 scalar inside the step).
      phase: the method's `phase(step)` for this program.
      training: False in evaluation (the eval step, the exported forms).
    """

    state: Any
    params: Any
    step: Any
    phase: Hashable = None
    training: bool = True


class LossInputs(NamedTuple):
    """What `Transform.loss` receives.

    Attributes:
      outputs: the model's outputs (as `apply` made them).
      collections: the updated Flax collections (`batch_stats`, `intermediates`, ...).
      batch: the train batch.
      prepared: what the method's `prepare` returned.
      params: the model's parameters the loss is differentiated by.
    """

    outputs: Any
    collections: Mapping[str, Any]
    batch: Mapping[str, Any]
    prepared: Any
    params: Any


class StepInfo(NamedTuple):
    """What `Transform.update` receives after the optimizer step.

    Attributes:
      params: the model's parameters before the step.
      new_params: after it.
      grads: the model's gradients (None in a step without gradients).
      collections: the updated Flax collections of the forward pass.
      batch: the train batch.
    """

    params: Any
    new_params: Any
    grads: Any
    collections: Mapping[str, Any]
    batch: Mapping[str, Any]


class Export(NamedTuple):
    """One exported form of a trained model.

    Attributes:
      tree: what is saved (and measured on disk).
      apply: `(tree, images) -> outputs`, jit-able: how the form runs.
      model: the Flax model whose variables `tree` is, for counting parameters and
        FLOPs; None when the form keeps the trained model's layers (int8 storage).
      info: extra fields for its row of `compression.json`.
    """

    tree: Any
    apply: Callable[[Any, jax.Array], Any]
    model: Any = None
    info: Mapping[str, Any] = {}


class ExportInputs(NamedTuple):
    """What `Transform.export` receives: the trained model and the optimizer state."""

    variables: Mapping[str, Any]
    opt_state: Any


def _no_state(variables, key):
    del variables, key
    return {}


def _same_apply(apply_fn, view):
    del view
    return apply_fn


def _nothing_prepared(view, constants, batch):
    del view, constants, batch


def _no_loss(view, inputs):
    del view, inputs
    return jnp.zeros((), jnp.float32), {}


def _same_optimizer(tx):
    return tx


def _same_state(view, info):
    del info
    return view.state, view.params


def _no_export(view, inputs):
    del view, inputs
    return {}


def _one_phase(step):
    del step


def _no_constants():
    return None


class Transform(NamedTuple):
    """A compression method as pure functions (see the module docstring for each hook)."""

    init: Callable[[Any, jax.Array], Any] = _no_state
    init_params: Callable[[Any, jax.Array], Any] = _no_state
    apply: Callable[[ApplyFn, View], ApplyFn] = _same_apply
    prepare: Callable[[View, Any, Any], Any] = _nothing_prepared
    loss: Callable[[View, LossInputs], tuple[jax.Array, dict]] = _no_loss
    optimizer: Callable[[Any], Any] = _same_optimizer
    update: Callable[[View, StepInfo], tuple[Any, Any]] = _same_state
    export: Callable[[View, ExportInputs], dict[str, Export]] = _no_export
    phase: Callable[[int], Hashable] = _one_phase
    trains: bool = True
    constants: Callable[[], Any] = _no_constants


Methods = Sequence[tuple[str, Transform]]


def phases(methods: Methods, step: int) -> tuple[Hashable, ...]:
    """Every method's phase at host step `step`: the key of the compiled step to run."""
    return tuple(transform.phase(step) for _, transform in methods)


def views(
    methods: Methods,
    states: Mapping[str, Any],
    params: Mapping[str, Any],
    step: Any,
    method_phases: Sequence[Hashable] | None = None,
    training: bool = True,
) -> dict[str, View]:
    """Each method's `View` from the train state's per-method dicts."""
    method_phases = method_phases or (None,) * len(methods)
    return {
        name: View(states.get(name, {}), params.get(name, {}), step, phase, training)
        for (name, _), phase in zip(methods, method_phases, strict=True)
    }


def compose_apply(apply_fn: ApplyFn, methods: Methods, method_views: Mapping[str, View]):
    """`apply_fn` wrapped by every method's `apply`, the first method innermost."""
    for name, transform in methods:
        apply_fn = transform.apply(apply_fn, method_views[name])
    return apply_fn


def compose_optimizer(tx: Any, methods: Methods) -> Any:
    """The model's optimizer wrapped by every method's `optimizer`, in order."""
    for _, transform in methods:
        tx = transform.optimizer(tx)
    return tx


def total_loss(
    methods: Methods, method_views: Mapping[str, View], inputs: Callable[[str], LossInputs]
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The sum of the methods' loss terms and their named parts.

    Args:
      methods: the composed methods.
      method_views: their views.
      inputs: the `LossInputs` of a method, by name.
    """
    total = jnp.zeros((), jnp.float32)
    terms: dict[str, jax.Array] = {}
    for name, transform in methods:
        value, parts = transform.loss(method_views[name], inputs(name))
        total = total + value
        terms.update(parts)
    return total, terms


def init_all(methods: Methods, variables: Any, key: jax.Array) -> tuple[dict, dict]:
    """Every method's (state, params), keyed by name; empty ones are left out so that a
    checkpoint holds no empty trees."""
    states, params = {}, {}
    for index, (name, transform) in enumerate(methods):
        method_key = jax.random.fold_in(key, index)
        state = transform.init(variables, jax.random.fold_in(method_key, 0))
        trainable = transform.init_params(variables, jax.random.fold_in(method_key, 1))
        if jax.tree.leaves(state):
            states[name] = state
        if jax.tree.leaves(trainable):
            params[name] = trainable
    return states, params


def update_all(
    methods: Methods, method_views: Mapping[str, View], info: StepInfo
) -> tuple[dict, dict]:
    """Every method's state and params after a step, in the train state's layout."""
    states, params = {}, {}
    for name, transform in methods:
        state, trainable = transform.update(method_views[name], info)
        if jax.tree.leaves(state):
            states[name] = state
        if jax.tree.leaves(trainable):
            params[name] = trainable
    return states, params


def check_names(methods: Methods) -> None:
    """Raises ValueError for a repeated method name: their states would collide."""
    names = [name for name, _ in methods]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"methods {repeated} appear more than once in {names}; name each once")

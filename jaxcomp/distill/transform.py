"""Distillation as a compression method (`jaxcomp.transforms.Transform`).

A frozen teacher runs in the same jitted step on the same batch (`prepare`, under
`stop_gradient`; its variables are the method's constants: an argument of the step,
never in the optimizer state or a checkpoint). The student's feature maps at
`layers` are captured during its forward pass, mapped to the teacher's widths by 1x1
adapters (the method's trainable parameters, nested by layer path, not exported), and
handed with both
networks' outputs to a task loss. Nothing here knows what the networks predict.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from jaxcomp import paths, transforms
from jaxcomp.distill.adapter import apply_adapter, init_adapter

# (student outputs, teacher outputs, batch, student features, teacher features)
#   -> (loss, terms); features by layer, the student's already adapted.
TaskLoss = Callable[[Any, Any, Any, Mapping[str, Any], Mapping[str, Any]], tuple[Any, dict]]


def layer_filter(layers: Sequence[str]) -> Callable[[Any, str], bool]:
    """A `capture_intermediates` filter keeping the `__call__` outputs of the modules at
    `layers` ('neck', 'backbone/block_6')."""
    wanted = {tuple(layer.split("/")) for layer in layers}
    return lambda module, method: method == "__call__" and module.path in wanted


def captured(collections: Mapping[str, Any], layer: str) -> jax.Array:
    """The [B, h, w, C] output of the module at `layer` from the 'intermediates' collection."""
    node = collections.get("intermediates", {})
    for part in layer.split("/"):
        node = node.get(part, {}) if isinstance(node, Mapping) else {}
    outputs = node.get("__call__") if isinstance(node, Mapping) else None
    if not outputs or getattr(outputs[0], "ndim", None) != 4:
        raise ValueError(
            f"feature layer {layer!r} is not a module whose output is one feature map; "
            "name a module path such as 'neck' or 'backbone/block_6'"
        )
    return outputs[0]


def with_capture(apply_fn: Callable, layers: Sequence[str]) -> Callable:
    """`apply_fn` that also captures the outputs of `layers` (kept with other captures)."""
    wanted = layer_filter(layers)

    def capturing(variables, *args, capture_intermediates=False, mutable=False, **kwargs):
        previous = capture_intermediates

        def either(module, method):
            if callable(previous):
                return wanted(module, method) or previous(module, method)
            return wanted(module, method) or bool(previous)

        mutable = [mutable] if isinstance(mutable, str) else list(mutable or [])
        if "intermediates" not in mutable:
            mutable.append("intermediates")
        return apply_fn(variables, *args, capture_intermediates=either, mutable=mutable, **kwargs)

    return capturing


def distillation(
    teacher_apply: Callable,
    load_teacher: Callable[[], Any],
    task_loss: TaskLoss,
    *,
    inputs: Callable[[Mapping[str, Any]], tuple],
    layers: Sequence[str] = (),
    adapters: Mapping[str, tuple[int, int]] | None = None,
) -> transforms.Transform:
    """A method that distils a frozen teacher into the model in the train step.

    Args:
      teacher_apply: the teacher's `model.apply`.
      load_teacher: `() -> variables` of the trained teacher (called once).
      task_loss: the weighted distillation terms (see `TaskLoss`).
      inputs: `batch -> positional model arguments` (e.g. the images).
      layers: module paths whose feature maps both networks compare.
      adapters: {layer: (student width, teacher width)} where they differ: a 1x1
        adapter (trainable) maps the student's map to the teacher's width.

    Returns:
      The `Transform`.
    """
    adapters = dict(adapters or {})
    layers = tuple(layers)

    def init_params(variables, key):
        del variables
        return paths.nest(
            {
                layer: init_adapter(jax.random.fold_in(key, index), *adapters[layer])
                for index, layer in enumerate(layers)
                if layer in adapters
            }
        )

    def prepare(view, teacher_variables, batch):
        del view
        teacher_variables = jax.lax.stop_gradient(teacher_variables)
        if not layers:
            return teacher_apply(teacher_variables, *inputs(batch), train=False), {}
        outputs, collections = with_capture(teacher_apply, layers)(
            teacher_variables, *inputs(batch), train=False
        )
        features = {layer: captured(collections, layer) for layer in layers}
        return outputs, jax.lax.stop_gradient(features)

    def apply(apply_fn, view):
        return with_capture(apply_fn, layers) if layers and view.training else apply_fn

    def loss(view, loss_inputs):
        teacher_outputs, teacher_features = loss_inputs.prepared
        student_features = {}
        for layer in layers:
            features = captured(loss_inputs.collections, layer)
            if layer in adapters:
                features = apply_adapter(paths.lookup(view.params, layer), features)
            student_features[layer] = features
        return task_loss(
            loss_inputs.outputs,
            teacher_outputs,
            loss_inputs.batch,
            student_features,
            teacher_features,
        )

    return transforms.Transform(
        init_params=init_params,
        apply=apply,
        prepare=prepare,
        loss=loss,
        constants=load_teacher,
    )

"""Int8 quantization as compression methods (`jaxcomp.transforms.Transform`).

QAT fine-tunes with BatchNorm-folded fake-quant weights and fake-quant layer inputs
whose observers are the method's state; PTQ only observes (no gradient step). Both
export the int8 tree of the int8 serving path. `QUANT_MODES` maps
`config.quant.mode` to its builder.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxcomp import transforms
from jaxcomp.quant.int8 import convert_to_int8, int8_apply
from jaxcomp.quant.lsq import from_config as lsq_from_config
from jaxcomp.quant.qat import QUANT_STATS, QuantConfig, init_quant_stats, quantized_apply
from jaxcomp.quant.settings import quant_config_of

# The phase of a QAT step after `freeze_bn_step`: BatchNorm normalizes with (and keeps)
# its running statistics. Two programs switched on the host: a `lax.cond` between two
# whole forward and backward passes made the QAT step 3x slower on CPU.
FROZEN_BATCH_NORM = "frozen_batch_norm"


def _observers(model, image_size: int, config: QuantConfig) -> Callable:
    """`variables -> {'quant_stats': fresh observers}` for the model's quantized layers."""
    images = jnp.zeros((1, image_size, image_size, 3), jnp.uint8)

    def init(variables, key):
        del key
        base = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
        return {
            QUANT_STATS: init_quant_stats(model.apply, base, images, config=config, train=False)
        }

    return init


def _int8_export(model, config: QuantConfig) -> Callable:
    def export(view, inputs):
        variables = inputs.variables
        tree = jax.device_get(
            convert_to_int8(
                variables["params"], variables["batch_stats"], view.state[QUANT_STATS], config
            )
        )
        return {
            "int8": transforms.Export(
                tree=tree,
                apply=lambda tree, images: int8_apply(
                    model, tree, images, config=config, train=False
                ),
            )
        }

    return export


def _with_observers(apply_fn, view, config: QuantConfig, mode: str, batch_norm_trains):
    """`apply_fn` run by `quantized_apply` in `mode` with the method's observers;
    `batch_norm_trains(train)` says whether BatchNorm uses batch statistics."""

    def quantized(variables, *args, train: bool = False, **kwargs):
        return quantized_apply(
            apply_fn,
            {**variables, QUANT_STATS: view.state[QUANT_STATS]},
            *args,
            config=config,
            mode=mode,
            step=view.step,
            train=batch_norm_trains(train),
            **kwargs,
        )

    return quantized


def _observed(view, info):
    return {QUANT_STATS: info.collections[QUANT_STATS]}, view.params


def qat(
    model, image_size: int, config: QuantConfig, freeze_bn_step: int | None = None
) -> transforms.Transform:
    """Quantization-aware training of `model` with `config`.

    Args:
      model: the Flax model (its `apply` is wrapped; `int8_apply` serves it).
      image_size: side of the square input (shapes of the observers).
      config: layers, bits and observers.
      freeze_bn_step: from this step on BatchNorm uses its running statistics (None: never).
    """

    def apply(apply_fn, view):
        def batch_norm_trains(train):
            return train and view.phase != FROZEN_BATCH_NORM

        mode = "qat" if view.training else "eval"
        return _with_observers(apply_fn, view, config, mode, batch_norm_trains)

    def phase(step):
        frozen = freeze_bn_step is not None and step >= freeze_bn_step
        return FROZEN_BATCH_NORM if frozen else None

    return transforms.Transform(
        init=_observers(model, image_size, config),
        apply=apply,
        update=_observed,
        export=_int8_export(model, config),
        phase=phase,
    )


def ptq(model, image_size: int, config: QuantConfig) -> transforms.Transform:
    """Post-training quantization: each step observes a batch's layer inputs; no gradient."""

    def apply(apply_fn, view):
        # Calibration observes with BatchNorm's running statistics.
        mode = "calibrate" if view.training else "eval"
        return _with_observers(apply_fn, view, config, mode, lambda train: False)

    return transforms.Transform(
        init=_observers(model, image_size, config),
        apply=apply,
        update=_observed,
        export=_int8_export(model, config),
        trains=False,
    )


def _qat_from_config(config, context) -> transforms.Transform:
    quant_config = quant_config_of(config.quant, context.quant_rules)
    return qat(context.model, context.image_size, quant_config, config.quant.freeze_bn_step)


def _ptq_from_config(config, context) -> transforms.Transform:
    return ptq(
        context.model, context.image_size, quant_config_of(config.quant, context.quant_rules)
    )


QUANT_MODES: dict[str, Callable[[Any, Any], transforms.Transform]] = {
    "ptq": _ptq_from_config,
    "qat": _qat_from_config,
    "lsq": lsq_from_config,
}


def from_config(config: ml_collections.ConfigDict, context) -> transforms.Transform | None:
    """The quantization method of `config.quant.mode` (None for 'none')."""
    if config.quant.mode == "none":
        return None
    return QUANT_MODES[config.quant.mode](config, context)

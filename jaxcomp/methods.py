"""The registry of compression methods and what a detector tells their builders.

`METHODS` maps a name of `config.methods` to a builder `build(config, context) ->
Transform | None` (None: the method is off in this config). The builders of
pruning, quantization and distillation live with their methods; this module only
lists them and gathers, from the model, the data they need (`MethodContext`): the
detector's default rules, its channel groups, how to rebuild it smaller, how to load
another run's variables. A new method is a module with a builder and one line here
(or `METHODS[name] = build` from user code).
"""

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import ml_collections

from jaxcomp import transforms
from jaxcomp.detection import distill as detection_distill
from jaxcomp.prune import transform as prune_transform
from jaxcomp.quant import transform as quant_transform


class MethodContext(NamedTuple):
    """What a method's builder may use besides the config.

    Attributes:
      model: the model being compressed.
      variables: its abstract variables ({'params', 'batch_stats'}: shapes and dtypes).
      image_size: side of the square training input.
      num_classes: classes of the dataset.
      prune_rules: `(method, sparsity, names) -> rules`, the model's default
        pruning rules.
      quant_rules: the model's default quantization rules.
      channel_groups: the model's coupled channel groups, from variables (for
        channel pruning and shrinking).
      rebuild: `widths -> model`, the model with other channel widths.
      create_model: `(name, channels) -> model`, another model of this dataset.
      load_variables: `(workdir, model, field, model_field) -> variables` of another
        run (a teacher), checked against `model`.
      abstract_variables: `model -> abstract variables` of any model.
    """

    model: nn.Module
    variables: Any
    image_size: int
    num_classes: int
    prune_rules: Callable[[str, float, list[str]], tuple]
    quant_rules: tuple
    channel_groups: Callable[[Any], Mapping[str, Any]]
    rebuild: Callable[[Mapping[str, int]], nn.Module]
    create_model: Callable[[str, tuple], nn.Module]
    load_variables: Callable[..., Any]
    abstract_variables: Callable[[nn.Module], Any]


Builder = Callable[[ml_collections.ConfigDict, MethodContext], transforms.Transform | None]

METHODS: dict[str, Builder] = {
    "prune": prune_transform.from_config,
    "quant": quant_transform.from_config,
    "distill": detection_distill.from_config,
}


def build_methods(
    config: ml_collections.ConfigDict, context: MethodContext
) -> tuple[tuple[str, transforms.Transform], ...]:
    """The methods `config.methods` names, built in order; those that are off are left out."""
    built = []
    for name in config.methods:
        if name not in METHODS:
            raise ValueError(
                f"config.methods names {name!r}, which is not a method; use names of "
                f"{sorted(METHODS)} or register a builder in jaxcomp.methods.METHODS"
            )
        transform = METHODS[name](config, context)
        if transform is not None:
            built.append((name, transform))
    transforms.check_names(built)
    return tuple(built)


def default_prune_rules(
    method: str, sparsity: float, names: list[str]
) -> tuple[tuple[str, Any], ...]:
    """Which leaves (or channel groups) a detector prunes by default, and how much.

    Conv kernels only (not biases or norms). The first conv (3 input channels)
    and the heatmap head's last conv stay dense, as detector pruning recipes do,
    and so do the 3x3 depthwise kernels: they hold ~7% of the student's weights,
    but 9 weights per channel do not survive unstructured pruning (the student
    pruned to 80% over 1000 fine-tuning steps: AP50 12.5 with them, 22.9 without)
    and have a single input channel, so no N:M groups. For 'channel' the rules
    name channel groups (`centernet.channel_groups`).

    Args:
      method: 'unstructured', 'nm' or 'channel'.
      sparsity: the target of every selected leaf (or group).
      names: the leaf (or group) names, so that exclusions a model does not have
        (the tiny model has no stem group) are left out instead of reported.
    """
    if method == "channel":
        exclusions = [r"backbone/stem"]
        everything = r".*"
    else:
        exclusions = [
            r"backbone/stem/conv/kernel",
            r"heatmap/out/kernel",
            r".*(depthwise|_dw)/.*kernel",
        ]
        everything = r".*kernel"
    present = [rule for rule in exclusions if any(re.fullmatch(rule, name) for name in names)]
    return (*((rule, None) for rule in present), (everything, sparsity))


def default_quant_rules() -> tuple[tuple[str, Any], ...]:
    """Layers a detector quantizes by default: all but the first conv and the heatmap output.

    The first conv sees raw pixels and the heatmap's last conv sets the scores, so
    int8 detector recipes keep both in float.
    """
    return ((r"backbone/stem/conv", None), (r"heatmap/out", None), (r".*", True))

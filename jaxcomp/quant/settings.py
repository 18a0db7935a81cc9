"""The `QuantConfig` of an experiment config's `quant` section."""

import ml_collections

from jaxcomp.quant.qat import QuantConfig


def quant_config_of(settings: ml_collections.ConfigDict, default_rules) -> QuantConfig:
    """The `QuantConfig` of `config.quant` (its rules, or `default_rules` when None)."""
    rules = settings.rules
    return QuantConfig(
        weight_bits=settings.weight_bits,
        activation_bits=settings.activation_bits,
        activation_symmetric=settings.activation_symmetric,
        observer=settings.observer,
        momentum=settings.momentum,
        freeze_observers_step=settings.freeze_observers_step,
        rules=default_rules if rules is None else tuple(tuple(rule) for rule in rules),
    )

"""Int8 fake quantization as pure functions: numerics, observers, QAT/PTQ and int8 serving.

Rounding and ranges (`numerics`), activation range observers kept in a Flax
`quant_stats` collection (`observers`), weight fake-quant with BatchNorm folding
and activation fake-quant injected by `flax.linen.intercept_methods` (`qat`),
and a real int8 x int8 -> int32 serving path (`int8`). Layers are selected by
path rules; nothing here knows about detectors.
"""

from jaxcomp.quant.int8 import convert_to_int8, int8_apply, int8_size_bytes
from jaxcomp.quant.numerics import (
    abs_max,
    dequantize,
    fake_quant,
    int_range,
    min_max,
    percentile_range,
    quantize,
    scale_and_zero_point,
    weight_qparams,
)
from jaxcomp.quant.observers import (
    OBSERVERS,
    ObserverState,
    init_observer,
    observe,
    observer_qparams,
)
from jaxcomp.quant.qat import (
    MODES,
    QUANT_STATS,
    QuantConfig,
    calibrate,
    conv_bn_pairs,
    fake_quant_folded_weights,
    fake_quant_weights,
    fold_batch_norm,
    init_quant_stats,
    quantize_weights,
    quantized_apply,
    quantized_layers,
)
from jaxcomp.quant.settings import quant_config_of
from jaxcomp.quant.transform import FROZEN_BATCH_NORM, QUANT_MODES

__all__ = [
    "FROZEN_BATCH_NORM",
    "QUANT_MODES",
    "quant_config_of",
    "OBSERVERS",
    "MODES",
    "QUANT_STATS",
    "ObserverState",
    "QuantConfig",
    "abs_max",
    "calibrate",
    "conv_bn_pairs",
    "convert_to_int8",
    "dequantize",
    "fake_quant",
    "fake_quant_folded_weights",
    "fake_quant_weights",
    "fold_batch_norm",
    "init_observer",
    "init_quant_stats",
    "int8_apply",
    "int8_size_bytes",
    "int_range",
    "min_max",
    "observe",
    "observer_qparams",
    "percentile_range",
    "quantize",
    "quantize_weights",
    "quantized_apply",
    "quantized_layers",
    "scale_and_zero_point",
    "weight_qparams",
]

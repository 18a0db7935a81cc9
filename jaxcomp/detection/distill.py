"""Distillation of a CenterNet student from a CenterNet teacher: which outputs, where.

The losses themselves are generic (`jaxcomp.distill.LOSSES`); this module
decides what a detector distils: the heatmap as per-class soft targets
(weighted by the teacher's confidence or the ground-truth foreground), the
size and offset maps imitated at the teacher's peaks or the ground-truth
centres, and feature maps at one or more layers (PKD or CWD), each with its weight.
`from_config` builds the distillation method (`jaxcomp.distill.transform`) of a config.
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
from jax import lax

from jaxcomp import distill, transforms
from jaxcomp.distill.transform import captured, distillation, layer_filter

HEATMAP_WEIGHTINGS = ("none", "teacher", "foreground")
REGRESSION_POSITIONS = ("teacher_peaks", "gt_centers")


@dataclasses.dataclass(frozen=True)
class DistillSpec:
    """The distillation terms of a detector train step (hashable, so static under `jax.jit`).

    A term with weight 0 is not computed. Build it from a config with `spec_of`.

    Attributes:
      temperature: of the heatmap soft targets.
      heatmap_loss: registry name of the heatmap term ('sigmoid_kl', 'cwd', ...).
      heatmap_weight: its weight in the total loss.
      heatmap_weighting: 'none', 'teacher' (each element by the teacher's sigmoid score)
        or 'foreground' (by the ground-truth Gaussian heatmap).
      regression_loss: registry name of the size and offset terms ('l1').
      size_weight: weight of the size imitation term.
      offset_weight: weight of the offset imitation term.
      regression_at: 'teacher_peaks' (3x3 local maxima of the teacher's heatmap above
        `peak_threshold`) or 'gt_centers'.
      peak_threshold: teacher score a peak needs.
      feature_loss: registry name of the feature term ('pkd', 'cwd').
      feature_weight: weight of the feature terms (0: no feature distillation).
      feature_temperature: temperature of the feature term (CWD uses it).
      feature_layers: ((module path, weight), ...): the feature maps compared, each
        term weighted by `feature_weight * weight`.
    """

    temperature: float = 1.0
    heatmap_loss: str = "sigmoid_kl"
    heatmap_weight: float = 1.0
    heatmap_weighting: str = "teacher"
    regression_loss: str = "l1"
    size_weight: float = 0.1
    offset_weight: float = 1.0
    regression_at: str = "teacher_peaks"
    peak_threshold: float = 0.1
    feature_loss: str = "pkd"
    feature_weight: float = 1.0
    feature_temperature: float = 1.0
    feature_layers: tuple[tuple[str, float], ...] = (("neck", 1.0),)

    def __post_init__(self):
        layers = tuple((str(layer), weight) for layer, weight in self.feature_layers)
        object.__setattr__(self, "feature_layers", layers)
        for layer, weight in layers:
            if not (isinstance(weight, int | float) and weight >= 0):
                raise ValueError(f"feature_layers weight of {layer!r} must be >= 0, got {weight!r}")
        for field in ("heatmap_loss", "regression_loss", "feature_loss"):
            distill.get_loss(getattr(self, field))
        for field in ("heatmap_weight", "size_weight", "offset_weight", "feature_weight"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and value >= 0):
                raise ValueError(
                    f"distillation {field} must be >= 0 (0 turns the term off), got {value!r}"
                )
        distill.check_temperature(self.temperature)
        distill.check_temperature(self.feature_temperature)
        if self.heatmap_weighting not in HEATMAP_WEIGHTINGS:
            raise ValueError(
                f"heatmap_weighting={self.heatmap_weighting!r}; use one of {HEATMAP_WEIGHTINGS}"
            )
        if self.regression_at not in REGRESSION_POSITIONS:
            raise ValueError(
                f"regression_at={self.regression_at!r}; use one of {REGRESSION_POSITIONS}"
            )

    @property
    def uses_features(self) -> bool:
        """Whether the step needs the feature maps of both networks."""
        return self.feature_weight > 0 and bool(self.feature_layers)

    @property
    def layers(self) -> tuple[str, ...]:
        """The module paths whose feature maps are compared (none without features)."""
        return tuple(layer for layer, _ in self.feature_layers) if self.uses_features else ()


def peak_weights(heatmap_logits: jax.Array, threshold: float) -> jax.Array:
    """1.0 at cells where some class is a 3x3 local maximum with score > `threshold`.

    Args:
      heatmap_logits: [B, h, w, C] logits.
      threshold: minimum sigmoid score.

    Returns:
      [B, h, w, 1] float32 of 0/1.
    """
    scores = jax.nn.sigmoid(jnp.asarray(heatmap_logits, jnp.float32))
    neighbourhood_max = lax.reduce_window(
        scores, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME"
    )
    peaks = (scores == neighbourhood_max) & (scores > threshold)
    return jnp.any(peaks, axis=-1, keepdims=True).astype(jnp.float32)


def center_weights(center_index: jax.Array, target_mask: jax.Array, height: int, width: int):
    """1.0 at the ground-truth centre cells of a batch (`encode_targets` fields).

    Args:
      center_index: int [B, K] flat `y * w + x` of each object's centre.
      target_mask: [B, K], 1 for real objects.
      height, width: the output grid.

    Returns:
      [B, h, w, 1] float32.
    """
    batch = center_index.shape[0]
    grid = jnp.zeros((batch, height * width), jnp.float32)
    rows = jnp.arange(batch)[:, None]
    grid = grid.at[rows, center_index.astype(jnp.int32)].max(jnp.asarray(target_mask, jnp.float32))
    return grid.reshape(batch, height, width, 1)


def _heatmap_weights(spec: DistillSpec, teacher_logits: jax.Array, batch: dict):
    if spec.heatmap_weighting == "teacher":
        return jax.nn.sigmoid(jnp.asarray(teacher_logits, jnp.float32))
    if spec.heatmap_weighting == "foreground":
        return jnp.asarray(batch["heatmap"], jnp.float32)
    return None


def distillation_loss(
    student_outputs: dict[str, jax.Array],
    teacher_outputs: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    spec: DistillSpec,
    student_features: Mapping[str, jax.Array] | None = None,
    teacher_features: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted distillation terms of a CenterNet student against its teacher.

    Args:
      student_outputs: {'heatmap', 'size', 'offset'} of the student.
      teacher_outputs: the teacher's, same shapes (gradients are stopped).
      batch: the train batch (`heatmap`, `center_index`, `target_mask` fields are read
        for 'foreground' weighting and 'gt_centers').
      spec: which terms and weights.
      student_features: the student's feature maps by layer, already adapted to the
        teacher's widths.
      teacher_features: the teacher's feature maps by layer (needed when
        `spec.uses_features`).

    Returns:
      `(total, terms)`: the weighted sum and the unweighted terms as
      `distill_heatmap`, `distill_size`, `distill_offset`, `distill_feature` (the
      feature terms summed with their layer weights) and, with several layers,
      `distill_feature_<layer>` each.
    """
    teacher_outputs = jax.lax.stop_gradient(teacher_outputs)
    for head in ("heatmap", "size", "offset"):
        if student_outputs[head].shape != teacher_outputs[head].shape:
            raise ValueError(
                f"distillation needs equal head outputs, but '{head}' is "
                f"{tuple(student_outputs[head].shape)} for the student and "
                f"{tuple(teacher_outputs[head].shape)} for the teacher; train both on the "
                "same dataset (classes) and image size"
            )
    terms = {}
    if spec.heatmap_weight > 0:
        weights = _heatmap_weights(spec, teacher_outputs["heatmap"], batch)
        terms["distill_heatmap"] = distill.get_loss(spec.heatmap_loss)(
            student_outputs["heatmap"],
            teacher_outputs["heatmap"],
            temperature=spec.temperature,
            weights=weights,
        )
    if spec.size_weight > 0 or spec.offset_weight > 0:
        _, height, width, _ = teacher_outputs["heatmap"].shape
        if spec.regression_at == "teacher_peaks":
            positions = peak_weights(teacher_outputs["heatmap"], spec.peak_threshold)
        else:
            positions = center_weights(batch["center_index"], batch["target_mask"], height, width)
        loss = distill.get_loss(spec.regression_loss)
        for head, weight in (("size", spec.size_weight), ("offset", spec.offset_weight)):
            if weight > 0:
                terms[f"distill_{head}"] = loss(
                    student_outputs[head],
                    teacher_outputs[head],
                    temperature=spec.temperature,
                    weights=positions,
                )
    if spec.uses_features:
        if student_features is None or teacher_features is None:
            raise ValueError("feature distillation needs both networks' feature maps")
        feature_loss = distill.get_loss(spec.feature_loss)
        per_layer = {
            layer: feature_loss(
                student_features[layer],
                teacher_features[layer],
                temperature=spec.feature_temperature,
                weights=None,
            )
            for layer, _ in spec.feature_layers
        }
        terms["distill_feature"] = sum(
            (weight * per_layer[layer] for layer, weight in spec.feature_layers), jnp.zeros(())
        )
        if len(per_layer) > 1:
            terms.update(
                {f"distill_feature_{layer.replace('/', '_')}": v for layer, v in per_layer.items()}
            )
    weights = {
        "distill_heatmap": spec.heatmap_weight,
        "distill_size": spec.size_weight,
        "distill_offset": spec.offset_weight,
        "distill_feature": spec.feature_weight,
    }
    # Per-layer feature terms are logged only: `distill_feature` holds their weighted sum.
    total = sum(
        (weight * terms[name] for name, weight in weights.items() if name in terms), jnp.zeros(())
    )
    return total, terms


def spec_of(config: ml_collections.ConfigDict) -> DistillSpec:
    """The distillation terms of `config.distill` (raises ValueError on bad names or values)."""
    fields = {field.name for field in dataclasses.fields(DistillSpec)}
    return DistillSpec(**{name: config.distill[name] for name in sorted(fields)})


def _feature_widths(model, variables, image_size: int, layers) -> tuple[dict, dict]:
    """Shapes of a detector's head outputs and the widths of its maps at `layers`."""
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)

    def run(variables, images):
        return model.apply(
            variables,
            images,
            train=False,
            capture_intermediates=layer_filter(layers),
            mutable=["intermediates"],
        )

    outputs, collections = jax.eval_shape(run, variables, images)
    return outputs, {layer: captured(collections, layer).shape[-1] for layer in layers}


def from_config(config: ml_collections.ConfigDict, context) -> transforms.Transform | None:
    """The distillation method of `config.distill` (None without a teacher).

    The teacher's head outputs must have the student's shapes; feature maps of other
    widths get 1x1 adapters. Raises before anything is trained when the teacher's
    checkpoint is missing or does not fit `config.distill.teacher_model`.

    Args:
      config: the experiment config.
      context: a `jaxcomp.methods.MethodContext`.
    """
    settings = config.distill
    if not settings.teacher:
        return None
    spec = spec_of(config)
    teacher = context.create_model(settings.teacher_model, settings.teacher_channels)
    teacher_shapes = context.abstract_variables(teacher)
    size = context.image_size
    student_out, student_widths = _feature_widths(
        context.model, context.variables, size, spec.layers
    )
    teacher_out, teacher_widths = _feature_widths(teacher, teacher_shapes, size, spec.layers)
    for head, shape in student_out.items():
        if teacher_out[head].shape != shape.shape:
            raise ValueError(
                f"config.distill.teacher_model={settings.teacher_model!r} predicts "
                f"'{head}' of shape {teacher_out[head].shape} but the student "
                f"{config.model.name!r} {shape.shape}; distil between detectors of the same "
                "dataset (classes) and output stride"
            )
    teacher_variables = context.load_variables(
        settings.teacher,
        teacher_shapes,
        field="config.distill.teacher",
        model_field="config.distill.teacher_model",
    )
    adapters = {
        layer: (student_widths[layer], teacher_widths[layer])
        for layer in spec.layers
        if student_widths[layer] != teacher_widths[layer]
    }

    def task_loss(student_outputs, teacher_outputs, batch, student_features, teacher_features):
        return distillation_loss(
            student_outputs, teacher_outputs, batch, spec, student_features, teacher_features
        )

    return distillation(
        teacher.apply,
        lambda: teacher_variables,
        task_loss,
        inputs=lambda batch: (batch["image"],),
        layers=spec.layers,
        adapters=adapters,
    )

"""A 1x1 adapter that maps student features to the teacher's width for feature losses.

Its parameters train with the student (their own optimizer state, outside the
student's params, so pruning and quantization never see them) and are dropped
at export: the deployed student does not contain them.
"""

import jax
import jax.numpy as jnp


def init_adapter(key: jax.Array, in_features: int, out_features: int) -> dict[str, jax.Array]:
    """Parameters of a 1x1 projection from `in_features` to `out_features` channels.

    Args:
      key: PRNG key.
      in_features: the student's feature channels.
      out_features: the teacher's feature channels.

    Returns:
      {'kernel': [in_features, out_features], 'bias': [out_features]}, He-initialized.

    Example:
      >>> adapter = init_adapter(jax.random.key(0), 64, 128)
      >>> apply_adapter(adapter, jnp.ones((2, 8, 8, 64))).shape
      (2, 8, 8, 128)
    """
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"adapter {name} must be a positive int, got {value!r}")
    kernel = jax.random.normal(key, (in_features, out_features), jnp.float32)
    return {
        "kernel": kernel * jnp.sqrt(2.0 / in_features),
        "bias": jnp.zeros((out_features,), jnp.float32),
    }


def apply_adapter(params: dict[str, jax.Array], features: jax.Array) -> jax.Array:
    """Projects channels-last `features` through the adapter (float32)."""
    kernel = params["kernel"]
    if features.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"the adapter takes {kernel.shape[0]} channels but the features have "
            f"{features.shape[-1]}; initialize it with the student's feature width"
        )
    return jnp.asarray(features, jnp.float32) @ kernel + params["bias"]

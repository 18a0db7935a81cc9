"""Every `>>>` example in jaxcomp's docstrings runs and shows what it prints.

Modules are found by their text, so collection imports none of them; each test imports
one module. A fragment that uses the function's arguments as given (`params`, `model`)
gets them from the module's context below, small and real; paths under /tmp/ are moved
into the test's temporary directory (and /tmp/tfds to the tiny dataset built once).
"""

import doctest
import importlib
import io
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxcomp"


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" in path.read_text():
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


class _ConvDense(nn.Module):
    """A conv and a dense layer: the `model` of the quantization examples."""

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.relu(nn.Conv(4, (3, 3), name="conv")(images))
        return nn.Dense(2, name="dense")(x)


def _quant_context() -> dict:
    from jaxcomp import quant

    model = _ConvDense()
    images = jax.random.uniform(jax.random.key(0), (2, 8, 8, 3), maxval=255.0)
    params = model.init(jax.random.key(1), images)["params"]
    config = quant.QuantConfig()
    quant_stats = quant.calibrate(model.apply, {"params": params}, [images], config, train=False)
    return {
        "model": model,
        "images": images,
        "image_batches": [images],
        "params": params,
        "batch_stats": None,
        "config": config,
        "QuantConfig": quant.QuantConfig,
        "layers": quant.quantized_layers(params, config),
        "quant_stats": quant_stats,
        "variables": {"params": params, "quant_stats": quant_stats},
    }


def _centernet_context() -> dict:
    from jaxcomp.models import centernet

    return {
        "model": centernet.centernet_tiny(num_classes=3),
        "key": jax.random.key(0),
        "images": jnp.zeros((1, 64, 64, 3), jnp.uint8),
    }


def _shrink_context() -> dict:
    from jaxcomp.models import centernet, create_model

    # The tiny detector's variables, random (initialising it compiles for a minute), with
    # four of the heatmap head's hidden channels pruned: their producing kernel is zero.
    model = centernet.centernet_tiny(num_classes=3)
    images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
    rng = np.random.default_rng(0)
    masked = jax.tree.map(
        lambda leaf: rng.standard_normal(leaf.shape).astype(leaf.dtype),
        jax.eval_shape(model.init, jax.random.key(0), images),
    )
    masked["params"]["heatmap"]["conv"]["kernel"][..., :4] = 0.0
    return {
        "masked_variables": masked,
        "centernet": centernet,
        "create_model": create_model,
        "name": "centernet_tiny",
    }


def _pruner_context() -> dict:
    from jaxcomp import prune

    params = {"dense": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4), "bias": jnp.zeros(4)}}
    return {
        "params": params,
        "grads": jax.tree.map(jnp.ones_like, params),
        "one_shot_schedule": prune.one_shot_schedule,
        "schedule": prune.one_shot_schedule(0.8),
    }


def _visualize_context() -> dict:
    from jaxcomp import quant

    return {
        "images": np.zeros((1, 64, 64, 3), np.uint8),
        "det": {
            "boxes": np.array([[[8.0, 8.0, 40.0, 32.0]]]),
            "classes": np.array([[1]]),
            "scores": np.array([[0.9]]),
        },
        "class_names": ["circle", "square"],
        "params": {"conv": {"kernel": jnp.linspace(-1.0, 1.0, 24).reshape(1, 2, 3, 4)}},
        "quant": quant,
    }


# The names each module's examples take as given, by module.
CONTEXTS = {
    "jaxcomp.models.centernet": _centernet_context,
    "jaxcomp.prune.pruner": _pruner_context,
    "jaxcomp.prune.shrink": _shrink_context,
    "jaxcomp.quant.int8": _quant_context,
    "jaxcomp.quant.qat": _quant_context,
    "jaxcomp.visualize": _visualize_context,
}


def test_every_module_with_examples_is_found():
    modules = _modules_with_examples()
    assert "jaxcomp.detection.loss" in modules and "jaxcomp.models" in modules
    assert set(CONTEXTS) <= set(modules)


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples(module_name, tmp_path, tiny_data_dir):
    module = importlib.import_module(module_name)
    context = CONTEXTS.get(module_name, dict)()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report = io.StringIO()
    examples = 0
    for test in doctest.DocTestFinder().find(module, module_name):
        test.globs.update(context)
        for example in test.examples:
            example.source = example.source.replace('"/tmp/tfds"', repr(tiny_data_dir))
            example.source = example.source.replace('"/tmp/', f'"{tmp_path}/')
        examples += len(test.examples)
        runner.run(test, out=report.write)
    plt.close("all")
    assert examples > 0
    assert runner.failures == 0, report.getvalue()

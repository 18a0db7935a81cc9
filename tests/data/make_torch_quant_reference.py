"""Records PyTorch's fake-quant outputs, gradients and observer qparams for our tests.

Run with a scratch environment that has torch (never the project's .venv):

    python3.11 -m venv /tmp/torchq && /tmp/torchq/bin/pip install torch==2.13.0 numpy
    /tmp/torchq/bin/python tests/data/make_torch_quant_reference.py

It writes tests/data/torch_quant_reference.json, which
tests/test_quant_numerics.py compares `jaxcomp.quant.numerics` against.
"""

import json
import pathlib

import numpy as np
import torch
from torch.ao.quantization import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    PerChannelMinMaxObserver,
)

OUT = pathlib.Path(__file__).with_name("torch_quant_reference.json")


def _floats(tensor: torch.Tensor) -> list:
    # float32 values survive a round trip through JSON's float64 exactly.
    return tensor.detach().to(torch.float64).tolist()


def _inputs(rng: np.random.Generator, scale: float, zero_point: int, qmin: int, qmax: int):
    """Random values, values exactly on .5 rounding boundaries, and values outside the range."""
    random = rng.normal(0.0, 0.6 * scale * (qmax - qmin) / 2, size=40)
    halves = (np.arange(-6, 6) + 0.5 - zero_point) * scale
    outside = np.array([(qmin - zero_point - 3) * scale, (qmax - zero_point + 3) * scale, 0.0])
    return np.concatenate([random, halves, outside]).astype(np.float32)


def per_tensor_cases(rng: np.random.Generator) -> list:
    cases = []
    for scale, zero_point, qmin, qmax in [
        (0.1, 0, -128, 127),
        (0.05, 37, 0, 255),
        (0.25, -3, -128, 127),
        (0.0123, 5, -127, 127),
        (0.3, 0, -8, 7),
    ]:
        x = torch.tensor(_inputs(rng, scale, zero_point, qmin, qmax), requires_grad=True)
        upstream = torch.tensor(rng.normal(size=x.shape).astype(np.float32))
        y = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
        y.backward(upstream)
        cases.append(
            {
                "x": _floats(x),
                "scale": scale,
                "zero_point": zero_point,
                "qmin": qmin,
                "qmax": qmax,
                "upstream": _floats(upstream),
                "out": _floats(y),
                "grad": _floats(x.grad),
            }
        )
    return cases


def per_channel_cases(rng: np.random.Generator) -> list:
    cases = []
    for shape, axis, qmin, qmax, affine in [
        ((3, 3, 2, 4), 3, -127, 127, False),
        ((5, 3, 2), 0, -128, 127, True),
    ]:
        channels = shape[axis]
        scale = rng.uniform(0.01, 0.2, size=channels).astype(np.float32)
        zero_point = rng.integers(-20, 20, size=channels) if affine else np.zeros(channels, int)
        x = rng.normal(0.0, 8.0, size=shape).astype(np.float32)
        index = [slice(None)] * len(shape)
        index[axis] = 0
        # Channel 0 holds exact .5 boundaries and out-of-range values.
        boundary = (np.arange(x[tuple(index)].size) - 3.5 - zero_point[0]) * scale[0]
        boundary[-1] = (qmax + 10 - zero_point[0]) * scale[0]
        x[tuple(index)] = boundary.reshape(x[tuple(index)].shape)
        x_t = torch.tensor(x, requires_grad=True)
        upstream = torch.tensor(rng.normal(size=shape).astype(np.float32))
        y = torch.fake_quantize_per_channel_affine(
            x_t,
            torch.tensor(scale),
            torch.tensor(zero_point, dtype=torch.int32),
            axis,
            qmin,
            qmax,
        )
        y.backward(upstream)
        cases.append(
            {
                "shape": list(shape),
                "x": _floats(x_t.flatten()),
                "axis": axis,
                "scale": scale.astype(np.float64).tolist(),
                "zero_point": zero_point.tolist(),
                "qmin": qmin,
                "qmax": qmax,
                "upstream": _floats(upstream.flatten()),
                "out": _floats(y.flatten()),
                "grad": _floats(x_t.grad.flatten()),
            }
        )
    return cases


def observer_cases(rng: np.random.Generator) -> list:
    batches = [rng.normal(0.5, 2.0, size=(2, 3, 4)).astype(np.float32) for _ in range(3)]
    positive = [np.abs(batch) + 0.25 for batch in batches]
    constant = [np.full((2, 3), 0.7, np.float32)]
    zeros = [np.zeros((2, 3), np.float32)]
    observers = [
        ("quint8_affine", dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine), batches),
        ("qint8_affine", dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine), batches),
        (
            "qint8_affine_positive",
            dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
            positive,
        ),
        ("qint8_symmetric", dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric), batches),
        (
            "qint8_affine_constant",
            dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
            constant,
        ),
        (
            "qint8_symmetric_zeros",
            dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric),
            zeros,
        ),
    ]
    cases = []
    for name, kwargs, data in observers:
        observer = MinMaxObserver(**kwargs)
        for batch in data:
            observer(torch.tensor(batch))
        scale, zero_point = observer.calculate_qparams()
        cases.append(
            {
                "name": name,
                "kind": "minmax",
                "symmetric": kwargs["qscheme"] == torch.per_tensor_symmetric,
                "batches": [batch.astype(np.float64).tolist() for batch in data],
                "qmin": observer.quant_min,
                "qmax": observer.quant_max,
                "min": float(observer.min_val),
                "max": float(observer.max_val),
                "scale": _floats(scale),
                "zero_point": zero_point.tolist(),
            }
        )
    observer = MovingAverageMinMaxObserver(
        averaging_constant=0.1, dtype=torch.qint8, qscheme=torch.per_tensor_affine
    )
    for batch in batches:
        observer(torch.tensor(batch))
    scale, zero_point = observer.calculate_qparams()
    cases.append(
        {
            "name": "qint8_affine_ema",
            "kind": "ema",
            "momentum": 0.9,
            "symmetric": False,
            "batches": [batch.astype(np.float64).tolist() for batch in batches],
            "qmin": observer.quant_min,
            "qmax": observer.quant_max,
            "min": float(observer.min_val),
            "max": float(observer.max_val),
            "scale": _floats(scale),
            "zero_point": zero_point.tolist(),
        }
    )
    # A HWIO conv kernel: torch observes OIHW weights along axis 0.
    kernel = rng.normal(0.0, 0.3, size=(3, 3, 4, 6)).astype(np.float32)
    kernel[..., 2] = 0.0  # a pruned output channel must still get a scale
    for name, quant_range in [
        ("per_channel_symmetric", {}),
        ("per_channel_narrow", {"quant_min": -127, "quant_max": 127}),
    ]:
        observer = PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, **quant_range
        )
        observer(torch.tensor(kernel).permute(3, 2, 0, 1).contiguous())
        scale, zero_point = observer.calculate_qparams()
        cases.append(
            {
                "name": name,
                "kind": "per_channel",
                "symmetric": True,
                "kernel": kernel.astype(np.float64).tolist(),
                "qmin": observer.quant_min,
                "qmax": observer.quant_max,
                "scale": _floats(scale),
                "zero_point": zero_point.tolist(),
            }
        )
    return cases


def main() -> None:
    rng = np.random.default_rng(0)
    reference = {
        "torch_version": torch.__version__,
        "per_tensor": per_tensor_cases(rng),
        "per_channel": per_channel_cases(rng),
        "observers": observer_cases(rng),
    }
    OUT.write_text(json.dumps(reference) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes) with torch {torch.__version__}")


if __name__ == "__main__":
    main()

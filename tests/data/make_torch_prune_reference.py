"""Records what `torch.nn.utils.prune.l1_unstructured` prunes, for tests/test_prune_masks.py.

Run it with a Python that has torch (not the project's venv, which must not need it):

    python3.11 -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch==2.13.0 numpy
    /tmp/torchref/bin/python tests/data/make_torch_prune_reference.py

It writes tests/data/torch_prune_reference.json: for each case the input, the
amount, how many entries torch pruned and its mask. Amounts include ones where
amount * n ends in .5 exactly (torch rounds half to even, as Python's round),
and inputs with ties (integer values).
"""

import json
import os

import numpy as np
import torch
from torch.nn.utils import prune


def _torch_mask(values: np.ndarray, amount: float) -> np.ndarray:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.from_numpy(values.copy()))
    prune.l1_unstructured(module, name="weight", amount=amount)
    return module.weight_mask.numpy().astype(bool)


def _cases() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(20240601)
    normal_8 = rng.standard_normal((2, 4)).astype(np.float32)
    normal_20 = rng.standard_normal((4, 5)).astype(np.float32)
    normal_24 = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ties = rng.integers(-3, 4, size=(4, 6)).astype(np.float32)
    return [
        # amount * 8 = 0.5, 1.5, 2.5, 3.5: half to even gives 0, 2, 2, 4.
        ("normal_8", normal_8, 0.0625),
        ("normal_8", normal_8, 0.1875),
        ("normal_8", normal_8, 0.3125),
        ("normal_8", normal_8, 0.4375),
        ("normal_20", normal_20, 0.3),
        ("normal_20", normal_20, 0.525),
        ("normal_20", normal_20, 0.9),
        ("normal_24", normal_24, 0.1875),
        ("normal_24", normal_24, 0.5),
        ("ties_24", ties, 0.25),
        ("ties_24", ties, 0.5),
        ("ties_24", ties, 0.6875),
    ]


def main() -> None:
    records = []
    for name, values, amount in _cases():
        mask = _torch_mask(values, amount)
        records.append(
            {
                "name": name,
                "shape": list(values.shape),
                "values": values.ravel().tolist(),
                "amount": amount,
                "num_pruned": int((~mask).sum()),
                "mask": mask.ravel().astype(int).tolist(),
                "has_ties": bool(np.unique(np.abs(values)).size < values.size),
            }
        )
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_prune_reference.json")
    with open(path, "w") as file:
        json.dump({"torch_version": torch.__version__, "cases": records}, file, indent=1)
        file.write("\n")
    print(f"wrote {len(records)} cases to {path} (torch {torch.__version__})")


if __name__ == "__main__":
    main()

r"""Levers for high sparsity: a longer schedule and layer-wise allocations, same budget.

Train the dense student first (configs/student.py), then one run per lever, e.g.
  python -m jaxcomp.main --config=configs/prune_levers.py:lamp_3000 \
    --workdir=workdirs/levers/lamp_3000
or all eight (four allocations at two budgets):
  for lever in {layer,global,lamp,erk}_{600,3000}; do
    python -m jaxcomp.main --config=configs/prune_levers.py:$lever --workdir=workdirs/levers/$lever
  done
Other sparsities (0.8 by default): `--config=configs/prune_levers.py:lamp_3000:0.9`.

Every lever is configs/prune_magnitude.py (gradual magnitude pruning of the conv
kernels its rules select, masks every 50 steps) with two changes, named
`<scope>_<steps>`: `config.prune.scope`, how the sparsity is allocated across layers
('layer' uniform, 'global' one ranking, 'lamp', 'erk': docs/pruning.md), and the
schedule: '600' is prune_magnitude.py's own (1000 fine-tuning steps, pruning over
the first 600), '3000' fine-tunes for 3000 steps and prunes over the first 2400.
The 3000-step levers share one budget (steps, batch, learning rate, schedule, rules)
and differ only in the scope.

Expected (80%, from the student at 20.4 AP): layer_600 12.5 AP, layer_3000 15.4,
global_600 15.4, erk_600 19.7, lamp_600 21.1 (docs/pruning.md); each run writes
`compression.json` and `sparsity.png` (per-layer sparsity) to its workdir. A
3000-step run takes about three times as long as configs/prune_magnitude.py.
"""

import os

from jaxcomp.config import load_config_file

LEVERS = tuple(
    f"{scope}_{steps}" for steps in ("600", "3000") for scope in ("layer", "global", "lamp", "erk")
)


def get_config(arg: str = "layer_3000"):
    lever, _, sparsity = arg.partition(":")
    if lever not in LEVERS:
        raise ValueError(f"unknown lever {lever!r}; configs/prune_levers.py has {LEVERS}")
    magnitude = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prune_magnitude.py")
    config = load_config_file(f"{magnitude}:{sparsity or '0.8'}")
    scope, steps = lever.split("_")
    config.prune.scope = scope
    if steps == "3000":
        config.train.steps = 3000
        config.prune.end_step = 2400
    return config

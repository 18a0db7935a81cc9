r"""Gradual movement pruning (Sanh et al. 2020) of the trained student, then fine-tuning.

Train the dense student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/prune_movement.py --workdir=workdirs/prune_movement
Other sparsities: `--config=configs/prune_movement.py:0.5`.

configs/prune_magnitude.py with one change: each weight is scored by its accumulated
movement `-sum_t w_t * g_t` (`prune.SCORES['movement']`, kept in the pruning method's
state and checkpointed) instead of its magnitude; the same schedule (0 to the target
over the first 600 of 1000 steps, masks every 50 steps), rules and budget.

Expected: the comparison with magnitude pruning at 50% and 80% in docs/pruning.md
(about 6 minutes per run on 2 CPU cores).
"""

import os

from jaxcomp.config import load_config_file


def get_config(sparsity: str = "0.8"):
    magnitude = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prune_magnitude.py")
    config = load_config_file(f"{magnitude}:{sparsity}")
    config.prune.score = "movement"
    return config

r"""2:4 (N:M) pruning of the trained student along input channels, then fine-tuning.

Train the dense student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/prune_nm.py --workdir=workdirs/prune_nm
Other patterns: `--config.prune.n=1 --config.prune.m=4`.

In every group of 4 consecutive input-channel weights of each conv the 2 largest
stay (the pattern sparse tensor cores run at 2x); depthwise kernels (one input
channel), the first conv and the heatmap's last conv stay dense. The pattern is
imposed at the first step and the remaining weights fine-tune for 1000 steps.

Expected: see the measured table in docs/pruning.md (about 5 minutes on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config():
    config = finetune_config()
    config.prune.method = "nm"
    config.prune.n = 2
    config.prune.m = 4
    config.prune.sparsity = 0.5  # n/m; reported, the pattern itself sets the masks
    config.prune.schedule = "one_shot"
    config.prune.begin_step = 0
    return config

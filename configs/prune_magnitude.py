r"""Gradual magnitude pruning of the trained student to 80% sparsity, then fine-tuning.

Train the dense student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/prune_magnitude.py --workdir=workdirs/prune_magnitude
Other sparsities: `--config=configs/prune_magnitude.py:0.9`; global ranking:
`--config.prune.scope=global`; another start: `--config.init_from=path/to/workdir`.

Zhu & Gupta's polynomial schedule raises the sparsity of every conv kernel (not the
first conv, the heatmap's last conv or the 3x3 depthwise kernels: see
`jaxcomp.methods.default_prune_rules`) from 0 to the target over the first 600 of
1000 steps, updating the masks every 50 steps; the last 400 steps fine-tune with
the masks fixed. The run ends with mAP, per-layer sparsity, FLOPs and bytes on disk
(dense vs bitmask + values) in `compression.json`.

Expected: see the measured table in docs/pruning.md (AP50 of dense vs 50/80/90% and 2:4;
about 5 minutes per run on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config(sparsity: str = "0.8"):
    config = finetune_config()
    config.prune.method = "unstructured"
    config.prune.sparsity = float(sparsity)
    config.prune.schedule = "polynomial"
    config.prune.begin_step = 0
    config.prune.end_step = 600
    config.prune.frequency = 50
    return config

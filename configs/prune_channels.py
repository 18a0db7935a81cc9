r"""Channel pruning of the trained student (half the expansion and head channels), then shrinking.

Train the dense student first (configs/student.py), then:
  python -m jaxcomp.main --config=configs/prune_channels.py --workdir=workdirs/prune_channels
Other fractions: `--config=configs/prune_channels.py:0.3`.

The channels that are free to go (the expansion channels inside each inverted
residual block, shared by its expand conv, BatchNorm, depthwise conv and the
project conv's input, and the heads' hidden channels; not the channels tied
across residual adds) are ranked by their producing filter's L1 norm and removed
gradually over 600 of 1000 steps. At the end the masked model is shrunk into a
physically smaller one (fewer channels: `export/shrunk`, its widths in
`compression.json` as `config.model.channels`), evaluated again, and its parameters
and FLOPs are reported next to the dense model's.

Expected: see the measured table in docs/pruning.md (about 5 minutes on 2 CPU cores).
"""

from jaxcomp.config import finetune_config


def get_config(fraction: str = "0.5"):
    config = finetune_config()
    config.prune.method = "channel"
    config.prune.sparsity = float(fraction)
    config.prune.schedule = "polynomial"
    config.prune.begin_step = 0
    config.prune.end_step = 600
    config.prune.frequency = 50
    return config

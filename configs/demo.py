r"""The demo: teacher and student trained briefly, then the student pruned to 50%.

Command (all stages, then a side-by-side table):
  make demo        # = python -m jaxcomp.demo --workdir=workdirs/demo
One stage alone:
  python -m jaxcomp.main --config=configs/demo.py:teacher --workdir=workdirs/demo/teacher
  python -m jaxcomp.main --config=configs/demo.py:pruned --workdir=workdirs/demo/pruned \
    --config.init_from=workdirs/demo/student

Expected: see the README (AP50 of each, minutes on 2 CPU cores).
"""

from jaxcomp.config import default_config, finetune_config, model_for_role

STAGES = ("teacher", "student", "pruned")


def get_config(arg: str = "student"):
    if arg == "pruned":
        # Gradual magnitude pruning of the demo student to 50%, masks fixed after step 200.
        config = finetune_config("workdirs/demo/student")
        config.train.steps = 300
        config.train.checkpoint_every = 100
        config.optim.warmup_steps = 25
        config.prune.method = "unstructured"
        config.prune.sparsity = 0.5
        config.prune.begin_step = 0
        config.prune.end_step = 200
        config.prune.frequency = 25
        return config
    config = default_config()
    config.model.name = model_for_role(arg)
    config.train.steps = 800
    config.train.checkpoint_every = 200
    return config

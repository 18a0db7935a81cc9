r"""The demo: teacher and student trained briefly on the embedded dataset.

Command (both runs, then a side-by-side table):
  make demo        # = python -m jaxcomp.demo --workdir=workdirs/demo
One run alone:
  python -m jaxcomp.main --config=configs/demo.py:teacher --workdir=workdirs/demo/teacher

Expected: see the README (AP50 of each, minutes on 2 CPU cores).
"""

from jaxcomp.config import default_config, model_for_role


def get_config(arg: str = "student"):
    config = default_config()
    config.model.name = model_for_role(arg)
    config.train.steps = 800
    config.train.checkpoint_every = 200
    return config

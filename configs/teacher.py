r"""Teacher: CenterNet on MobileNetV2 x1.0 (neck/heads 128), embedded dataset, 128x128.

Command:
  python -m jaxcomp.main --config=configs/teacher.py --workdir=workdirs/teacher

Expected: see the README's configs table (AP50 and time on 2 CPU cores).
"""

from jaxcomp.config import default_config


def get_config():
    config = default_config()
    config.model.name = "centernet_teacher"
    return config

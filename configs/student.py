r"""Student: CenterNet on MobileNetV2 x0.5 (neck/heads 64), embedded dataset, 128x128.

Command:
  python -m jaxcomp.main --config=configs/student.py --workdir=workdirs/student
Other widths: `--config=configs/student.py:centernet_student_w035` (or `_w075`).

Expected: see the README's configs table (AP50 and time on 2 CPU cores).
"""

from jaxcomp.config import default_config


def get_config(model: str = "centernet_student"):
    config = default_config()
    config.model.name = model
    return config

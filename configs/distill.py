r"""The student distilled from the trained teacher, otherwise trained as configs/student.py.

Train the teacher first (configs/teacher.py), then:
  python -m jaxcomp.main --config=configs/distill.py --workdir=workdirs/distilled
Other widths (the lightweight-design axis): `--config=configs/distill.py:centernet_student_w035`
(or `_w075`); another teacher: `--config.distill.teacher=path/to/its/workdir`.

Each train step runs the frozen teacher (inference mode) on the same augmented
batch and adds to the detection loss: the heatmap as per-class sigmoid soft
targets weighted by the teacher's confidence, the size and offset maps imitated
(L1) at the teacher's peaks, and PKD on the stride-4 neck features (a 1x1 adapter
maps the student's 64 channels to the teacher's 128; it is not exported).

Expected: see the measured table in docs/distillation.md (AP of the distilled against the
plain student; about 45 minutes on 2 CPU cores).
"""

from jaxcomp.config import default_config


def get_config(model: str = "centernet_student"):
    config = default_config()
    config.model.name = model
    config.distill.teacher = "workdirs/teacher"
    config.train.eval_every = 500
    return config

r"""Teacher or student on COCO 2017 (80 classes) at 512x512.

COCO's TFDS builder needs TensorFlow to prepare the data (reading does not):
  pip install -e '.[tf]' && tfds build coco/2017 --file_format=array_record
Command:
  python -m jaxcomp.main --config=configs/coco.py:student --workdir=workdirs/coco_student

Expected: not measured on this project's machines (no COCO download there); meant
for a GPU host or a TPU slice (add --distributed on several hosts).
"""

from jaxcomp.config import default_config, model_for_role


def get_config(arg: str = "student"):
    config = default_config()
    config.model.name = model_for_role(arg)
    config.data.name = "coco/2017"
    config.data.train_split = "train"
    config.data.eval_split = "validation"
    config.data.image_size = 512
    config.data.max_objects = 100
    config.data.num_workers = 16
    config.train.steps = 140_000
    config.train.batch_size = 128
    config.train.checkpoint_every = 5000
    config.train.eval_every = 20_000
    # Untuned (no download on this project's machines); the embedded default is for batch 8.
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 2000
    config.eval.batch_size = 64
    return config

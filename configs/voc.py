r"""Teacher or student on PASCAL VOC 2007 (20 classes) at 384x384.

Prepare the data once (downloads ~900 MB; no TensorFlow needed):
  tfds build voc/2007 --file_format=array_record
Command:
  python -m jaxcomp.main --config=configs/voc.py:student --workdir=workdirs/voc_student

Expected: not measured on this project's machines (no VOC download there); from
scratch on 2 CPU cores this is days of training, so run it on a GPU or TPU.
"""

from jaxcomp.config import default_config, model_for_role


def get_config(arg: str = "student"):
    config = default_config()
    config.model.name = model_for_role(arg)
    config.data.name = "voc/2007"
    config.data.train_split = "train"
    config.data.eval_split = "test"
    config.data.image_size = 384
    config.data.max_objects = 48
    config.data.num_workers = 8
    config.train.steps = 60_000
    config.train.batch_size = 64
    config.train.checkpoint_every = 2000
    config.train.eval_every = 10_000
    # Untuned (no download on this project's machines); the embedded default is for batch 8.
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 1000
    return config

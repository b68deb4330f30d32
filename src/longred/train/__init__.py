"""longred.train: the student's training loop (LongReD's three objectives from the teacher cache).

Entry points: `run_training(TrainConfig(...))` (the `longred train` command) and `TrainConfig`, whose fields
are the command's flags and YAML keys. Components: config, schedule (micro-step plan, effective weights,
LR), student (model, optimizer, structural checks), data (streams, micro-batches, online targets),
objectives (losses inside the wrapped module), parallel (DDP / FSDP2), checkpoint, metrics, trainer.
"""

from longred.train.config import METHODS, TrainConfig
from longred.train.trainer import Trainer, run_training

__all__ = ["METHODS", "TrainConfig", "Trainer", "run_training"]

"""Training: the trainer (wiring and loop), one step (step.py), checkpoints, EMA, the accelerate boundary
(accel.py, the only place that unwraps), speed and memory options, and hooks."""
from stepdistill.training.hooks import DEFAULT_HOOKS, Hook
from stepdistill.training.run import run_training
from stepdistill.training.step import NonFiniteError
from stepdistill.training.trainer import Trainer, TrainResult, train

__all__ = ["DEFAULT_HOOKS", "Hook", "NonFiniteError", "TrainResult", "Trainer", "run_training", "train"]

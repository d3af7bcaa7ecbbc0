"""The one training loop and its machinery: a `Task` says what differs between trainings, `run` / `train` own
device, precision, DDP, accumulation, schedule, logging, checkpoints and resume (loop.py), one optimizer step
(step.py, also what `compare` times), and the parts they use: checkpoints and run folders, the config check of a
resume, the metrics window and its guards, signals, process groups, logging, the lr schedule and optimizer, fitting
a recipe to the machine."""

from .loop import run, train
from .step import StepPath, seconds_per_step
from .task import Position, Runtime, Task, start_runtime

__all__ = ["Position", "Runtime", "StepPath", "Task", "run", "seconds_per_step", "start_runtime", "train"]

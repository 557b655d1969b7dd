"""rnnkit.tasks: one module per application (forecast, text, classify, seq2seq, memory, gradflow).

Tasks are the glue from data to model to trainer to report; the CLI reaches training only through
the names re-exported here.
"""
from ..layers import backend_scope
from ..train import (
    BACKENDS,
    MODES,
    SCHEDULES,
    TrainConfig,
    TrainingError,
    TrainingInterrupted,
)

__all__ = ["TrainConfig", "TrainingError", "TrainingInterrupted", "SCHEDULES", "MODES", "BACKENDS", "backend_scope"]

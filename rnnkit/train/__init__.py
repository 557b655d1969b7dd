"""Training: the loop, its configuration, batch sources, truncated BPTT over streams, checkpoints.

    from rnnkit.train import Trainer, TrainConfig, TensorBatches
    result = Trainer(model, TrainConfig(epochs=50, clip_norm=1.0, out="run"), loss_fn, evaluate).fit((X, Y))
"""
from .batches import BatchSource, TensorBatches, to_device
from .checkpoint import (Checkpoint, atomic_write, load_checkpoint, load_weights, load_weights_into, read_manifest,
                         save_checkpoint)
from .config import BACKENDS, MODES, SCHEDULES, TrainConfig, build_optimizer, build_scheduler, resolve_device
from .tbptt import StreamBatches, Window, detach_state, reset_state, run_segments
from .trainer import (FitResult, History, NonFiniteLossError, Trainer, TrainingError, TrainingInterrupted,
                      seed_everything)

__all__ = ["Trainer", "TrainConfig", "FitResult", "History", "TrainingError", "NonFiniteLossError",
           "TrainingInterrupted", "seed_everything", "BatchSource", "TensorBatches", "StreamBatches", "Window",
           "detach_state", "reset_state", "run_segments", "to_device", "Checkpoint", "save_checkpoint",
           "load_checkpoint", "load_weights", "load_weights_into", "read_manifest", "atomic_write", "build_optimizer",
           "BACKENDS", "build_scheduler", "resolve_device", "SCHEDULES", "MODES"]

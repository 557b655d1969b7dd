"""Batch sources: what `Trainer.fit` walks each epoch.

A batch source has `batches(generator)`, a list of batches for one epoch, and `stateful`, whether the
recurrent state is carried from one batch to the next (truncated BPTT over a stream). All randomness
comes from the generator the trainer passes in, so an epoch can be replayed exactly on resume.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..errors import UserError


class BatchSource(Protocol):
    stateful: bool

    def batches(self, generator: torch.Generator) -> list: ...


class TensorBatches:
    """Mini-batches of aligned tensors (first dimension = examples), reshuffled every epoch."""

    stateful = False

    def __init__(self, *tensors: Tensor, batch_size: int, shuffle: bool = True, drop_last: bool = False):
        if not tensors:
            raise UserError("TensorBatches needs at least one tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors):
            raise UserError(f"tensors must have the same first dimension, got {[len(t) for t in tensors]}")
        if n == 0:
            raise UserError("no training examples: the data is too short for the windows asked for")
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, batch_size, shuffle, drop_last

    def __len__(self) -> int:
        n = len(self.tensors[0])
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, generator: torch.Generator) -> list[tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        chunks = order.split(self.batch_size)
        if self.drop_last and len(chunks) and len(chunks[-1]) < self.batch_size:
            chunks = chunks[:-1]
        return [tuple(t[idx] for t in self.tensors) for idx in chunks]


def to_device(batch, device: torch.device):
    """Move every tensor inside a (nested) batch to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, (tuple, list)):
        moved = [to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if hasattr(batch, "__dataclass_fields__"):
        return type(batch)(**{k: to_device(getattr(batch, k), device) for k in batch.__dataclass_fields__})
    return batch

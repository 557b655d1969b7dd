"""Nested Python state (optimizer and scheduler state dicts, RNG states) as one safetensors file.

Tensors go into the file as tensors; the structure around them (dicts with any keys, lists, tuples,
numbers, strings, numpy arrays) goes into the file's metadata as JSON that points at them. Nothing is
pickled, so loading a checkpoint cannot run code, and every value comes back exactly (floats
round-trip through JSON's repr, tensors bit for bit).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_KEY = "tree"


def dumps(tree) -> bytes:
    """Encode `tree` as safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(tree, tensors)
    return st_save(tensors, metadata={_KEY: json.dumps(skeleton)})


def loads(data: bytes):
    """Decode bytes written by `dumps`."""
    tensors = st_load(data)
    skeleton = json.loads(_metadata(data)[_KEY])
    return _unpack(skeleton, tensors)


def _metadata(data: bytes) -> dict:
    n = int.from_bytes(data[:8], "little")                 # safetensors: u64 header size, then JSON header
    return json.loads(data[8:8 + n])["__metadata__"]


def _pack(x, tensors: dict):
    if isinstance(x, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = x.detach().cpu().contiguous().clone()
        return {"$tensor": key}
    if isinstance(x, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(x.astype(np.int64) if x.dtype.kind in "ui" else x.copy())
        return {"$ndarray": key, "dtype": str(x.dtype)}
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, tuple):
        return {"$tuple": [_pack(v, tensors) for v in x]}
    if isinstance(x, list):
        return [_pack(v, tensors) for v in x]
    if isinstance(x, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in x):
            return {k: _pack(v, tensors) for k, v in x.items()}
        return {"$items": [[_pack(k, tensors), _pack(v, tensors)] for k, v in x.items()]}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot serialise a {type(x).__name__} in training state")


def _unpack(x, tensors: dict):
    if isinstance(x, list):
        return [_unpack(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    if "$tensor" in x:
        return tensors[x["$tensor"]]
    if "$ndarray" in x:
        return tensors[x["$ndarray"]].numpy().astype(x["dtype"])
    if "$tuple" in x:
        return tuple(_unpack(v, tensors) for v in x["$tuple"])
    if "$items" in x:
        return {_unpack(k, tensors): _unpack(v, tensors) for k, v in x["$items"]}
    return {k: _unpack(v, tensors) for k, v in x.items()}

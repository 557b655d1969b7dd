"""Checkpoints: safetensors weights + safetensors training state + a JSON manifest, all written atomically.

A checkpoint directory holds
    checkpoint.json          the manifest: which files are current, epoch and step, the configs
    model-NNNNNN.safetensors the model's state_dict (load it with safetensors.torch.load_file)
    state-NNNNNN.safetensors optimizer, scheduler, RNG states, counters, history (see serialize.py)
Every file is written to a temporary file in the same directory, fsynced, then renamed over its
final name (os.replace is atomic on POSIX and Windows). The new weights and state get new names, and
the manifest is replaced last: that one rename is the commit point. A crash at any moment before it
leaves the previous checkpoint whole; after it, the new one is whole. Old files are removed last.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import UserError
from . import serialize

MANIFEST = "checkpoint.json"
FORMAT = "rnnkit-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    manifest: dict                      # epoch, step, finished, train_config, meta, file names
    weights: dict[str, torch.Tensor]    # the model's state_dict
    state: dict                         # optimizer, scheduler, rng, progress, early stopping, history


def _write(f, data: bytes) -> None:
    """The one place bytes reach a file (tests replace it to simulate a crash mid-write)."""
    f.write(data)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a reader sees either the old file or the whole new one."""
    path = Path(path)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, mode)                               # mkstemp's 0600 is for the temporary name only
            _write(f, data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _file_mode(path: Path) -> int:
    """The permissions the written file gets: the old file's when it is replaced, else what open() would
    give a new file under the process's umask (0644 under the usual 022)."""
    with contextlib.suppress(OSError):
        return path.stat().st_mode & 0o7777
    umask = os.umask(0o022)                                   # read it: there is no other portable way
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_checkpoint(directory, weights: dict[str, torch.Tensor], state: dict, manifest: dict) -> Path:
    """Write a new checkpoint into `directory`, replacing the previous one atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    n = max((int(f.stem.split("-")[1]) + 1 for pattern in ("model-*.safetensors", "state-*.safetensors")
             for f in directory.glob(pattern) if f.stem.split("-")[1].isdigit()), default=0)   # past every file there
    names = {"weights": f"model-{n:06d}.safetensors", "state": f"state-{n:06d}.safetensors"}
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    atomic_write(directory / names["weights"], st_save(tensors))
    atomic_write(directory / names["state"], serialize.dumps(state))
    full = {"format": FORMAT, **manifest, "save": n, **names}
    atomic_write(directory / MANIFEST, json.dumps(full, indent=1, allow_nan=True).encode())
    for old in [*directory.glob("model-*.safetensors"), *directory.glob("state-*.safetensors")]:
        if old.name not in names.values():
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
    return directory / MANIFEST


def read_manifest(directory) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no checkpoint in {directory} ({MANIFEST} is missing); train first, "
                        "or point to the directory a training run wrote") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read checkpoint manifest {path}: {e}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an rnnkit checkpoint (format {manifest.get('format')!r})")
    return manifest


def load_weights(directory) -> dict[str, torch.Tensor]:
    """The model's state_dict from the current checkpoint in `directory`."""
    manifest = read_manifest(directory)
    return _decode(Path(directory) / manifest["weights"], st_load)


def load_weights_into(model: torch.nn.Module, directory) -> torch.nn.Module:
    """`model.load_state_dict` of the current checkpoint in `directory` (see load_state_into)."""
    load_state_into(model, load_weights(directory), directory)
    return model


def load_state_into(model: torch.nn.Module, weights: dict, directory,
                    model_is: str = "the model its checkpoint.json describes") -> None:
    """`model.load_state_dict(weights)`, read from `directory`; weights that do not fit the model
    (files from another run copied in) are a UserError, not torch's traceback."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"the weights in {directory} do not fit {model_is} "
                        f"({' '.join(line.strip() for line in first[:3])}); the folder mixes files of "
                        "different runs: train again in a new --out directory, or restore the folder") from None


def load_checkpoint(directory) -> Checkpoint:
    directory = Path(directory)
    manifest = read_manifest(directory)
    weights = _decode(directory / manifest["weights"], st_load)
    state = _decode(directory / manifest["state"], serialize.loads)
    return Checkpoint(manifest, weights, state)


def _decode(path: Path, decode):
    """A checkpoint file's contents; a damaged file is a UserError naming it (not the decoder's own error)."""
    data = _read(path)
    try:
        return decode(data)
    except Exception as e:  # noqa: BLE001 -- safetensors and json raise their own types; all mean "damaged"
        raise UserError(f"checkpoint file {path} is damaged ({type(e).__name__}: {e}); train again in a new "
                        "--out directory, or restore the file") from None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UserError(f"checkpoint file {path} cannot be read: {e}") from None

"""What may differ when a run is resumed, and the errors that say what did (Trainer._restore's checks).

Exact resume needs the same training settings (TrainConfig, less RESUMABLE_CHANGES), the same model
and data setup (the task's `meta`), and: the cosine schedule spans the run's epoch count (its T_max
is restored from the checkpoint, so a new --epochs would restart the cycle mid-run), and a run cannot
be resumed to fewer epochs than it has already trained.
"""
from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import torch

from ..errors import UserError
from .config import RESUMABLE_CHANGES, TrainConfig

# Entries of a task's meta that only inform its predict command, added since checkpoints were first
# written: they may be absent from a checkpoint (and differ) without breaking exact resume.
INFORMATIONAL_META = frozenset({"max_source_len"})
FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def check_resumable(out, manifest: dict, now: dict, meta: dict) -> None:
    """manifest: the checkpoint's; now: the config as a checkpoint records it; meta: the task's."""
    saved = {**FIELD_DEFAULTS, "backend": "auto", "mode": "min", **manifest["train_config"]}   # added since: what ran
    changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k])
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in changed)
        hint = (f" (the run watched {saved['monitor']!r} with mode {saved['mode']!r}: to continue it as it ran, "
                f"pass --mode {saved['mode']})" if changed == ["mode"] else "")
        raise UserError(f"cannot resume {out} with different settings ({diffs}){hint}; "
                        "use the settings of the original run or a new --out directory")
    old = {k: v for k, v in manifest.get("meta", {}).items() if k not in INFORMATIONAL_META}
    diffs = _differences(old, {k: v for k, v in json.loads(json.dumps(meta)).items() if k not in INFORMATIONAL_META})
    if diffs:
        raise UserError(f"the checkpoint in {out} was written for a different model or data setup "
                        f"({'; '.join(diffs[:5])}); use the original settings or a new --out directory")
    if now["schedule"] == "cosine" and saved["epochs"] != now["epochs"]:
        raise UserError(f"the run in {out} follows the cosine schedule over its {saved['epochs']} epochs; "
                        f"resuming with --epochs {now['epochs']} would restart the cycle mid-run. Resume with "
                        f"--epochs {saved['epochs']}, or train again with the new count in a new --out directory")


def check_epochs_left(out, epoch: int, batch: int, epochs: int) -> None:
    """epoch: epochs completed; batch: steps into the next one; epochs: what the resumed run asks for."""
    if epoch > epochs or (epoch == epochs and batch > 0):
        done = f"{epoch} epoch(s)" + (f" and {batch} step(s) of the next" if batch else "")
        raise UserError(f"the run in {out} has already trained {done}, more than --epochs {epochs}; resume "
                        f"with --epochs {epoch + (1 if batch else 0)} or more, or train again in a new --out directory")


def check_continuable(out, epoch: int, epochs: int, best_epoch, best_weights) -> None:
    """A finished run resumed with more epochs: refused when early stopping put back an older epoch's
    weights at its end (the last epoch's are gone, so it cannot continue exactly)."""
    if best_weights is not None and best_epoch != epoch:
        raise UserError(f"the run in {out} finished its {epoch} epochs and early stopping then put back the weights "
                        f"of its best epoch ({best_epoch}), so it cannot continue exactly to epoch {epochs}; "
                        f"train again with --epochs {epochs} in a new --out directory")


def rng_states(generator: torch.Generator) -> dict:
    """Every random state a run draws from: torch's (CPU, CUDA), numpy's, Python's, the shuffle's."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "shuffle": generator.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def set_rng_states(rng: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    generator.set_state(rng["shuffle"])


def _differences(saved, now, path: str = "") -> list[str]:
    """'key.sub: old -> new' for each leaf where two JSON documents differ (lists and long values shortened)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            out += _differences(saved.get(k), now.get(k), f"{path}.{k}" if path else str(k))
        return out
    if saved == now:
        return []
    where = path or "setup"
    if isinstance(saved, list) and isinstance(now, list):
        first = next((i for i, (a, b) in enumerate(zip(saved, now)) if a != b), min(len(saved), len(now)))
        return [f"{where}: {len(saved)} items -> {len(now)} items, first difference at [{first}]"]
    return [f"{where}: {_short(saved)} -> {_short(now)}"]


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."

"""Gradient-flow study: how far back ||dL/dh_t|| reaches, per cell, at initialisation and after training.

For each cell and seed, a one-layer model (cell + linear head on the last step) gets a batch of
the adding problem of length T; the loss is on the last output only, so the trace's
||dL/dh_t|| (mean over the batch) at distance k from the end is exactly how much of the loss's
gradient survives k steps of BPTT. From it: the memory horizon (steps back until it falls below
1e-3 of the last step's) and the explosion test; beside it the Jacobian norms ||dh_T/dh_t||,
the spectra of U and gate saturation. With trained_steps > 0 the model is then trained on the
adding problem (Adam) and measured again; profiles recorded during training make the heat map.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .. import diagnostics as dg
from ..diagnostics import plots
from ..errors import UserError, at_least, check_all, check_positive
from ..tracing import trace
from ..numerics import flushing_denormals
from . import memory

CELL_LABEL = {"rnn": "tanh RNN", "lstm": "LSTM", "gru": "GRU", "mingru": "minGRU", "minlstm": "minLSTM"}


@dataclass(frozen=True)
class GradflowConfig:
    cells: tuple[str, ...] = ("rnn", "lstm", "gru")
    length: int = 100
    hidden_size: int = 128
    batch_size: int = 64              # sequences in the measuring batch
    trained_steps: int = 0            # 0: measure at initialisation only
    lr: float = 1e-3
    clip_norm: float | None = None    # clip the global gradient norm while training
    seed: int = 0
    num_seeds: int = 3                # seeds seed, seed+1, ...; horizons are averaged over them
    checkpoints: int = 8              # profiles recorded during training (heat map rows): checkpoint_steps
    threshold: float = 1e-3

    def __post_init__(self):
        bad = [c for c in self.cells if c not in memory.CELLS]
        if not self.cells or bad:
            raise UserError(f"--cell must list cells among {', '.join(memory.CELLS)}; "
                            f"got {','.join(self.cells) or 'nothing'}")
        if len(set(self.cells)) < len(self.cells):
            raise UserError(f"--cell lists a cell more than once ({','.join(self.cells)}); give each cell once")
        check_all([at_least("--length", self.length, 2), at_least("--trained-steps", self.trained_steps, 0),
                   *(at_least(flag, value, 1) for flag, value in (
                       ("--hidden-size", self.hidden_size), ("--batch-size", self.batch_size),
                       ("--num-seeds", self.num_seeds), ("--checkpoints", self.checkpoints)))])
        check_positive("--lr", self.lr)
        if self.clip_norm is not None:
            check_positive("--clip-norm", self.clip_norm, "no clipping")
        if not 0 < self.threshold < 1:
            raise UserError(f"--threshold must lie in (0, 1), got {self.threshold}")
        memory.check_fits(size_terms(self))


def _train_config(cfg: GradflowConfig, cell: str, seed: int) -> memory.MemoryConfig:
    return memory.MemoryConfig(task="adding", length=cfg.length, cell=cell, hidden_size=cfg.hidden_size,
                               steps=max(cfg.trained_steps, 1), lr=cfg.lr, clip_norm=cfg.clip_norm, seed=seed)


def size_flags(cfg: GradflowConfig) -> dict[str, int]:
    return {"--length": cfg.length, "--batch-size": cfg.batch_size, "--hidden-size": cfg.hidden_size}


def size_terms(cfg: GradflowConfig) -> list[tuple[float, dict[str, int]]]:
    """Floats one cell's study certainly holds at once (a lower bound), by the flags that scale them."""
    T, H = cfg.length, cfg.hidden_size
    GH = max(memory.GATES[c] for c in cfg.cells) * H
    terms = [(max(memory.weight_floats(c, H, 2) for c in cfg.cells), {"--hidden-size": H}),   # U, V
             (cfg.batch_size * T * GH, size_flags(cfg)),                            # the traced gates
             (H * T * GH, {"--hidden-size": H, "--length": T})]                     # Jacobians: H copies of x
    if cfg.trained_steps:                                                           # its training batches
        terms.append((memory.MemoryConfig.batch_size * T * GH, {"--hidden-size": H, "--length": T}))
    return terms


def checkpoint_steps(trained_steps: int, checkpoints: int) -> list[int]:
    """The training steps whose profile is recorded: `checkpoints` evenly spaced from step 0 to the last,
    both included (one checkpoint: the last step; never more than trained_steps + 1)."""
    first = 0 if checkpoints > 1 else trained_steps
    return sorted({int(s) for s in np.linspace(first, trained_steps, checkpoints).round()})


def measure(model: memory.SequenceModel, x, y, cell: str, threshold: float = 1e-3,
            jacobian: bool = True) -> dict:
    """One traced forward/backward of the last-step loss; every diagnostic of that pass
    (and the Jacobian norms of the first sequence, unless jacobian=False)."""
    with trace(model.rnn) as tr:
        loss = memory.loss_fn(model(x), y, "regress")
        loss.backward()
    model.zero_grad(set_to_none=True)
    k = model.rnn.num_layers - 1                                              # top layer
    profile = dg.grad_profile(tr.grad_norm[k])                               # (T,)
    gates = tr.hidden[k] if cell == "rnn" else tr.gates[k]
    jac = dg.jacobian_norms(model.rnn, x[0]) if jacobian and model.rnn.num_layers == 1 else None
    return {"profile": profile,
            "horizon": dg.memory_horizon(profile, threshold),
            "explosion": dg.explosion(profile),
            "jacobian": jac,
            "saturation": dg.gate_saturation(gates, "rnn" if cell == "rnn" else cell),
            "spectra": dg.recurrent_spectra(model.rnn) if cell in memory.RECURRENT else [],   # min cells: no U
            "hidden": tr.hidden[k][:, 0].numpy()}                            # (T, H) first sequence


def study_cell(cfg: GradflowConfig, cell: str, seed: int, progress: bool = True) -> dict:
    """Measure one cell and seed at init and, if asked, while and after training."""
    x, y = memory.synthetic.adding(cfg.batch_size, cfg.length, 20_000 + seed)
    mcfg = _train_config(cfg, cell, seed)
    torch.manual_seed(seed)
    model = memory.SequenceModel(mcfg, memory.task_spec("adding", cfg.length))
    out = {"init": measure(model, x, y, cell, cfg.threshold)}
    if cfg.trained_steps:
        history = {"steps": [], "profiles": [], "model": None}

        def probe(m, step):               # at the checkpoints before the last, and where training stopped
            history["profiles"].append(measure(m, x, y, cell, cfg.threshold, jacobian=False)["profile"])
            history["steps"].append(step)
            history["model"] = m
        run = memory.train(mcfg, progress, probe=probe,
                           probe_at=frozenset(checkpoint_steps(cfg.trained_steps, cfg.checkpoints)))
        out["trained"] = measure(history["model"], x, y, cell, cfg.threshold)
        out["history"] = {"steps": history["steps"], "profiles": np.stack(history["profiles"])}
        out["run"] = run
    return out


def _geo_mean(profiles: list[np.ndarray]) -> np.ndarray:
    """Geometric mean over seeds of profiles normalised to their last step."""
    rel = np.stack([p / p[-1] for p in profiles])
    return np.exp(np.log(np.maximum(rel, 1e-300)).mean(0))


def summarise(cfg: GradflowConfig, cell: str, per_seed: list[dict]) -> dict:
    """JSON-ready summary of one cell over its seeds."""
    d, seed = {"cell": cell}, cfg.seed                               # details of the first seed
    for when in ("init", "trained"):
        if when not in per_seed[0]:
            continue
        ms = [s[when] for s in per_seed]
        hs = [m["horizon"] for m in ms]
        d[when] = {
            "horizon_mean": float(np.mean([h.steps for h in hs])),
            "horizon_per_seed": [h.to_dict() for h in hs],
            "explosion_per_seed": [m["explosion"].to_dict() for m in ms],
            "grad_profile_rel": _geo_mean([m["profile"] for m in ms]).tolist(),
            f"jacobian_seed{seed}": ms[0]["jacobian"].to_dict() if ms[0]["jacobian"] else None,
            f"saturation_seed{seed}": ms[0]["saturation"].to_dict(),
            f"spectra_seed{seed}": [s.to_dict() for s in ms[0]["spectra"]],
        }
    if "run" in per_seed[0]:
        runs = [s["run"] for s in per_seed]
        d["training"] = {"task": "adding", "steps": cfg.trained_steps,
                         "test_mse_per_seed": [r.test["mse"] for r in runs],
                         "test_mse_mean": float(np.mean([r.test["mse"] for r in runs])),
                         "seconds": round(sum(r.seconds for r in runs), 1)}
    return d


def run(cfg: GradflowConfig, out_dir, progress: bool = True) -> dict:
    """The whole study; writes gradflow.json, gradflow.png and the companion figures into out_dir."""
    # flushing: vanished gradients in denormal floats slow CPU BPTT ~10x
    with flushing_denormals(), memory.out_of_memory_as_user_error(size_flags(cfg)):
        return _run(cfg, out_dir, progress)


def _run(cfg: GradflowConfig, out_dir, progress: bool) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw, summary = {}, {"config": asdict(cfg), "cells": {}}
    for cell in cfg.cells:
        raw[cell] = [study_cell(cfg, cell, cfg.seed + i, progress) for i in range(cfg.num_seeds)]
        summary["cells"][cell] = summarise(cfg, cell, raw[cell])
    summary["figures"] = [p.name for p in write_figures(cfg, raw, summary, out_dir)]
    (out_dir / "gradflow.json").write_text(json.dumps(summary, indent=1))
    return summary


def write_figures(cfg: GradflowConfig, raw: dict, summary: dict, out_dir: Path) -> list[Path]:
    T, H = cfg.length, cfg.hidden_size
    curves, styles, sats, paths = {}, {}, {}, []
    for cell, s in summary["cells"].items():
        for when, style in (("init", "-"), ("trained", "--")):
            if when in s:
                label = f"{CELL_LABEL[cell]}, {'init' if when == 'init' else f'after {cfg.trained_steps} steps'}"
                label += f" ({horizon_label(s[when])})"
                curves[label] = np.asarray(s[when]["grad_profile_rel"])
                styles[label] = style
                sats[f"{cell} {when}"] = raw[cell][0][when]["saturation"]
    seeds = f"geometric mean over {cfg.num_seeds} seed(s)"
    paths.append(plots.grad_vs_steps_back(curves, out_dir / "gradflow.png",
                                          f"Gradient reaching h_t, loss on the last step\n(adding problem, T={T}, H={H}; {seeds})",
                                          cfg.threshold, styles))
    paths.append(plots.saturation_bars(sats, out_dir / "gradflow_saturation.png",
                                       f"Gate saturation (seed {cfg.seed}; rnn: tanh of h_t)"))
    jac = {f"{CELL_LABEL[c]}, {w}": np.asarray(raw[c][0][w]["jacobian"].spectral[::-1])
           for c in raw for w in ("init", "trained") if w in raw[c][0] and raw[c][0][w]["jacobian"]}
    if jac:
        paths.append(plots.grad_vs_steps_back(jac, out_dir / "gradflow_jacobian.png",
                                              f"Spectral norm of dh_T/dh_t (one sequence, seed {cfg.seed}, T={T})",
                                              None,
                                              ylabel="||dh_T/dh_t||_2 (largest singular value)"))
    for cell in raw:
        last = "trained" if "trained" in raw[cell][0] else "init"
        paths.append(plots.hidden_heatmap(raw[cell][0][last]["hidden"], out_dir / f"gradflow_hidden_{cell}.png",
                                          f"{CELL_LABEL[cell]} hidden state h_t, one adding sequence ({last})"))
        if "history" in raw[cell][0]:
            hist = raw[cell][0]["history"]
            paths.append(plots.grad_heatmap(hist["profiles"], hist["steps"], out_dir / f"gradflow_heatmap_{cell}.png",
                                            f"{CELL_LABEL[cell]}: ||dL/dh_t|| during training (seed {cfg.seed})"))
    return paths


def horizon_label(d: dict) -> str:
    """A summary's horizon: the mean over seeds to one decimal, '+' when censored (a lower bound)."""
    hs = d["horizon_per_seed"]
    if all(h["censored"] for h in hs):
        return f"horizon {hs[0]['steps']}+"
    return f"horizon {d['horizon_mean']:.1f}{'+' if any(h['censored'] for h in hs) else ''}"

"""PNG figures of gradient flow (matplotlib, Agg backend): every figure titled, axes labelled.

    grad_vs_steps_back   ||dL/dh_t|| / ||dL/dh_T|| against steps back, log y, one line per curve
    grad_heatmap         log10 of that over (training step, t): how training changes the flow
    hidden_heatmap       one sequence's hidden state h_t over (t, unit)
    saturation_bars      share of saturated units per gate, one group per cell
    training_curves      loss and gradient norm per step (log-log), one line per run (the clip study)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .gradflow import steps_back
from .saturation import Saturation

_TINY = 1e-300


def subplots(*args, figsize=None, dpi=None, **kwargs):
    """(figure, axes) like pyplot.subplots, without pyplot: no backend switched and no window, nothing
    kept open (savefig renders PNG with Agg). matplotlib is imported here, on first use: at module level
    it cost every rnnkit command ~0.3 s of start-up, plots or not."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(*args, **kwargs)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def grad_vs_steps_back(curves: dict[str, np.ndarray], path, title: str,
                       threshold: float | None = 1e-3, styles: dict[str, str] | None = None,
                       floor: float = 1e-20,
                       ylabel: str = "||dL/dh_t|| / ||dL/dh_T||  (mean over batch)") -> Path:
    """curves: label -> profile (T,) indexed by t. Plotted relative to the last step; values
    below `floor` (down to float32 underflow, exact 0) are drawn on the floor."""
    fig, ax = subplots(figsize=(7, 4.2))
    for label, profile in curves.items():
        back = steps_back(profile)
        ax.semilogy(np.arange(len(back)), np.maximum(back / back[0], floor), (styles or {}).get(label, "-"),
                    label=label)
    if threshold:
        ax.axhline(threshold, color="grey", ls=":", lw=1, label=f"horizon threshold {threshold:g}")
    ax.set_ylim(bottom=floor / 3)
    ax.set_xlabel("steps back from the last step (T - 1 - t)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def grad_heatmap(profiles: np.ndarray, steps: list[int], path, title: str) -> Path:
    """profiles (E, T): one gradient profile per training checkpoint; steps: its training step."""
    P = np.asarray(profiles, dtype=float)
    rel = np.log10(np.maximum(P / P[:, -1:], _TINY))                          # (E, T)
    fig, ax = subplots(figsize=(7, 3.8))
    im = ax.imshow(np.clip(rel, -12, 2), aspect="auto", origin="lower", cmap="viridis",
                   extent=(-0.5, P.shape[1] - 0.5, -0.5, len(steps) - 0.5))
    ax.set_yticks(range(len(steps)), [str(s) for s in steps])
    ax.set_xlabel("time step t (loss on the last step)")
    ax.set_ylabel("training step")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="log10 ||dL/dh_t|| / ||dL/dh_T||")
    return _save(fig, path)


def hidden_heatmap(hidden: np.ndarray, path, title: str, max_units: int = 64) -> Path:
    """hidden (T, H) for one sequence."""
    h = np.asarray(hidden, dtype=float)[:, :max_units]
    fig, ax = subplots(figsize=(7, 3.8))
    lim = max(float(np.abs(h).max()), 1e-12)
    im = ax.imshow(h.T, aspect="auto", origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xlabel("time step t")
    ax.set_ylabel(f"hidden unit (first {h.shape[1]})")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="h_t")
    return _save(fig, path)


def saturation_bars(sats: dict[str, Saturation], path, title: str) -> Path:
    """sats: label (e.g. "lstm, init") -> Saturation. One group of bars per label, one bar per gate."""
    fig, ax = subplots(figsize=(7, 3.8))
    labels = list(sats)
    width = 0.8 / max(len(s.saturated) for s in sats.values())
    for i, label in enumerate(labels):
        for j, (gate, share) in enumerate(sats[label].saturated.items()):
            ax.bar(i + j * width, 100 * share, width, color=f"C{j}")
            ax.text(i + j * width, 100 * share, gate, ha="center", va="bottom", fontsize=8)
    centers = [i + (len(sats[label].saturated) - 1) * width / 2 for i, label in enumerate(labels)]
    ax.set_xticks(centers, labels, fontsize=8)
    ax.set_ylim(bottom=0)
    ax.set_ylabel(f"% of units within {next(iter(sats.values())).eps} of a limit")
    ax.set_title(title)
    return _save(fig, path)


def training_curves(runs: dict[str, dict], path, title: str) -> Path:
    """runs: label -> {"loss": [...], "grad_norm": [...]} per training step (NaN where diverged)."""
    fig, (a1, a2) = subplots(1, 2, figsize=(10, 3.8))
    for label, run in runs.items():
        loss = np.asarray(run["loss"], dtype=float)
        gn = np.asarray(run["grad_norm"], dtype=float)
        a1.loglog(np.arange(1, len(loss) + 1), loss, ".-" if len(loss) < 20 else "-", label=label, lw=1)
        a2.loglog(np.arange(1, len(gn) + 1), gn, ".-" if len(gn) < 20 else "-", label=label, lw=1)
        if len(loss) and not np.isfinite(loss[-1]) or run.get("diverged"):
            a1.axvline(len(loss), ls=":", color="red", lw=1)
    a1.set_xlabel("training step (log)")
    a1.set_ylabel("training loss (log)")
    a1.set_title("loss")
    a2.set_xlabel("training step (log)")
    a2.set_ylabel("global gradient norm before clipping (log)")
    a2.set_title("gradient norm")
    for a in (a1, a2):
        a.grid(True, alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)

"""Which route the fused kernel's float matrix products take (blas.h): "dnnl+ukernel" (oneDNN's, where a
one-time measurement in each process finds them faster than torch's BLAS, with the small products on
oneDNN's brgemm micro-kernel where torch has it), "dnnl" (the same without the micro-kernel: the numbers
before it), "packed" (MKL's packed GEMM), "blas" or "aten". The routes round differently in the last
bits, so a run resumed in a process that chose another route is not bitwise the run it continues: `Trainer`
records the route in its checkpoints and warns on a change. RNNKIT_GEMM_ROUTE=packed (or another route)
limits it for a process: the best route allowed, taken where this CPU and torch have it.
"""
from __future__ import annotations

import os
import warnings

ROUTES = ("dnnl+ukernel", "dnnl", "packed", "blas", "aten")
ENV = "RNNKIT_GEMM_ROUTE"


def apply_env(ops) -> None:
    """Limit the kernel's route to RNNKIT_GEMM_ROUTE when that is set, then settle it (called once the kernel
    loads): the route's one-time timing of oneDNN against MKL runs here, on the loading thread with the
    intra-op threads free, not single-threaded inside the first scan's lanes."""
    want = os.environ.get(ENV, "").strip()
    if want and want not in ROUTES:
        warnings.warn(f"{ENV}={want!r} is not one of {', '.join(ROUTES)}; ignored", stacklevel=2)
    elif want:
        ops.limit_gemm_route(want)
    ops.gemm_route()


def current() -> str | None:
    """The route the kernel's float products take now, or None when the kernel is not loaded."""
    from . import _loaded
    ops = _loaded["ops"]
    return None if ops is None else str(ops.gemm_route())


def check_resumed(saved: str | None, out) -> None:
    """Warn when a checkpoint's products took another route than this process (loading the kernel to
    know, only when the checkpoint recorded one)."""
    if saved is None:
        return
    from . import _ops
    now = None if _ops() is None else current()
    if now is not None and now != saved:
        warnings.warn(f"the run in {out} computed its products on route {saved!r}, this process on {now!r}: "
                      f"the resumed run will differ from an uninterrupted one in the last bits; "
                      f"{ENV}={saved} pins the original route", stacklevel=3)

"""Floating-point settings the recurrent loops need, and how their hand-written backwards run."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor
from torch.autograd import forward_ad

_DENORMAL = torch.tensor(1e-40)     # below float32's smallest normal number (1.2e-38)


@contextlib.contextmanager
def flushing_denormals(on: bool = True):
    """Flush denormal floats to zero inside, then restore the caller's setting.

    A gradient carried back through many steps decays geometrically, and with a loss on the last step
    only (many-to-one) most of it sinks into denormals, which x86 CPUs process ~100x slower: training
    steps were measured 4-5x slower at T = 200. Values that small carry nothing a float32 loss can see.
    """
    switch = on and float(_DENORMAL * 1.0) != 0.0 and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switch:
            torch.set_flush_denormal(False)


def trace_norm(g: Tensor, dim: int) -> Tensor:
    """||g|| along `dim` for a trace's grad_norm, summed in float64 (returned as such; the trace's buffer
    casts it back): a float32 gradient's squares overflow past ~1.8e19 (torch's vector_norm does not
    rescale), while an exploding gradient's norm itself still fits float32 up to ~3.4e38."""
    wide = torch.float64 if g.dtype in (torch.float32, torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(g, dim=dim, dtype=wide)


def under_torch_func(*tensors, traced: bool = False) -> bool:
    """True when torch.func (grad, vmap, jacrev, jvp, ...) is transforming any of these tensors, or any
    carries a forward-mode tangent (torch.autograd.forward_ad). Neither can enter an autograd Function
    written with ctx and no jvp (as rnnkit's hand backwards are), so the callers then run their loops as
    plain autograd ops. So do they under torch.jit.trace and torch.export, which record the ops a call runs
    (an autograd Function's hand backward is not among them, and export's fake tensors have no data for
    the fused kernel). traced: a trace is recording this call; refused under torch.func (its records would
    be the transform's wrapped tensors)."""
    if not transformed(*tensors):
        return recording_graph()
    if traced:
        raise ValueError("rnnkit.trace cannot record inside torch.func transforms (grad, vmap, jacrev, ...): "
                         "trace the call outside the transform, or take the gradients with torch.autograd.grad")
    return True


def recording_graph() -> bool:
    """torch.jit.trace or torch.export is recording the ops of this call."""
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


# functorch's wrapped tensors (torch.func) and the legacy batched ones (is_grads_batched=True); a torch
# without either predicate keeps the old behaviour (torch's own error).
_WRAPPED = tuple(f for f in (getattr(getattr(torch._C, "_functorch", None), name, None)
                             for name in ("is_functorch_wrapped_tensor", "is_legacy_batchedtensor")) if f)


def has_tangent(*tensors) -> bool:
    """One of the tensors carries a forward-mode tangent (torch.autograd.forward_ad)."""
    if getattr(forward_ad, "_current_level", -1) < 0:      # no dual level open: no tangents anywhere
        return False
    return any(isinstance(t, torch.Tensor) and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def transformed(*tensors) -> bool:
    """A torch.func transform wraps one of the tensors, or one carries a forward-mode tangent."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and any(wrapped(t) for wrapped in _WRAPPED):
            return True
    return has_tangent(*tensors)


try:                                                       # torch.func's stack of transforms at work
    from torch._functorch import pyfunctorch
    _interpreters = pyfunctorch.retrieve_all_functorch_interpreters
    _TT = torch._C._functorch.TransformType
    _FORWARD_OR_FUNCTIONAL = {_TT.Jvp, _TT.Functionalize}
except (ImportError, AttributeError):                      # a torch without them: tangents only
    _interpreters, _FORWARD_OR_FUNCTIONAL = None, set()


def forward_mode_or_functionalized(*tensors) -> bool:
    """Forward-mode AD (a tangent on one of the tensors, or torch.func's jvp/jacfwd/hessian) or
    torch.func.functionalize is at work. An autograd Function's jvp sees no outer tangent in its saved tensors,
    so forward over forward comes out wrong, and functionalize has no rule for a Function: code that has one
    for reverse mode takes plain ops under these."""
    if _interpreters is not None and any(i.key() in _FORWARD_OR_FUNCTIONAL for i in _interpreters()):
        return True
    return has_tangent(*tensors)


def hand_backward(replay, records=None):
    """Decorator for the backward of an autograd Function written by hand (it builds no graph).

    create_graph=False, the usual case (grad mode is off inside a backward): the hand-written code runs,
    with denormals flushed on CPU.

    create_graph=True (gradient penalties, Hessian-vector products, meta-learning): the hand code's
    result would be a constant to autograd, and a second derivative would silently lose every term that
    passes through this node. Instead `replay(ctx)` runs the forward again in plain autograd ops from
    the saved inputs and returns (outputs, arguments), aligned with forward's outputs and positional
    arguments; the gradient is taken through that graph with create_graph=True, so it is exact to any
    order (at the speed of the unrolled torch loop). When `records(ctx)` is true (a trace is on), the
    hand code runs as well, for the gradient norms it records. Batched incoming gradients (torch's vmap
    over the backward: is_grads_batched=True, jacobian(vectorize=True)) take the replay too: the hand
    code and the fused kernels have no batching rule.
    """
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if not torch.is_grad_enabled() and not transformed(*grads):   # batched grads (vmap): replay
                return _hand(backward, ctx, grads)
            if records is not None and records(ctx):
                with torch.no_grad():
                    _hand(backward, ctx, grads)
            return _through_replay(ctx, replay, grads)
        return run
    return wrap


def _hand(backward, ctx, grads):
    cpu = next((g.device.type == "cpu" for g in grads if g is not None), True)
    with flushing_denormals(cpu):
        return backward(ctx, *grads)


def _through_replay(ctx, replay, grads):
    with torch.enable_grad():
        outs, args = replay(ctx)
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o is not None and o.requires_grad]
    wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
    result = [None] * len(ctx.needs_input_grad)
    if pairs and wanted:
        got = torch.autograd.grad([o for o, _ in pairs], [args[i] for i in wanted], [g for _, g in pairs],
                                  create_graph=True, allow_unused=True)
        for i, g in zip(wanted, got):
            result[i] = g
    return tuple(result)


def opaque_to_compile(fn):
    """Under torch.compile, `fn` runs as one eager call (a graph break) instead of being traced into: the
    fused kernel's ops have no fake-tensor implementation, and the pure loop would be unrolled step by
    step. torch.compiler.disable is applied on the first call under compile, not at import, as importing
    torch._dynamo costs about a second; outside compile this is one flag check."""
    disabled = []

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting():   # export records fn's ops
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args, **kwargs)
        return fn(*args, **kwargs)
    return run

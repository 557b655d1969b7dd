"""The layer's input projection with its large results in the fused kernel's buffer pool (pool.h).

`linear` is F.linear for the projections that do not run inside the scan's own node (engine.project_scan
hands those to it: a scan the fused kernel does not take, on a CPU where it built).
"""
from __future__ import annotations

import torch

from .. import _fused as _pkg  # the package's _ops/_disabled, looked up at call time

__all__ = ["linear"]


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), the same numbers (the same BLAS call), with its output and, in the
    backward, the gradient of x written into the kernel's buffer pool (pool.h) instead of fresh memory:
    the layer's input projection V x_t + b for all steps is a training step's largest buffer after the
    scan's own (T*B*G*H floats; above glibc's 32 MB mmap threshold each call maps fresh pages, measured
    16 ms of an 83 ms product at T=200, B=64, 512 -> 1536). Anything else (off the CPU, other dtypes,
    outputs under _LINEAR_POOL_MIN_BYTES, where the Python autograd node's ~70 us outweighs the saving,
    shapes F.linear would refuse) goes to F.linear itself."""
    if (x.device.type != "cpu" or x.dtype not in _pkg._DTYPES or x.dim() < 2 or weight.dim() != 2
            or weight.dtype != x.dtype or weight.device != x.device or x.shape[-1] != weight.shape[1]
            or (bias is not None and (bias.dtype != x.dtype or tuple(bias.shape) != weight.shape[:1]))
            or x.numel() // max(x.shape[-1], 1) * weight.shape[0] * x.element_size() < _LINEAR_POOL_MIN_BYTES
            or _pkg._disabled() or _pkg._ops() is None):
        return torch.nn.functional.linear(x, weight, bias)
    return _PooledLinear.apply(x, weight, bias)


_LINEAR_POOL_MIN_BYTES = 4 << 20                              # tests lower it


class _PooledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        return _pkg._ops().pooled_addmm(bias, x2, weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors
        d2 = d_out.reshape(-1, d_out.shape[-1])
        d_x = d_w = d_b = None
        if ctx.needs_input_grad[0]:        # under create_graph, ops autograd can differentiate again
            d_x = (d2 @ weight if torch.is_grad_enabled() else _pkg._ops().pooled_addmm(None, d2, weight)).view(x.shape)
        if ctx.needs_input_grad[1]:
            d_w = d2.t() @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_b = d2.sum(0)
        return d_x, d_w, d_b

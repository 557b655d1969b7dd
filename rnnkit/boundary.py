"""What every rnnkit layer (RNN, LSTM, GRU, Recurrent, MinGRU, MinLSTM) and the stream check and adapt
at their boundary: the input and a given state, lengths and their padding masks, `truncate`, a
PackedSequence in and out, autocast, and a layer's copies made inside a trace.
"""
from __future__ import annotations

import contextlib
import operator

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

PADDING = ("right", "left")


class LayerShapeError(ValueError, RuntimeError):
    """An input or state of the wrong shape: a ValueError, and the RuntimeError torch.nn raises for it
    (code written against torch.nn catching either keeps working)."""


class LayerDtypeError(TypeError, ValueError, RuntimeError):
    """An input or state of the wrong dtype: a TypeError, and the ValueError / RuntimeError torch.nn raises."""


def check_input(layer, input, exact_dtype: bool = True) -> None:
    """The input checks every rnnkit layer shares: a tensor, 2-D or 3-D, input_size features, weights' dtype
    (exact_dtype=False: any dtype, for torch.nn's own kernels under autocast)."""
    name = type(layer).__name__
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    layout = "(B, T, input_size)" if layer.batch_first else "(T, B, input_size)"
    if input.dim() not in (2, 3):
        raise ValueError(f"{name}: input must be 3-D {layout} or 2-D (T, input_size) for one "
                         f"unbatched sequence; got {input.dim()}-D shape {tuple(input.shape)}")
    if input.shape[-1] != layer.input_size:
        raise LayerShapeError(f"{name}: input has {input.shape[-1]} features in its last dimension "
                         f"(shape {tuple(input.shape)}), but the layer was built with "
                         f"input_size={layer.input_size}")
    steps = input.shape[1 if layer.batch_first and input.dim() == 3 else 0]
    if steps == 0:
        raise ValueError(f"{name}: input has no time steps (T = 0 in shape {tuple(input.shape)}); "
                         f"give each sequence at least one step")
    if exact_dtype and input.dtype != layer.weight_ih_l0.dtype:
        raise LayerDtypeError(f"{name}: input dtype {input.dtype} does not match the weights' "
                        f"{layer.weight_ih_l0.dtype}; convert one of them (e.g. layer.to(input.dtype))")


def h_size(layer) -> int:
    """Units of h_t: proj_size for a projected LSTM (torch.nn's or rnnkit's), else hidden_size."""
    return getattr(layer, "proj_size", 0) or layer.hidden_size


def check_state(name: str, hx, num_states: int, want: tuple, dtype: torch.dtype | None,
                labels: tuple = ("h_0", "c_0"), layout: str = "num_layers*num_directions",
                units: tuple = ("hidden_size", "hidden_size")) -> tuple:
    """A given state -> tuple of tensors, each checked for shape `want` and `dtype` (None: any): a tensor,
    or for two-state cells (LSTM) a tuple of two. The checks every rnnkit layer and the stream share.
    want: one shape for every part, or a tuple of shapes, one per part (a projected LSTM's h has
    proj_size units, its c hidden_size); units: what each part's last dimension is called."""
    if num_states == 2 and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
        got = f"a {type(hx).__name__} of length {len(hx)}" if isinstance(hx, (tuple, list)) else type(hx).__name__
        raise ValueError(f"{name}: hx must be a tuple ({', '.join(labels)}) of two tensors, got {got}")
    parts = tuple(hx) if num_states == 2 else (hx,)
    wants = tuple(want) if want and isinstance(want[0], tuple) else (tuple(want),) * len(parts)
    for label, s, shape, unit in zip(labels, parts, wants, units):
        dims = f"({layout}, {unit})" if len(shape) == 2 else f"({layout}, batch, {unit})"
        if not isinstance(s, Tensor) or tuple(s.shape) != shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise LayerShapeError(f"{name}: initial state {label} must have shape {shape} {dims}, got {got}")
        if dtype is not None and s.dtype != dtype:
            raise LayerDtypeError(f"{name}: initial state {label} has dtype {s.dtype} but the input and weights "
                            f"have {dtype}; give them the same dtype")
    return parts


def positive_int(value) -> int | None:
    """value as an int when it is a positive integer (numpy and 0-d tensor ints too, not bool), else None."""
    try:
        n = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None
    return n if n is not None and n >= 1 else None


def check_truncate(name: str, truncate) -> int | None:
    """truncate as an int, or None; anything but a positive integer refused."""
    if truncate is None:
        return None
    k = positive_int(truncate)
    if k is None:
        raise ValueError(f"{name}: truncate must be a positive int (steps of BPTT), got {truncate!r}")
    return k


def untraced(state: dict) -> dict:
    """A layer's pickled or deep-copied state: the copy is not inside its original's trace."""
    return {**state, "_trace_sink": None}


def autocasting(input) -> bool:
    """Whether autocast is on for the input's device; off on a device autocast has no dispatch key for
    (meta: torch.is_autocast_enabled raises there)."""
    if not isinstance(input, Tensor):
        return False
    try:
        return torch.is_autocast_enabled(input.device.type)
    except RuntimeError:
        return False


def autocast_input(layer, input, hx=None):
    """Under autocast, rnnkit's own scans compute in the weights' dtype (the fused kernels have no
    lower-precision path, and every route must give the same numbers): returns the input and a given
    state (a tensor or a tuple) cast to the weights' dtype, and a context that turns autocast off for the
    scan. Otherwise (input, hx, a no-op). torch.nn's own kernels (backend "auto"'s native path) are not
    given this: they autocast as torch.nn does."""
    if not autocasting(input):
        return input, hx, contextlib.nullcontext()
    dtype = layer.weight_ih_l0.dtype

    def cast(t):
        return t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
    hx = tuple(cast(s) for s in hx) if isinstance(hx, (tuple, list)) else cast(hx)
    return cast(input), hx, torch.autocast(input.device.type, enabled=False)


def alone_with_packed(name: str, lengths, padding: str = "right") -> None:
    """A PackedSequence input carries its own lengths: lengths= or padding= given beside it are refused."""
    if lengths is not None or padding != "right":
        raise ValueError(f"{name}: a PackedSequence carries its own lengths (right padding); "
                         "pass it without lengths= and padding=")


def repack_like(out: Tensor, lens: Tensor, like: PackedSequence, batch_first: bool) -> PackedSequence:
    """out (padded, the batch in the caller's order) packed as `like` is: the same batch_sizes,
    sorted_indices and unsorted_indices, so out.data's rows line up with like.data's (torch.nn's way)."""
    order = like.sorted_indices
    if order is not None:
        out, lens = out.index_select(0 if batch_first else 1, order), lens[order.cpu()]
    data = pack_padded_sequence(out, lens, batch_first).data
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def check_lengths(name, lengths, B, T) -> Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != B:
        raise ValueError(f"{name}: lengths must be 1-D with one entry per sequence (batch size {B}), "
                         f"got shape {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
        raise TypeError(f"{name}: lengths must be integers, got dtype {lengths.dtype}")
    if B and (int(lengths.min()) < 1 or int(lengths.max()) > T):
        raise ValueError(f"{name}: lengths must lie in [1, T={T}], got min {int(lengths.min())} "
                         f"and max {int(lengths.max())}")
    return lengths


def length_mask(lengths: Tensor, T: int, padding: str, dtype) -> Tensor:
    """(T, B, 1) float mask, 1 on real steps."""
    t = torch.arange(T, device=lengths.device).unsqueeze(1)                    # (T, 1)
    L = lengths.unsqueeze(0)
    real = t < L if padding == "right" else t >= T - L
    return real.to(dtype).unsqueeze(2)


def padded_input(x: Tensor, lengths: Tensor | None, padding: str) -> tuple[Tensor, Tensor | None]:
    """x (T, B, I) with its padded steps set to zero, and the (T, B, 1) length mask (None without lengths).
    The scans ignore a padded step by factors of 0 and 1, and a NaN or inf there (a series padded with NaN)
    would pass through them (NaN * 0 = NaN) into the final state, the weight gradients and the reverse
    direction's outputs."""
    if lengths is None:
        return x, None
    mask = length_mask(lengths.to(x.device), x.shape[0], padding, x.dtype)
    return x.masked_fill(mask == 0, 0), mask

"""The cell protocol: what a recurrent cell must provide so the engine can run it.

Notation (seeds 001, 002, 004):  h_t = g(V x_t + U h_{t-1} + b).  A cell never sees V or U.
The engine owns every matrix product, so it can hoist the input product out of the time loop and
form the weight gradients as one large product per sequence:

    xi_t = V x_t + b_ih          (T, B, G*H)   all steps at once, before the loop
    gh_t = U h_{t-1} + b_hh      (B, G*H)      one product per step

and hands the cell the elementwise rest. G is the number of gate blocks (RNN 1, GRU 3, LSTM 4).

A cell is an object with

    num_gates: int               G
    num_states: int              length of the state tuple; state[0] is always h, the output
    shared_preactivation: bool   True when the cell only ever uses xi_t + gh_t. Then the engine passes
                                 the sum a_t = xi_t + gh_t as `xi` and None as `gh` (one fused product
                                 per step, b_hh folded into the hoisted input), and d_xi == d_gh.
    step(xi, gh, state, params) -> (new_state, saved)
        xi, gh: (B, G*H); state: tuple of (B, H); params: tuple of extra tensors (usually ()).
        (A projected LSTM's state is (h (B, P), c (B, H)) and its params (W_hr,): parts may differ.)
    step_backward(d_state, saved, params) -> (d_xi, d_gh, d_state_prev, d_params)      [optional]
        d_state: gradient w.r.t. new_state (tuple); returns gradients w.r.t. xi, gh, the direct
        part of the gradient w.r.t. the previous state (None entries mean zero; the part through gh
        is added by the engine), and w.r.t. params.
    gates(saved) -> Tensor | None   gate activations (B, G*H) for the trace          [optional]

A cell without step_backward gets one derived from step by torch.func.vjp (see `derived_backward`),
so a user's new cell runs in the engine, the trace and the layers with nothing else written.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

State = tuple[Tensor, ...]


def uniform_init_(weight: Tensor, hidden_size: int) -> None:
    """torch.nn's initialisation for every recurrent weight and bias: U(-1/sqrt(H), 1/sqrt(H))."""
    bound = 1.0 / math.sqrt(hidden_size)
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def derived_backward(cell, d_state: State, saved, params: tuple):
    """Backward of one step from its forward, for cells that bring no hand-written one.

    `saved` must then be the step's inputs (xi, gh, state); `step` is re-run under torch.func.vjp.
    """
    xi, gh, state = saved
    n = len(state)

    def f(xi_, gh_, *rest):
        new, _ = cell.step(xi_, gh_, tuple(rest[:n]), tuple(rest[n:]))
        return tuple(new)

    _, vjp = torch.func.vjp(f, xi, gh, *state, *params)
    cot = tuple(torch.zeros_like(s) if d is None else d for d, s in zip(d_state, state))
    grads = vjp(cot)
    return grads[0], grads[1], tuple(grads[2:2 + n]), tuple(grads[2 + n:])


def has_hand_backward(cell) -> bool:
    return callable(getattr(cell, "step_backward", None))


def saves_inputs(cell) -> bool:
    """Cells without a hand backward must save their inputs for `derived_backward`."""
    return not has_hand_backward(cell)


def check_step(cell, result, state: State) -> None:
    """Refuse, saying what the protocol wants, a `step` result that is not (new_state, saved) with
    new_state a tuple of num_states tensors shaped as the state's parts (the first step of each scan and every
    stream step check it; a wrong one would otherwise fail deep in the loop, or go through unnoticed).
    Not while torch.jit.trace records (shapes are traced values there)."""
    if torch.jit.is_tracing():
        return
    problem = _step_problem(result, len(state), [s.shape for s in state])
    if problem:
        shapes = {tuple(s.shape) for s in state}
        shape = (f"shape {tuple(state[0].shape)}" if len(shapes) == 1 else
                 "the shapes of the state's parts " + ", ".join(str(tuple(s.shape)) for s in state))
        raise TypeError(f"{type(cell).__name__}.step must return (new_state, saved), new_state a tuple of "
                        f"num_states = {len(state)} tensors of {shape}; {problem}")


def _step_problem(result, n: int, shapes) -> str | None:
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        return f"it returned {_described(result)}"
    new = result[0]
    if not isinstance(new, (tuple, list)):
        return f"its new_state is {_described(new)} (wrap one state as (h,))"
    if len(new) != n:
        return f"its new_state holds {len(new)}"
    for j, (s_new, shape) in enumerate(zip(new, shapes)):
        if not isinstance(s_new, Tensor) or s_new.shape != shape:
            return f"its new_state[{j}] is {_described(s_new)}"
    return None


def _described(obj) -> str:
    if isinstance(obj, Tensor):
        return f"a tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        return f"a {type(obj).__name__} of length {len(obj)}"
    return f"a {type(obj).__name__}"

"""Spectra of the recurrent matrices U (weight_hh_l{k}): singular values and spectral radius.

The Jacobian of one step is diag(g'(a_t)) U with |g'| <= 1 for tanh, so ||U||_2 < 1 guarantees a
vanishing gradient and a spectral radius > 1 is necessary for an exploding one (Pascanu et al.
2013). For LSTM/GRU, U stacks one H x H block per gate (LSTM i, f, g, o; GRU r, z, n); each block
is reported on its own, and the whole stack (G*H x H, not square) by its singular values only.
An LSTM with proj_size P feeds back the projected h_t = W_hr (o * tanh c_t) (P units): its U is G*H x P,
and so are its gate blocks H x P, reported by their singular values only (no spectral radius: not
square). The step's Jacobian there goes through both, dh_{t+1}/dh_t = W_hr diag(.) U_g ..., so each gate's
P x P product W_hr U_g is reported after them, square, with its spectral radius (the same nonzero
eigenvalues as U_g W_hr, H x H, which maps o * tanh c_t to the gate's next pre-activation).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

GATE_NAMES = {1: ("h",), 3: ("r", "z", "n"), 4: ("i", "f", "g", "o")}


@dataclass(frozen=True)
class MatrixSpectrum:
    """One recurrent matrix or gate block. spectral_radius is None for a non-square stack."""
    name: str                        # parameter name, e.g. weight_hh_l0
    gate: str                        # gate block ("i", "f", ... ; "h" for the Elman RNN; "all")
    shape: tuple[int, int]
    singular_values: tuple[float, ...]
    spectral_norm: float             # largest singular value
    spectral_radius: float | None    # largest |eigenvalue|

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["singular_values"] = list(self.singular_values)
        return d


def matrix_spectrum(U: torch.Tensor, name: str = "U", gate: str = "all") -> MatrixSpectrum:
    """Singular values (descending), spectral norm and (square U) spectral radius of one matrix."""
    U = U.detach().double().cpu()
    if U.dim() != 2:
        raise ValueError(f"matrix_spectrum: expected a 2-D matrix, got shape {tuple(U.shape)}")
    sv = torch.linalg.svdvals(U)
    radius = float(torch.linalg.eigvals(U).abs().max()) if U.shape[0] == U.shape[1] else None
    return MatrixSpectrum(name, gate, tuple(U.shape), tuple(float(s) for s in sv), float(sv[0]), radius)


def recurrent_spectra(module: nn.Module) -> list[MatrixSpectrum]:
    """Every weight_hh* in `module` (any torch.nn or rnnkit RNN/LSTM/GRU inside it): the whole
    matrix, then each gate block (hidden_size rows each) when there are several."""
    out = []
    for mname, owner in module.named_modules():
        prefix = mname + "." if mname else ""
        for last in _recurrent_names(owner):
            W, name = getattr(owner, last), prefix + last
            H = getattr(owner, "hidden_size", W.shape[1])
            out += _spectra(W, name, H)
            hr = last.replace("weight_hh", "weight_hr")
            W_hr = getattr(owner, hr, None)
            if isinstance(W_hr, torch.Tensor):             # a projected LSTM: W_hr U_g per gate
                out += _projected_spectra(W, W_hr, name, prefix + hr, H)
    if not out:
        raise ValueError(f"recurrent_spectra: {type(module).__name__} has no weight_hh parameter")
    return out


# A U matrix's name (weight_hh_l{k}[_reverse], or a cell's weight_hh), with the suffix of the parameters
# the hook-based weight_norm (_g, _v) and spectral_norm (_orig) recompute it from.
_RECURRENT = re.compile(r"(weight_hh(?:_l\d+(?:_reverse)?)?)(?:_orig|_g|_v)?")


def _recurrent_names(owner: nn.Module) -> list[str]:
    """The names of owner's U matrices, read as the forward reads them (getattr): a plain parameter, a
    weight under torch.nn.utils.parametrize (owner.parametrizations), or one of the hook-based norms'."""
    names = [n for n, _ in owner.named_parameters(recurse=False)]
    names += list(getattr(owner, "parametrizations", {}) or {})
    matched = (m.group(1) for m in map(_RECURRENT.fullmatch, names) if m)
    return [n for n in dict.fromkeys(matched) if isinstance(getattr(owner, n, None), torch.Tensor)]


def _spectra(W: torch.Tensor, pname: str, H: int) -> list[MatrixSpectrum]:
    """One U of G stacked gate blocks of H rows each (H x H; H x P for a projected LSTM)."""
    G, rest = divmod(W.shape[0], H)
    if rest:
        raise ValueError(f"recurrent_spectra: {pname} has {W.shape[0]} rows, not a multiple of its module's "
                         f"hidden_size {H}")
    if G == 1:
        return [matrix_spectrum(W, pname, "h")]
    return [matrix_spectrum(W, pname, "all")] + [matrix_spectrum(block, pname, gate)
                                                 for gate, block in _gate_blocks(W, H)]


def _gate_blocks(W: torch.Tensor, H: int):
    """(gate name, H-row block) of a stacked U."""
    G = W.shape[0] // H
    return zip(GATE_NAMES.get(G, tuple(str(j) for j in range(G))), W.split(H, 0))


def _projected_spectra(W: torch.Tensor, W_hr: torch.Tensor, pname: str, hr_name: str, H: int) -> list[MatrixSpectrum]:
    """Each gate block U_g (H x P) of a projected LSTM seen through its projection: W_hr U_g (P x P)."""
    hr = W_hr.detach().double()
    return [matrix_spectrum(hr @ block.detach().double(), f"{hr_name} @ {pname}", gate)
            for gate, block in _gate_blocks(W, H)]

"""Instruments for gradient flow: pure functions over traces and models that return plain data.

    grad_profile(tr.grad_norm[k])      ||dL/dh_t|| over t, mean over the batch      gradflow.py
    memory_horizon(profile)            steps back until it falls below 1e-3 of the last step's
    explosion(profile)                 sustained step-to-step growth going back in time
    jacobian_norms(layer, x)           ||dh_T/dh_t|| (spectral and Frobenius) by autograd
    recurrent_spectra(module)          singular values, spectral radius of U (per gate block)   spectra.py
    gate_saturation(gates, cell)       share of gate units within 0.01 of their limits          saturation.py
    plots                              PNG figures of all of the above                          plots.py
Every result is an array or a frozen dataclass whose `to_dict()` is JSON-serialisable.
"""
from .gradflow import (Explosion, Horizon, JacobianNorms, explosion, grad_profile, jacobian_norms,
                       memory_horizon)
from .saturation import Saturation, gate_saturation
from .spectra import MatrixSpectrum, recurrent_spectra

__all__ = ["grad_profile", "memory_horizon", "explosion", "jacobian_norms", "recurrent_spectra",
           "gate_saturation", "Horizon", "Explosion", "JacobianNorms", "MatrixSpectrum", "Saturation"]

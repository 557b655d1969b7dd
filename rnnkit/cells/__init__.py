"""Recurrent cells: one file per family, each the elementwise step forward and its hand backward.

See `base.py` for the cell protocol a user's own cell follows.
"""
from .base import derived_backward, uniform_init_
from .gru import GRUCell
from .layernorm import LayerNormCell
from .lstm import LSTMCell, ProjectedLSTMCell
from .rnn import ElmanCell

__all__ = ["ElmanCell", "LSTMCell", "ProjectedLSTMCell", "GRUCell", "LayerNormCell", "derived_backward", "uniform_init_"]

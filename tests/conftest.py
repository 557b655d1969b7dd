import pytest
import torch

import rnnkit._fused
import rnnkit.parallel

# Tests run two at a time (pytest -n 2) on two cores: one thread each.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["fused", "fused-kept", "torch"])
def min_route(request, monkeypatch):
    """The minGRU / minLSTM blocked scan's block routes (test_minimal.py, test_parallel_scan.py): the C++
    pass (rnnkit/_fused/minimal.cpp, the default on CPU), the same keeping x W^T for the backward at any
    input size (by default from KEEP_MIN_INPUT), and torch ops (the reference and the fallback)."""
    if request.param == "torch":
        monkeypatch.setattr(rnnkit.parallel, "FUSED_KINDS", {})
    elif not rnnkit._fused.available():
        pytest.skip("the fused kernel is not available here")
    elif request.param == "fused-kept":
        monkeypatch.setattr(rnnkit.parallel, "KEEP_MIN_INPUT", 1)
    return request.param


@pytest.fixture(params=["rule", "centred"])
def ln_centring(request, monkeypatch):
    """Under layer normalisation the fused kernel takes U, b_hh, W_ih and b_ih centred (so that its rows
    have zero mean) only in calls of enough rows (rnnkit._fused._centres); the tests' small scans run
    both ways: as the rule has it (not centred: LN computes the rows' means) and always centred."""
    if request.param == "centred":
        monkeypatch.setattr(rnnkit._fused, "CENTRE_ROWS_PER_UNIT", 0)
    return request.param

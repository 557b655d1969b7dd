import pytest
import torch

# Tests run two at a time (pytest -n 2) on two cores: one thread each.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

"""set_default_backend and --backend: backend="auto" layers run the engine when asked, for a run or a block."""
import json
import subprocess
import sys
import threading

import pytest
import torch
from torch import nn

import rnnkit as rk
from rnnkit.layers import _Recurrent as Recurrent
from rnnkit.tasks import memory
from rnnkit.train import TrainConfig, Trainer


@pytest.fixture
def paths(monkeypatch):
    """The path each layer call took, in order: 'engine' or 'native'."""
    seen = []
    for name in ("engine", "native"):
        method = getattr(Recurrent, f"_{name}_forward")
        monkeypatch.setattr(Recurrent, f"_{name}_forward",
                            lambda self, *a, _m=method, _n=name: seen.append(_n) or _m(self, *a))
    return seen


def ran(layer, x, paths):
    layer(x)
    return paths[-1]


@pytest.fixture(autouse=True)
def _restore_default():
    yield
    rk.set_default_backend("auto")


@pytest.mark.parametrize("cls", [rk.RNN, rk.LSTM, rk.GRU])
def test_default_backend_switches_auto_layers_only(cls, paths):
    torch.manual_seed(0)
    auto, native = cls(3, 5), cls(3, 5, backend="native")
    native.load_state_dict(auto.state_dict())
    x = torch.randn(7, 2, 3)
    assert ran(auto, x, paths) == "native"
    assert rk.set_default_backend("engine") == "auto"
    assert ran(auto, x, paths) == "engine" and ran(native, x, paths) == "native"   # an explicit choice is kept
    torch.testing.assert_close(auto(x)[0], native(x)[0], rtol=1e-5, atol=1e-6)   # the same math
    assert rk.set_default_backend("auto") == "engine"
    assert ran(auto, x, paths) == "native"


def test_default_backend_refuses_other_names():
    for bad in ("native", "Engine", None):
        with pytest.raises(ValueError, match="default backend must be 'auto' or 'engine'"):
            rk.set_default_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of auto, engine, got 'cudnn'"):
        TrainConfig(backend="cudnn")


def _fit(out, backend, epochs=2, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.rnn, model.head = rk.GRU(2, 4, batch_first=True), nn.Linear(4, 1)
    x = torch.randn(16, 5, 2)
    cfg = TrainConfig(epochs=epochs, batch_size=8, progress=False, out=str(out), backend=backend)
    def loss(m, b):
        return nn.functional.mse_loss(m.head(m.rnn(b[0])[0][:, -1]), b[1])
    Trainer(model, cfg, loss).fit((x, x.sum((1, 2))[:, None]), resume=resume)


def test_a_fit_without_a_backend_keeps_the_process_default(tmp_path, paths):
    rk.set_default_backend("engine")
    _fit(tmp_path / "a", None)
    assert paths == ["engine"] * 4
    assert rk.layers.auto_backend() == "engine"


def test_a_fit_restores_the_default_after_an_error(tmp_path):
    def boom(m, b):
        raise RuntimeError("boom")
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, backend="engine")
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(nn.Linear(2, 1), cfg, boom).fit((torch.randn(8, 2), torch.randn(8, 1)))
    assert rk.layers.auto_backend() == "auto"


def test_the_scope_of_a_fit_is_its_own_thread(paths):
    """A fit's backend holds in its thread only: another thread's layers are not switched, and
    overlapping fits cannot leave one's choice behind for the whole process."""
    inside, done = threading.Event(), threading.Event()

    def worker():
        with rk.layers.backend_scope("engine"):
            inside.set()
            done.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    try:
        assert ran(rk.GRU(2, 3), torch.randn(4, 1, 2), paths) == "native"
    finally:
        done.set()
        t.join()
    assert rk.layers.auto_backend() == "auto"


def test_the_cli_flag_reaches_training(tmp_path, paths):
    from rnnkit.cli import main
    argv = ["forecast", "--epochs", "2", "--no-sarima", "--no-progress", "--out"]
    assert main([*argv, str(tmp_path / "e"), "--backend", "engine"]) == 0
    assert set(paths) == {"engine"}
    del paths[:]
    assert main([*argv, str(tmp_path / "a")]) == 0
    assert set(paths) == {"native"}


def test_trainer_runs_its_backend_and_restores_the_default(tmp_path, paths):
    _fit(tmp_path / "a", "engine")
    assert paths == ["engine"] * 4                                      # 2 epochs x 2 batches
    _fit(tmp_path / "b", "auto")
    assert paths[4:] == ["native"] * 4
    assert ran(rk.GRU(2, 4), torch.randn(3, 2, 2), paths) == "native"   # nothing left behind


def test_resume_refuses_another_backend_and_reads_old_checkpoints_as_auto(tmp_path, paths):
    _fit(tmp_path / "run", "auto", epochs=1)
    with pytest.raises(ValueError, match=r"backend: 'auto' -> 'engine'"):
        _fit(tmp_path / "run", "engine", epochs=2, resume=True)
    manifest = tmp_path / "run" / "checkpoint.json"                     # as written before the field existed
    saved = json.loads(manifest.read_text())
    del saved["train_config"]["backend"]
    manifest.write_text(json.dumps(saved))
    del paths[:]
    _fit(tmp_path / "run", "auto", epochs=2, resume=True)
    assert paths == ["native"] * 2                                      # the second epoch's 2 batches


def test_memory_task_builds_its_layer_with_the_backend():
    cfg = memory.MemoryConfig(length=6, hidden_size=4, steps=1, backend="engine")
    model = memory.SequenceModel(cfg, memory.task_spec("adding", 6))
    assert model.rnn.backend == "engine"
    with pytest.raises(ValueError, match="--backend must be auto or engine, got 'fast'"):
        memory.MemoryConfig(backend="fast")


@pytest.mark.parametrize("argv, message", [
    (["classify", "train", "--backend", "fast"], "invalid choice: 'fast'"),
    (["memory", "--backend", "fast"], "--backend must be auto or engine"),
    (["gradflow", "--backend", "native"], "invalid choice: 'native'"),
])
def test_cli_refuses_an_unknown_backend(argv, message):
    r = subprocess.run([sys.executable, "-m", "rnnkit", *argv], capture_output=True, text=True, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr

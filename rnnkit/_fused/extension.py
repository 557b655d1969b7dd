"""Compiling and loading the fused kernel's C++ sources with torch.utils.cpp_extension (JIT, for this
machine's CPU), cached in torch's extension folder or in $RNNKIT_EXT_DIR; torch's file lock makes
concurrent builds safe. `rnnkit._fused.build` calls `load` once, under its own lock.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = ("scan.cpp", "forward.cpp", "backward.cpp", "blas.cpp", "random.cpp", "minimal.cpp", "pool.cpp", "stream.cpp",
           "ukernel.cpp", "shapes.cpp", "cores.cpp")
# -march=native: built on the machine that runs it. No -ffast-math: NaN and Inf must keep
# propagating (a NaN loss is detected downstream); exp/tanh are written to vectorise without it.
# -fopenmp: at::parallel_for is inline in ATen's headers and runs serially unless the extension itself is
# compiled with OpenMP; it links libgomp.so.1, which resolves to the copy torch has already loaded.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-w"]
LDFLAGS = ["-fopenmp"]


def ext_name() -> str:
    """Name of the compiled library: one per CPU model and flags, as -march=native ties it to the CPU.
    The sources need no place in it: `load` runs cpp_extension.load in each process, whose ninja build
    recompiles whatever source or header changed since (gcc's depfiles)."""
    cpu = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line
    except OSError:
        pass
    return "rnnkit_fused_" + hashlib.sha1((cpu + " ".join(CFLAGS)).encode()).hexdigest()[:10]


def _ensure_ninja() -> None:
    """torch's JIT builder runs `ninja` from PATH; a venv's own (pip package `ninja`) is not on it
    unless the venv is activated, so put that folder on PATH when no system ninja is found."""
    if shutil.which("ninja"):
        return
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the pip package
        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    for d in dirs:
        if shutil.which("ninja", path=d):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return


def _build_directory(cpp_extension, name: str) -> str:
    root = os.environ.get("RNNKIT_EXT_DIR")
    path = os.path.join(root, name) if root else cpp_extension._get_build_directory(name, False)
    os.makedirs(path, exist_ok=True)
    return path


def _clear_stale_lock(build_dir: str, max_age_s: float = 900.0) -> None:
    """torch's build lock is a file that a killed build leaves behind, and the next build then waits
    on it forever. A compile takes about a minute: a lock older than max_age_s is stale."""
    lock = os.path.join(build_dir, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
    except OSError:
        pass


def load(verbose: bool = False) -> None:
    """Build (or find the cached build of) the extension and load it: its ops register as
    torch.ops.rnnkit_fused. Raises on failure."""
    from torch.utils import cpp_extension
    _ensure_ninja()
    name = ext_name()
    build_dir = _build_directory(cpp_extension, name)
    _clear_stale_lock(build_dir)
    cpp_extension.load(name=name, sources=[str(HERE / s) for s in SOURCES], extra_cflags=CFLAGS,
                       extra_ldflags=LDFLAGS, extra_include_paths=[str(HERE)], build_directory=build_dir,
                       is_python_module=False, verbose=verbose)

"""Import kvikio, on a machine without a GPU driver too (compat mode, host memory only).

kvikio asks the CUDA driver whether each buffer is host memory, so without ``libcuda.so.1`` it cannot do
any I/O. :func:`load_kvikio` then builds ``fake_libcuda.c`` (beside this file, with ``cc``) into a stand-in
driver whose every call answers "not initialized" — which kvikio reads as host memory — and loads it
before kvikio does, so kvikio's compat mode runs its real POSIX code on host buffers. A real driver is
always preferred; the stand-in is used only when none can be loaded. It also loads ``rapids_logger``
first: ``libkvikio.load_library()`` skips that when ``cuda.pathfinder`` is not installed.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent


def has_real_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
        return True
    except OSError:
        return False


def build_fake_libcuda(out_dir: Optional[Path] = None) -> Path:
    """Compile the stand-in driver; returns the path of ``libcuda.so.1``. Raises if ``cc`` fails."""
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="kvstore-fake-cuda-"))
    lib = out_dir / "libcuda.so.1"
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-Wl,-soname,libcuda.so.1", "-o", str(lib),
                    str(HERE / "fake_libcuda.c")], check=True, capture_output=True)
    return lib


def load_kvikio(fake: str = "auto"):
    """Import and return kvikio; ``fake``: ``auto`` (stand-in driver only without a real one), ``no``.

    Returns ``(kvikio, driver)`` where ``driver`` is ``"real"`` or ``"fake"``; raises ImportError or
    OSError when kvikio cannot be made to work."""
    driver = "real"
    if not has_real_driver():
        if fake == "no":
            raise OSError("no libcuda.so.1 and the stand-in driver is disabled")
        ctypes.CDLL(str(build_fake_libcuda()), ctypes.RTLD_GLOBAL)  # dlopen("libcuda.so.1") now finds it
        driver = "fake"
    try:
        import rapids_logger

        rapids_logger.load_library()
    except (ImportError, OSError, AttributeError):
        pass
    if driver == "fake":
        os.environ.setdefault("KVIKIO_COMPAT_MODE", "ON")  # no GDS without a driver; AUTO would probe cuFile
    import kvikio
    import kvikio.defaults  # noqa: F401

    return kvikio, driver

"""The ``segattr`` command as a user runs it, for the benchmarks that time fresh processes.

A user's ``pip install`` compiles the package's bytecode once; a checkout run with
``PYTHONDONTWRITEBYTECODE=1`` (as on this project's machines) never keeps it, and every process
then recompiles the package's modules (0.15 s of a ``segattr explain`` call here). The
benchmarks compile it first, as the installer does, so they time the command, not the compiler.
"""

from __future__ import annotations

import compileall
import os
import shutil
import sys
from pathlib import Path


def segattr_command() -> list[str]:
    """The ``segattr`` console script of this interpreter's environment, else ``-m``."""
    script = Path(sys.executable).parent / "segattr"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("segattr")
    return [found] if found else [sys.executable, "-m", "segattr_onnx"]


def compile_package_bytecode() -> None:
    """Write the package's ``__pycache__`` as ``pip install`` does (quietly; already-current
    files are left alone)."""
    import segattr_onnx

    compileall.compile_dir(Path(segattr_onnx.__file__).parent, quiet=1)

"""The ``segattr`` console script: the CLI, then an exit without the interpreter's teardown.

When a command returns, its outputs are written, closed and renamed into place. CPython's
shutdown would still free every ONNX Runtime session (thread pools, arenas) and tear down onnx,
ONNX Runtime and numpy module by module: 0.12-0.15 s of a 4-5 s ``segattr explain`` call on the
benchmark U-Net, spent after the work is done. The script instead runs the exit handlers that
code registered (``atexit``: a plugin's Ray shutdown, temporary folders, logging), flushes the
standard streams and leaves with ``os._exit``.

Only the installed script and ``python -m segattr_onnx`` exit this way. ``cli.main`` (what tests
and embedding programs call) keeps the ordinary ``SystemExit``, and an exception that escapes
the CLI (a bug, not a refusal: refusals are exit codes) goes through the ordinary shutdown with
its traceback. So does a run under a profiler or a tracer (``python -m cProfile``, coverage):
they write their results after the script returns.
"""

from __future__ import annotations

import atexit
import os
import sys

# CPython's status when flushing stdout fails at exit (a reader that closed its pipe).
EXIT_FLUSH_FAILED = 120


# numpy's OpenBLAS starts a thread per core when it is imported (35 ms of each call here) and
# its idle threads spin after a product, on cores ONNX Runtime is using. The CLI's own matrix
# products are small (a layer's weighted sum of activations, memory-bound): one thread does
# them, unless the user sets a count.
BLAS_THREADS = ("OPENBLAS_NUM_THREADS", "1")


def main() -> None:
    """Run the CLI, then exit with its status as soon as the process has nothing left to do."""
    if "numpy" not in sys.modules:  # too late once it is loaded
        os.environ.setdefault(*BLAS_THREADS)
    from segattr_onnx.cli import main as cli_main

    try:
        cli_main()
        status: object = 0
    except SystemExit as stop:
        status = stop.code
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    observed = sys.getprofile() is not None or sys.gettrace() is not None
    if run_exit_handlers is None or observed:  # the ordinary shutdown
        sys.exit(status)
    code = exit_code(status)
    run_exit_handlers()
    if not _flushed(sys.stdout) and code == 0:
        code = EXIT_FLUSH_FAILED
    _flushed(sys.stderr)
    os._exit(code)


def exit_code(status: object) -> int:
    """The status ``sys.exit(status)`` would give the shell, printing a message as it does."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    print(status, file=sys.stderr)
    return 1


def _flushed(stream) -> bool:
    try:
        if stream is not None:
            stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream
        return False
    return True

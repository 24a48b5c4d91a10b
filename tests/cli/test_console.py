"""The ``segattr`` script's exit: statuses, streams and exit handlers as the ordinary exit
gives them, without the interpreter's teardown."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from segattr_onnx import __version__
from segattr_onnx.console import EXIT_FLUSH_FAILED, _flushed, exit_code


def _script(code: str) -> subprocess.CompletedProcess:
    """``code``, then the console script's ``main`` with ``sys.argv`` as ``code`` left it."""
    program = f"import sys\n{code}\nfrom segattr_onnx.console import main\nmain()\n"
    return subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )


def test_the_installed_script_and_python_m_run_the_console_entry() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "segattr"]
    assert script.value == "segattr_onnx.console:main"
    completed = subprocess.run(
        [sys.executable, "-m", "segattr_onnx", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0 and __version__ in completed.stdout


def test_output_reaches_a_pipe_and_exit_handlers_run() -> None:
    completed = _script(
        "import atexit\n"
        "atexit.register(print, 'handler ran', flush=False)\n"
        "sys.argv = ['segattr', '--help']"
    )
    assert completed.returncode == 0, completed.stderr
    assert "Usage:" in completed.stdout  # buffered in the pipe, flushed before leaving
    assert completed.stdout.rstrip().endswith("handler ran")


def test_refusals_keep_their_status_and_message() -> None:
    completed = _script("sys.argv = ['segattr', 'explain', '--no-such-option']")
    assert completed.returncode == 2
    assert completed.stderr.startswith("error:") and "Traceback" not in completed.stderr


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize(("given", "threads"), [(None, 1), ("2", min(2, os.cpu_count() or 1))])
def test_numpy_blas_gets_one_thread_unless_the_user_sets_a_count(given, threads) -> None:
    """The script sets OpenBLAS's thread count before numpy loads (a user's setting wins):
    after ``--help``, which loads numpy and no session, the process has OpenBLAS's threads
    (the main thread included, and at most one per core) and no others."""
    setting = (
        "" if given is None else f"import os; os.environ['OPENBLAS_NUM_THREADS'] = '{given}'\n"
    )
    completed = _script(
        f"{setting}import atexit, os\n"
        "atexit.register(lambda: print('threads', len(os.listdir('/proc/self/task'))))\n"
        "sys.argv = ['segattr', 'explain', '--help']"
    )
    assert completed.returncode == 0, completed.stderr
    assert "numpy" in subprocess.run(  # the help did load numpy: the count is OpenBLAS's
        [sys.executable, "-c", "import sys; from segattr_onnx import cli; print(*sys.modules)"],
        capture_output=True, text=True, timeout=120,
    ).stdout.split()  # fmt: skip
    assert f"threads {threads}" in completed.stdout


def test_the_interpreter_teardown_is_skipped() -> None:
    """An object left in a module until shutdown is never finalised: the teardown, which
    would free every session the same way, does not run."""
    completed = _script(
        "class Finalised:\n"
        "    def __del__(self):\n"
        "        print('torn down')\n"
        "held = Finalised()\n"
        "sys.argv = ['segattr', '--version']"
    )
    assert completed.returncode == 0, completed.stderr
    assert __version__ in completed.stdout and "torn down" not in completed.stdout


def test_a_profiled_run_keeps_the_ordinary_exit(tmp_path) -> None:
    """A profiler writes its results after the script returns: it must get to."""
    stats = tmp_path / "run.prof"
    completed = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "segattr_onnx", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert __version__ in completed.stdout and stats.stat().st_size > 0


@pytest.mark.parametrize(
    ("status", "code"), [(None, 0), (0, 0), (2, 2), (130, 130), (256, 0), (-1, 255)]
)
def test_exit_code_is_what_sys_exit_gives_the_shell(status, code) -> None:
    assert exit_code(status) == code
    completed = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.exit({status!r})"], timeout=60
    )
    assert completed.returncode == code


def test_a_message_status_is_printed_and_exits_1(capsys) -> None:
    assert exit_code("stopped: no room") == 1
    assert capsys.readouterr().err == "stopped: no room\n"


class _ClosedPipe:
    def flush(self) -> None:
        raise BrokenPipeError("reader went away")


def test_a_stream_that_cannot_be_flushed_is_reported_not_raised() -> None:
    assert not _flushed(_ClosedPipe())
    assert _flushed(None)
    assert EXIT_FLUSH_FAILED == 120  # CPython's own status for it

"""The one-writer lock: portable (no fcntl needed), and a writer that is dying is waited for, not refused."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_crash_safety import _wait_for_committed_rows, library_content, start_index

from clipsearch.errors import LibraryLockedError
from clipsearch.library import Library, writer_is_exiting

HOLD_THE_LOCK = (
    "import sys, time; from clipsearch.library import Library;"
    "lock = Library.open(sys.argv[1]).writer_lock(); lock.__enter__(); print('held', flush=True);"
    "time.sleep(60)"
)


def test_the_package_imports_and_locks_without_fcntl(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['fcntl'] = None\n"
        "from clipsearch import Searcher\n"
        "from clipsearch.library import Library\n"
        "library = Library.create(sys.argv[1])\n"
        "with library.writer_lock():\n"
        "    print('locked', sys.modules['fcntl'] is None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "lib")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["locked", "True"]


def test_a_live_process_is_not_exiting_and_a_gone_or_zombie_one_is() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    quitter = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        assert not writer_is_exiting(sleeper.pid)
        assert not writer_is_exiting(os.getpid())
        _wait_until(lambda: writer_is_exiting(quitter.pid))  # a zombie until we reap it
    finally:
        sleeper.kill()
        sleeper.wait()
        quitter.wait()
    assert writer_is_exiting(quitter.pid)  # reaped: gone


def test_a_killed_writer_is_waited_for_and_a_live_one_refused(tmp_path: Path) -> None:
    library = Library.create(tmp_path / "lib")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(library.path)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert int(library.pid_path.read_text()) == holder.pid
        with pytest.raises(LibraryLockedError, match=f"pid {holder.pid}.* is writing"), library.writer_lock():
            pass
        holder.kill()  # not reaped: a zombie, as a killed writer is while its threads are torn down
        with library.writer_lock():  # wait=0, yet the dying writer is waited for
            assert int(library.pid_path.read_text()) == os.getpid()
    finally:
        holder.kill()
        holder.wait()


def _wait_until(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@contextlib.contextmanager
def cpu_load(processes: int) -> Iterator[None]:
    """Busy processes at normal priority, as other work on a loaded machine; each stops by itself after 120 s."""
    burn = "import time\nend = time.time() + 120\nwhile time.time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(processes)]
    try:
        yield
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()


@pytest.fixture
def corpus(make_shape, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    for n, colour in enumerate(("red", "green", "blue", "yellow") * 4):
        make_shape(f"corpus/{n:02}-{colour}.png", ("circle", "square", "triangle", "star")[n // 4], colour, size=64)
    return tmp_path / "corpus"


def test_an_index_started_right_after_a_killed_one_waits_for_it_and_ends_identical(
    tmp_path: Path, corpus: Path, random_model: str, run_cli
) -> None:
    reference = tmp_path / "reference"
    # torch: its vectors do not depend on which photos share a batch (start_index forces it too)
    run_cli("index", str(corpus), "--library", str(reference), "--batch-size", "4", "--backend", "torch",
            model=random_model)
    killed = tmp_path / "killed"
    first = start_index(killed, corpus, random_model)  # decoding threads at nice 19, as on any CPU
    _wait_for_committed_rows(killed, first)
    with cpu_load(processes=2 * (os.cpu_count() or 1)):  # the killed run's threads now take long to die
        first.kill()  # and it is not waited for: the next run starts while it may still be exiting
        second = start_index(killed, corpus, random_model)
        _wait_until(lambda: second.poll() is not None or _read_pid(killed) == second.pid, timeout=240)
    _out, err = second.communicate(timeout=300)
    first.wait()
    assert second.returncode == 0, err
    expected, actual = library_content(reference), library_content(killed)
    assert sorted(actual) == sorted(expected) and len(actual) == 16
    for path, vector in expected.items():
        np.testing.assert_allclose(actual[path], vector, atol=1e-5)


def _read_pid(library: Path) -> int | None:
    try:
        return int((library / "writer.pid").read_text())
    except (OSError, ValueError):
        return None

"""``hold_folder``: one process per output folder, a dead holder's lock taken over.

One implementation (``folderlock``), bound to each package's ``UserError`` by
``coorddet.locking`` and ``data_gen.locking`` (the packages never import each other); every case
runs through both bindings.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import coorddet.errors
import coorddet.locking
import data_gen.errors
import data_gen.locking
import folderlock

pytestmark = pytest.mark.robustness

MODULES = {
    "coorddet": (coorddet.locking, coorddet.errors.UserError),
    "data_gen": (data_gen.locking, data_gen.errors.UserError),
}
HOLD = (
    "import sys, time\n"
    "from {module}.locking import hold_folder\n"
    "with hold_folder(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    time.sleep(600)\n"
)


def start_holder(folder: Path, module: str = "coorddet") -> subprocess.Popen:
    """A process holding ``folder``'s lock until killed (returns once it holds it)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD.format(module=module), str(folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "held"
    return process


def stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def test_both_packages_bind_the_one_lock() -> None:
    assert coorddet.locking.lock_path is data_gen.locking.lock_path is folderlock.lock_path


@pytest.mark.parametrize(("name", "other"), [("coorddet", "data_gen"), ("data_gen", "coorddet")])
def test_a_binding_imports_not_the_other_package(name: str, other: str) -> None:
    code = f"import sys, {name}.locking; assert {other!r} not in sys.modules, {other!r}"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("name", MODULES)
def test_a_held_folder_is_refused_naming_the_holder(name: str, tmp_path: Path) -> None:
    module, user_error = MODULES[name]
    folder = tmp_path / "out"
    holder = start_holder(folder, name)
    try:
        with pytest.raises(user_error) as refused, module.hold_folder(folder):
            pass
    finally:
        stop(holder)
    message = str(refused.value)
    assert str(folder) in message and f"process {holder.pid} (" in message
    assert f"(-c {folder})" in message and "--out" in message and "\n" not in message
    assert not folder.exists()  # refusing wrote nothing


@pytest.mark.parametrize("name", MODULES)
def test_a_killed_holders_lock_is_taken_over(name: str, tmp_path: Path) -> None:
    module, _ = MODULES[name]
    folder = tmp_path / "out"
    holder = start_holder(folder, name)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = module.lock_path(folder)
    assert lock.is_file()  # left behind, still naming the dead process
    with module.hold_folder(folder) as held:
        assert held == lock
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()  # released: removed


@pytest.mark.parametrize("name", MODULES)
def test_released_and_reentered(name: str, tmp_path: Path) -> None:
    module, user_error = MODULES[name]
    folder = tmp_path / "a" / "b"  # the parent is created
    with module.hold_folder(folder):
        with pytest.raises(user_error, match="in use by process"), module.hold_folder(folder):
            pass  # a second open file description of the same process is refused too
    with module.hold_folder(folder):
        pass
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "a", target_is_directory=True)
    with module.hold_folder(folder):  # one folder under two names: one lock
        with pytest.raises(user_error), module.hold_folder(link / "b"):
            pass


FORK = (
    "import os, sys, time\n"
    "from {module}.locking import hold_folder\n"
    "with hold_folder(sys.argv[1]):\n"
    "    if os.fork() == 0:\n"
    "        print(os.getpid(), flush=True)  # the fork hooks have run\n"
    "        time.sleep(60)\n"
    "        os._exit(0)\n"
    "    time.sleep(60)\n"
)


@pytest.mark.parametrize("name", MODULES)
def test_a_forked_child_does_not_keep_a_killed_parents_lock(name: str, tmp_path: Path) -> None:
    """Like a DataLoader worker outliving its SIGKILLed parent for a moment."""
    module, _ = MODULES[name]
    folder = tmp_path / "out"
    parent = subprocess.Popen(
        [sys.executable, "-c", FORK.format(module=name), str(folder)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    stop(parent)  # SIGKILL
    try:
        os.kill(child, 0)  # still alive
        with module.hold_folder(folder):
            pass
    finally:
        os.kill(child, signal.SIGKILL)


_NO_FLOCK_SHIM = """
#include <errno.h>
#include <stdlib.h>
int flock(int fd, int operation) {
    (void)fd; (void)operation;
    errno = atoi(getenv("NOFLOCK_ERRNO"));
    return -1;
}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("cc"), reason="cc")
@pytest.mark.parametrize("error", ["ENOLCK", "EOPNOTSUPP", "ENOSYS"])
def test_a_file_system_without_flock_warns_in_one_line_and_runs(error: str, tmp_path: Path):
    """flock fails at the C library (a preloaded flock, as on Lustre mounted without
    -o flock or NFS without its lock service): one warning line, the tool runs, no lock file."""
    shim = tmp_path / "noflock.so"
    (tmp_path / "noflock.c").write_text(_NO_FLOCK_SHIM)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(shim), str(tmp_path / "noflock.c")],
                   check=True)  # fmt: skip
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "data_gen", "--out", str(out), "--train", "2", "--val", "1",
         "--test", "1", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "LD_PRELOAD": str(shim), "NOFLOCK_ERRNO": str(getattr(errno, error))},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "flock" in lines[0], lines
    assert str(out) in lines[0] and os.strerror(getattr(errno, error)) in lines[0]
    assert (out / "dataset.json").is_file()
    assert not folderlock.lock_path(out).exists()

"""Two writers on one folder, full disks, read-only or removed folders, a dead DDP worker: through
the real command lines.

- A second process on an output folder exits 2 with one line naming the folder and the process
  holding it, and changes nothing; a lock whose holder was killed is taken over.
- A write failure exits 1 with one line naming the file and the OS error, leaves no temporary
  file, and every checkpoint that was there stays whole and resumable.
- A killed DDP worker ends process 0 with one line naming the rank and the command that resumes.
"""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, assert_fault, assert_user_error, run_cli

from coorddet.locking import lock_path

pytestmark = pytest.mark.robustness

SMOKE = ("train.py", "--config", "configs/smoke.yaml")
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
HOLD = (
    "import sys, time\nfrom {module}.locking import hold_folder\nwith hold_folder(sys.argv[1]):\n"
)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and folders of the atomic writers under ``folder``."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]


def checkpoints(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "checkpoints").iterdir())}


def validation_epochs(run: Path) -> list[int]:
    with (run / "logs" / "metrics.csv").open(newline="") as file:
        return [int(float(row["epoch"])) for row in csv.DictReader(file) if row.get("map")]


def wait_for(condition, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def holder(folder: Path, module: str = "coorddet") -> subprocess.Popen:
    """A process holding ``folder``'s lock until killed (returned once it holds it)."""
    code = HOLD.format(module=module) + "    print('held', flush=True)\n    time.sleep(600)\n"
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "held"
    return process


def leave_stale_lock(folder: Path) -> None:
    """The lock file of a holder that was SIGKILLed while holding ``folder``."""
    code = HOLD.format(module="coorddet") + "    os.kill(os.getpid(), signal.SIGKILL)\n"
    result = subprocess.run([sys.executable, "-c", "import os, signal\n" + code, str(folder)],
                            cwd=ROOT)  # fmt: skip
    assert result.returncode == -signal.SIGKILL and lock_path(folder).is_file()


# --- one process per output folder ---------------------------------------------------------


def test_a_second_training_into_a_running_ones_folder_is_refused(tiny_dataset, tmp_path):
    """The plainest case: the same command twice (also with --overwrite, --resume last)."""
    out = tmp_path / "run"
    args = [*SMOKE, "--data", str(tiny_dataset), "--out", str(out), "--quiet", "--max-epochs", "2"]
    first = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        lock = lock_path(out)
        wait_for(lambda: lock.is_file() and lock.read_text().startswith(f"{first.pid} "), first)
        # Paused while the others start (each builds its config: seconds), so it is certainly
        # still running when they try; it continues afterwards.
        os.kill(first.pid, signal.SIGSTOP)
        flags = {"same": [], "overwrite": ["--overwrite"], "resume": ["--resume", "last"]}
        try:
            with ThreadPoolExecutor(max_workers=2) as pool:
                refused = list(pool.map(lambda f: run_cli(*args, *f), flags.values()))
        finally:
            os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    for result in refused:
        assert_user_error(result, str(out), f"in use by process {first.pid} (train.py ", "--out")
    assert first.returncode == 0, stderr[-3000:]
    assert validation_epochs(out) == [0, 1]  # one run's rows, none interleaved
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2
    assert not lock.exists() and not leftovers(out)


@pytest.mark.parametrize("tool", ["evaluate", "data_gen", "paper_repro", "paper_protocol"])
def test_the_other_tools_refuse_a_folder_in_use(tool, tiny_dataset, smoke_runs, tmp_path):
    out = tmp_path / "out"
    command = {
        "evaluate": ["-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--out", str(out),
                     str(smoke_runs["baseline"] / "checkpoints" / "last.ckpt")],
        "data_gen": ["-m", "data_gen", "--out", str(out), "--train", "4", "--val", "2",
                     "--test", "2", "--workers", "1"],
        "paper_repro": ["experiments/paper_repro.py", "--quick", "--runs", str(out),
                        "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "res")],
        "paper_protocol": ["experiments/paper_protocol.py", "--quick", "--runs", str(out),
                           "--data-root", str(tmp_path / "data"), "--out", str(tmp_path / "res")],
    }[tool]  # fmt: skip
    process = holder(out, "data_gen" if tool == "data_gen" else "coorddet")
    try:
        result = run_cli(*command)
    finally:
        process.kill()
        process.wait()
    assert_user_error(result, str(out), f"in use by process {process.pid}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]  # the killed holder's


def test_a_killed_holders_lock_is_taken_over(tiny_dataset, smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["baseline"], run)
    leave_stale_lock(run)
    done = run_cli(*SMOKE, "--data", str(tiny_dataset), "--out", str(run), "--quiet",
                   "--resume", "last")  # fmt: skip
    assert done.returncode == 0 and "nothing to do" in done.stderr, done.stderr[-3000:]
    data = tmp_path / "data"
    leave_stale_lock(data)
    made = run_cli("-m", "data_gen", "--out", str(data), "--train", "4", "--val", "2",
                   "--test", "2", "--workers", "1", "--quiet")  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert not lock_path(run).exists() and not lock_path(data).exists()


# --- write failures --------------------------------------------------------------------------


def mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True)  # fmt: skip
    return mounted.returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder)], check=True)


def _file_size_limit() -> None:  # in the child: writes past 1 MB fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


@pytest.mark.parametrize("disk", ["full tmpfs", "file size limit"])
def test_a_failed_checkpoint_save_is_one_line_and_keeps_the_checkpoints(
    disk, tiny_dataset, smoke_runs, tmp_path
):
    """Resume the 1-epoch smoke run for a second epoch whose checkpoint does not fit."""
    source = smoke_runs["baseline"]
    where, limit, reason = tmp_path, None, "File too large"
    if disk == "full tmpfs":
        used = sum(-(-p.stat().st_size // 4096) * 4096 for p in source.rglob("*"))
        where, reason = tmp_path / "disk", "No space left on device"
        # room for the small files a resume writes, not for a 7.8 MB checkpoint
        if not mount_tmpfs(where, used + (1 << 20)):
            pytest.skip("cannot mount a tmpfs here (needs root); the file size limit case runs")
    else:
        limit = _file_size_limit
    run = where / "run"
    try:
        shutil.copytree(source, run)
        before = checkpoints(run)
        result = subprocess.run(
            [sys.executable, *SMOKE, "--data", str(tiny_dataset), "--out", str(run), "--quiet",
             "--no-coordconv", "--resume", "last", "--max-epochs", "2"],
            cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=limit, timeout=300,
        )  # fmt: skip
        assert_fault(result, f"error: cannot write {run / 'checkpoints'}/", f".ckpt: {reason}")
        assert checkpoints(run) == before and not leftovers(run)
        assert not lock_path(run).exists()
        if disk == "full tmpfs":
            return
        again = run_cli(*SMOKE, "--data", str(tiny_dataset), "--out", str(run), "--quiet",
                        "--no-coordconv", "--resume", "last", "--max-epochs", "2")  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
        assert json.loads((run / "metrics.json").read_text())["epochs"] == 2
        assert validation_epochs(run) == [0, 1]
    finally:
        if disk == "full tmpfs":
            unmount(where)


def _tiny_file_size_limit() -> None:  # PNGs and JSON files past 1 KB fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 10, resource.RLIM_INFINITY))


@pytest.mark.parametrize("tool", ["evaluate", "data_gen"])
def test_a_failed_write_of_the_other_tools_is_one_line_and_leaves_nothing(
    tool, tiny_dataset, smoke_runs, tmp_path
):
    out = tmp_path / "out"
    command = {
        "evaluate": ["-m", "coorddet.evaluate", "--data", str(tiny_dataset), "--out", str(out),
                     "--quiet", str(smoke_runs["baseline"] / "checkpoints" / "last.ckpt")],
        "data_gen": ["-m", "data_gen", "--out", str(out), "--train", "4", "--val", "2",
                     "--test", "2", "--workers", "1", "--quiet"],
    }[tool]  # fmt: skip
    result = subprocess.run([sys.executable, *command], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, preexec_fn=_tiny_file_size_limit, timeout=300)  # fmt: skip
    prefix = "data_gen: error" if tool == "data_gen" else "error"
    assert_fault(result, f"{prefix}: cannot write {out}/", ": File too large")
    assert list(tmp_path.iterdir()) == []  # no report or dataset, no staging folder, no lock


def make_read_only(folder: Path) -> bool:
    """Root ignores permission bits: a read-only bind mount then, else ``chmod``."""
    if os.geteuid() != 0:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        return True
    bind = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if bind.returncode != 0:
        return False
    subprocess.run(["mount", "-o", "remount,ro,bind", str(folder)], check=True)
    return True


def undo_read_only(folder: Path) -> None:
    if os.geteuid() == 0:
        unmount(folder)
    else:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_a_read_only_run_folder_is_one_line(tiny_dataset, smoke_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(smoke_runs["baseline"], run)
    before = {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    if not make_read_only(run):
        pytest.skip("no way to make a folder read-only for root here (bind mount refused)")
    try:
        result = run_cli(*SMOKE, "--data", str(tiny_dataset), "--out", str(run), "--quiet",
                         "--resume", "last", "--max-epochs", "2")  # fmt: skip
    finally:
        undo_read_only(run)
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert_fault(result, f"error: cannot write {run}/", reason)
    assert {str(p): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_folder_removed_mid_run_is_one_line(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, *SMOKE, "--data", str(tiny_dataset), "--out", str(out), "--quiet",
            "--max-epochs", "50"]  # fmt: skip
    process = subprocess.Popen(args, cwd=ROOT, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        wait_for((out / "checkpoints" / "last.ckpt").is_file, process)
        out.rename(tmp_path / "moved")  # gone from under the run, in one step
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    result = subprocess.CompletedProcess(args, process.returncode, "", stderr)
    assert_fault(result, f"error: cannot write {out}/", "No such file or directory")
    assert not out.exists()  # not recreated
    # (a save that was under way when the folder went may leave its .tmp in the moved copy)


# --- DDP -------------------------------------------------------------------------------------


def child_with_rank(parent: int, rank: int) -> int | None:
    for pid in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in environ:
            return int(pid)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker in /proc")
def test_a_killed_ddp_worker_is_one_line_naming_the_rank_and_the_resume(tiny_dataset, tmp_path):
    from coorddet.cli.rundir import read_resume_point

    out = tmp_path / "ddp"
    args = [*SMOKE, "--data", str(tiny_dataset), "--out", str(out), "--quiet",
            "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--max-epochs", "50",
            "--limit-val-batches", "1"]  # fmt: skip
    process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=ENV,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for((out / "checkpoints" / "last.ckpt").is_file, process)
        worker = child_with_rank(process.pid, 1)
        assert worker is not None
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        seconds = time.monotonic() - killed
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # 1, or SIGKILL when Lightning's own watcher ends process 0 first (within 5 s of the death)
    assert process.returncode in (1, -signal.SIGKILL), (process.returncode, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    resume = "resume with: python train.py " + " ".join(args[1:]) + " --resume last"
    assert lines[0] == f"error: DDP worker rank 1 died (pid {worker}, killed by SIGKILL); {resume}"
    assert seconds < 30
    assert not leftovers(out) and not lock_path(out).exists()
    assert read_resume_point(out / "checkpoints" / "last.ckpt").completed_epochs >= 1

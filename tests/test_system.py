"""coorddet.system: the process settings the command-line tools apply."""

import importlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coorddet.system import (
    CpuShare,
    ThreadGovernor,
    cgroup_cpu_quota,
    fix_threads,
    keep_freed_memory,
    share_threads,
    threads_for,
    usable_cpus,
    use_huge_pages,
)


def test_huge_pages_on_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_keep_freed_memory_unless_the_user_chose(monkeypatch):
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setenv("COORDDET_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("COORDDET_KEEP_FREED_MEMORY")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the user tunes glibc themselves
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    is_glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is is_glibc


_PROBE = """
import os, sys
from coorddet.cli import report_errors
from coorddet.system import configure_process

def main(argv):
    block = bytearray(256 * 2**20)  # malloc'd and written (zero-filled), then freed
    del block
    pages = int(open("/proc/self/statm").read().split()[1])
    print(os.environ.get("THP_MEM_ALLOC_ENABLE"), pages * os.sysconf("SC_PAGE_SIZE") // 2**20)
    return 0

configure_process()  # as train.py's and coorddet.evaluate's main do
sys.exit(report_errors(main))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_command_line_tools_keep_freed_memory_and_use_huge_pages(tmp_path, keep):
    """What configure_process (first in train.py's and coorddet.evaluate's main) sets, seen from the
    process: a freed 256 MB block stays in the process for reuse, unless
    COORDDET_KEEP_FREED_MEMORY=0."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_", "GLIBC_"))}
    env["COORDDET_KEEP_FREED_MEMORY"] = keep
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    huge_pages, resident_mb = result.stdout.split()
    assert huge_pages == "1"
    if keep == "1":
        assert int(resident_mb) > 256
    else:
        assert int(resident_mb) < 256


# --- threads -------------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]
_THREAD_PROBE = """
import os, sys
from coorddet.cli import report_errors
from coorddet.system import configure_process

def main(argv):
    import torch
    print(torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("COORDDET_THREADS"))
    return 0

configure_process()
sys.exit(report_errors(main))
"""


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_each_command_sets_up_the_process_before_it_runs(command, monkeypatch):
    """train.py's and coorddet.evaluate's ``main``: configure_process, then the command."""
    import coorddet.system

    cli = importlib.import_module(f"coorddet.cli.{command}")
    calls = []

    def record() -> None:
        calls.append("configure_process")

    monkeypatch.setattr(coorddet.system, "configure_process", record)
    monkeypatch.setattr(cli, "configure_process", record, raising=False)
    monkeypatch.setattr(cli, f"{command}_command", lambda argv: calls.append(argv) or 0)
    assert cli.main(["--flag"]) == 0
    assert calls == ["configure_process", ["--flag"]]


def thread_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "COORDDET_THREADS")}  # fmt: skip
    return {**env, **settings}


@pytest.mark.parametrize(
    ("others", "cores", "threads"),
    [(0.0, 2, 2), (0.2, 2, 2), (0.4, 2, 1), (1.0, 2, 1), (3.0, 2, 1), (1.0, 8, 7), (0.0, 1, 1)],
)
def test_threads_follow_the_cores_others_leave(others, cores, threads):
    assert threads_for(others, cores) == threads


@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_command_line_tools_choose_threads_unless_the_user_did(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(_THREAD_PROBE)

    def probe(**settings: str) -> list[str]:
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                env=thread_env(**settings), check=True, cwd=ROOT)  # fmt: skip
        return result.stdout.split()

    threads, omp, mark = probe()
    assert 1 <= int(threads) <= os.cpu_count() and omp == threads and mark == "auto"
    assert probe(OMP_NUM_THREADS="1") == ["1", "1", "None"]  # the user's, untouched
    assert probe(MKL_NUM_THREADS="1")[1:] == ["None", "None"]
    # A process started by a coorddet command (a DDP worker) keeps what its parent chose.
    assert probe(OMP_NUM_THREADS="1", COORDDET_THREADS="shared") == ["1", "1", "shared"]


def busy_neighbour() -> int:
    """The pid of a busy process that is not this one's descendant (its shell parent exits),
    as another user's job would be: coorddet counts its own DataLoader workers as its own."""
    started = subprocess.run(
        ["sh", "-c", f"{shlex.quote(sys.executable)} -c 'while True: pass' >/dev/null 2>&1 & echo $!"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(started.stdout)


@pytest.mark.skipif(sys.platform != "linux" or (os.cpu_count() or 1) < 2, reason="2+ cores")
def test_a_neighbour_that_starts_during_a_run_takes_a_thread(monkeypatch):
    import torch

    monkeypatch.setenv("COORDDET_THREADS", "auto")
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count())
        governor = ThreadGovernor(every_seconds=0.5)
        assert governor.active
        neighbour = busy_neighbour()
        try:
            share = CpuShare()
            deadline = time.monotonic() + 1.2
            while time.monotonic() < deadline:
                governor.step()
            assert share.others() > 0.6  # the neighbour's core, seen from /proc/stat
        finally:
            os.kill(neighbour, signal.SIGKILL)
        assert torch.get_num_threads() <= os.cpu_count() - 1
        assert governor.changes
        # A user's choice leaves the governor inactive.
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        monkeypatch.delenv("COORDDET_THREADS")
        assert not ThreadGovernor().active
    finally:
        torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ddp_processes_share_the_chosen_threads(tiny_dataset, tmp_path):
    def run(out: Path, *flags: str, **settings: str) -> str:
        result = subprocess.run(
            [sys.executable, "train.py", "--config", "configs/smoke.yaml", "--data",
             str(tiny_dataset), "--out", str(out), "--accelerator", "cpu", "--devices", "2",
             "--strategy", "ddp", "--limit-train-batches", "1", "--limit-val-batches", "1",
             *flags],
            capture_output=True, text=True, env={**thread_env(**settings), "PYTHONWARNINGS": "ignore"},
            cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return next(line for line in result.stdout.splitlines() if "torch threads" in line)

    chosen = run(tmp_path / "chosen")
    threads = json.loads(chosen.split("per process: ")[1].split(" (")[0])
    assert len(threads) == 2 and threads[0] == threads[1]  # each process its share
    assert 1 <= sum(threads) <= max(2, os.cpu_count()) and "chosen from the free cores" in chosen
    assert "per process: [1, 1] (OMP_NUM_THREADS" in run(tmp_path / "user", OMP_NUM_THREADS="1")
    # --threads is the user's choice too, over OMP_NUM_THREADS, and not divided
    assert "per process: [1, 1] (--threads 1)" in run(
        tmp_path / "flag", "--threads", "1", OMP_NUM_THREADS="2"
    )


def test_fixed_threads_are_the_user_s_and_stay(monkeypatch):
    import torch

    monkeypatch.setenv("COORDDET_THREADS", "auto")  # as if coorddet had chosen 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    try:
        fix_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert "COORDDET_THREADS" not in os.environ  # DDP workers inherit 1, undivided
        assert not ThreadGovernor().active and share_threads(2) is None
        with pytest.raises(ValueError, match="threads must be >= 1"):
            fix_threads(0)
    finally:
        torch.set_num_threads(before)


# --- the cores a process may use: affinity, cgroup quota, processes per machine ----------------


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2: a container of 1.5 CPUs
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1
        ({}, None),  # no cgroup file system
    ],
)
def test_the_cgroup_cpu_quota_caps_the_cores(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_quota(tmp_path) == quota
    cpus = len(os.sched_getaffinity(0))
    expected = cpus if quota is None else min(cpus, math.ceil(quota))
    assert usable_cpus(tmp_path) == expected


_AFFINITY_PROBE = """
import os
from coorddet.system import configure_threads, usable_cpus
threads = configure_threads(sample_seconds=0.05)
print(usable_cpus(), threads, os.environ["COORDDET_THREADS"])
"""


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset")
def test_threads_follow_the_cpu_affinity_and_the_processes_per_machine():
    def probe(*prefix: str, **settings: str) -> list[str]:
        result = subprocess.run([*prefix, sys.executable, "-c", _AFFINITY_PROBE],
                                capture_output=True, text=True, env=thread_env(**settings),
                                check=True, cwd=ROOT)  # fmt: skip
        return result.stdout.split()

    assert probe("taskset", "-c", "0") == ["1", "1", "auto"]  # one CPU allowed: one thread
    # torchrun's processes of one machine share its cores, whatever the accelerator: two
    # processes on two CPUs take one thread each
    assert probe("taskset", "-c", "0,1", LOCAL_WORLD_SIZE="2") == ["2", "1", "shared"]
    # a task of a multi-task SLURM step has its own --cpus-per-task
    assert probe("taskset", "-c", "0", SLURM_NTASKS="4", SLURM_PROCID="1",
                 SLURM_CPUS_PER_TASK="1") == ["1", "1", "shared"]  # fmt: skip

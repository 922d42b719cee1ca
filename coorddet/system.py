"""The machine: what a measurement ran on (hardware, library versions) and process settings."""

from __future__ import annotations

import ctypes
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """CPU, CPU count, torch threads, GPU (or None) and the Python, torch, torchvision and
    lightning versions."""
    import lightning
    import torch
    import torchvision

    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": lightning.__version__,
    }


def use_huge_pages() -> None:
    """Back large CPU tensors with transparent huge pages, unless the user said otherwise.

    Sets PyTorch's ``THP_MEM_ALLOC_ENABLE=1``, which PyTorch reads once: call this before the
    first large tensor is allocated (after ``import torch`` is fine). Without it every tensor
    of 2 MB or more (an inference batch's RoI features are 80 MB) comes from fresh 4 kB pages
    that the kernel faults in and zeroes one by one, which makes allocating and filling such
    tensors, and so batched inference, measurably slower (docs/speed.md).
    ``THP_MEM_ALLOC_ENABLE=0`` in the environment keeps PyTorch's default; child processes
    (DDP workers) inherit the setting.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
OPT_OUT = "COORDDET_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Have glibc's ``malloc`` keep the memory of freed tensors for the next ones, as a caching
    allocator does, instead of handing it back to the kernel; unless the user chose.

    By default glibc serves large blocks (over 32 MB always, smaller ones as its threshold
    adapts) with a fresh ``mmap`` and unmaps them on free, so each batch's large tensors
    (conv1's 34 MB output, 80 MB of RoI features at inference) start as new pages that the
    kernel faults in and zeroes again. Here: no ``mmap`` for blocks (``M_MMAP_MAX=0``) and
    no trimming of the heap (``M_TRIM_THRESHOLD``), so the process keeps its peak footprint
    and reuses it, at the price of not returning memory to the system until it exits.

    Linux with glibc only: does nothing (returns False) elsewhere, with
    ``COORDDET_KEEP_FREED_MEMORY=0``, or when the environment already tunes glibc's malloc
    (``MALLOC_MMAP_MAX_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or a
    ``glibc.malloc`` tunable in ``GLIBC_TUNABLES``). Returns whether it applied the setting.
    Child processes started later (DDP workers) run the same command-line tools, which call
    it again; forked DataLoader workers inherit it.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or any(name in os.environ for name in _MALLOC_ENV):
        return False
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") or sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def configure_memory() -> None:
    """The memory settings of coorddet's command-line tools and benchmarks: huge pages for
    large tensors (:func:`use_huge_pages`) and freed memory kept for reuse
    (:func:`keep_freed_memory`). Call it at start-up, before the first large tensor."""
    use_huge_pages()
    keep_freed_memory()


def configure_process() -> None:
    """What every coorddet command sets first, in its ``main``: memory
    (:func:`configure_memory`), then torch's threads from the cores that are free
    (:func:`configure_threads`, unless the user chose them)."""
    configure_memory()
    configure_threads()


# --- threads: a busy neighbour should cost its share of the cores, not many times that ------

USER_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
CHOSEN = "COORDDET_THREADS"  # set beside OMP_NUM_THREADS when coorddet chose the count
_DROP_AT = 0.3  # give up a thread once other processes keep this share of a core busy


CGROUP_ROOT = "/sys/fs/cgroup"


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on (``taskset``, a SLURM job's or a container's cpuset)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_quota(root: str | os.PathLike = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``1.5``: 150 ms of CPU time per 100 ms),
    or None when there is none: cgroup v2's ``cpu.max`` (under ``root``, from this process's
    own cgroup up to ``root``, the smallest), else cgroup v1's ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us``. ``root``: where the cgroup file system is mounted (a parameter so
    that a test can point it at files of its own)."""
    root = Path(root)
    quotas = []
    for folder in _own_cgroup_folders(root):
        try:
            limit, period = (folder / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if limit != "max":
            quotas.append(int(limit) / int(period))
    for folder in (root / "cpu", root / "cpu,cpuacct"):
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota > 0 and period > 0:
            quotas.append(quota / period)
    return min(quotas) if quotas else None


def _own_cgroup_folders(root: Path) -> list[Path]:
    """``root`` and, under it, the folders of this process's cgroup v2 path (``0::/a/b`` in
    ``/proc/self/cgroup``: ``root``, ``root/a``, ``root/a/b``); those that exist."""
    folders = [root]
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if line.startswith("0::/"):
            for part in Path(line[4:].strip()).parts:
                folders.append(folders[-1] / part)
    return [folder for folder in folders if folder.is_dir()]


def usable_cpus(cgroup_root: str | os.PathLike = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity (``os.sched_getaffinity``), capped by
    its cgroup's CPU quota rounded up (:func:`cgroup_cpu_quota`), and by
    ``SLURM_CPUS_PER_TASK`` in a SLURM task. Inside an 8-CPU SLURM job or container on a
    100-core machine: 8, where ``os.cpu_count()`` says 100."""
    cpus = len(affinity_cpus())
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota - 1e-9)))
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit() and int(per_task) > 0:
        cpus = min(cpus, int(per_task))
    return max(1, cpus)


def launcher_processes() -> int | None:
    """When a launcher started this process beside others of its run: how many of them share
    :func:`usable_cpus` (torchrun's ``LOCAL_WORLD_SIZE``; 1 for a task of a multi-task SLURM
    step, whose ``--cpus-per-task`` are its own). None when this process is the only one,
    or the first that Lightning's own launcher starts the others from (they share with
    :func:`share_threads` before they start)."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if local.isdigit() and int(local) > 0:
        return int(local)
    tasks = os.environ.get("SLURM_NTASKS", "")
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in os.environ:
        return 1
    return None


def cpu_jiffies(cpus: set[int] | None = None) -> tuple[int, int]:
    """``(busy, total)`` CPU time so far of ``cpus`` (default: the whole machine), in clock
    ticks (``/proc/stat``)."""
    lines = Path("/proc/stat").read_text().splitlines()
    if cpus is None:
        rows = [lines[0]]
    else:
        rows = [line for line in lines[1:] if line.startswith("cpu") and _cpu_index(line) in cpus]
    busy = total = 0
    for row in rows:
        fields = [int(v) for v in row.split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        row_total = sum(fields[:8])  # guest time is already counted in user time
        busy, total = busy + row_total - idle, total + row_total
    return busy, total


def _cpu_index(line: str) -> int:
    name = line.split(maxsplit=1)[0]
    return int(name[3:]) if name[3:].isdigit() else -1


def process_tree(pid: int | None = None) -> list[int]:
    """``pid`` (default: this process) and its live descendants (DataLoader workers, ...)."""
    tree, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # a process that ended meanwhile
    return tree


def own_jiffies(pid: int | None = None) -> int:
    """CPU time of process ``pid`` (default: this one) and its live descendants (DataLoader
    workers), in clock ticks."""
    total = 0
    for current in process_tree(pid):
        try:
            stat = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])  # utime + stime
        except (OSError, ValueError, IndexError):
            continue  # a worker that ended meanwhile
    return total


class CpuShare:
    """The cores other processes keep busy, measured between calls of :meth:`others`, on the
    CPUs this process may use (its affinity): another job's cores are not a neighbour's."""

    def __init__(self) -> None:
        self._cpus = affinity_cpus()
        if len(self._cpus) >= (os.cpu_count() or 1):
            self._cpus = None  # the whole machine: its summary line
        self._count = len(self._cpus) if self._cpus is not None else os.cpu_count() or 1
        # Under a CPU quota smaller than the CPUs watched, this process's share of their load.
        self._scale = min(1.0, usable_cpus() / self._count)
        self._mark = (*cpu_jiffies(self._cpus), own_jiffies())

    def others(self) -> float:
        """Cores busy with other processes since the last call (or since construction)."""
        busy, total, own = *cpu_jiffies(self._cpus), own_jiffies()
        d_busy, d_total, d_own = (
            now - then for now, then in zip((busy, total, own), self._mark, strict=True)
        )
        self._mark = (busy, total, own)
        if d_total <= 0:
            return 0.0
        return max(0.0, (d_busy - d_own) / d_total * self._count * self._scale)


def threads_for(others: float, cores: int | None = None) -> int:
    """torch threads for a machine whose other processes keep ``others`` cores busy: the cores
    left, a thread given up as soon as a neighbour takes ``_DROP_AT`` of a core."""
    cores = cores or usable_cpus()
    return max(1, min(cores, math.floor(cores - others + _DROP_AT)))


def user_chose_threads() -> bool:
    """Whether the user set the thread count themselves (``OMP_NUM_THREADS``, ...)."""
    return any(name in os.environ for name in USER_THREAD_ENV) and CHOSEN not in os.environ


def configure_threads(*, sample_seconds: float = 0.2) -> int | None:
    """Choose torch's thread count from the cores that are free now, unless the user chose.

    torch starts one OpenMP thread per core, and those threads wait for each other at the end of
    every parallel region. When another process holds a core, the thread that shares it runs in
    time slices and every region waits for it: a training step with a thread per core slows down
    many times over beside one busy process (docs/speed.md), while one thread fewer loses only
    what the neighbour took. So: measure for ``sample_seconds`` how many cores other processes
    keep busy, and set ``OMP_NUM_THREADS`` to :func:`threads_for` that, with
    ``COORDDET_THREADS`` beside it, so that child processes (DDP workers) inherit the choice and
    :func:`share_threads` and :class:`ThreadGovernor` know it was coorddet's. Call it before
    torch is imported (the command-line tools do, in their ``main``: :func:`configure_process`);
    with torch loaded it is applied with ``torch.set_num_threads``.

    Does nothing (returns None) when the user set ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``,
    or off Linux. Returns the thread count chosen (or inherited from a coorddet parent).
    """
    if user_chose_threads() or sys.platform != "linux":
        return None
    if CHOSEN in os.environ:  # a process started by a coorddet command: it chose already
        return int(os.environ["OMP_NUM_THREADS"])
    share = CpuShare()
    time.sleep(sample_seconds)
    threads = threads_for(share.others())
    processes = launcher_processes()
    if processes is None:
        _set_threads(threads)
        return threads
    threads = max(1, threads // processes)  # torchrun's or SLURM's processes of this machine
    _set_threads(threads, mark="shared")
    return threads


def share_threads(processes: int) -> int | None:
    """Divide coorddet's chosen threads among ``processes`` processes of one machine (DDP on
    CPUs or GPUs, started by Lightning), before they start; they inherit the count (and do
    not divide it again). Nothing when the user chose, or when a launcher (torchrun, SLURM)
    started the processes (:func:`configure_threads` shared them then)."""
    if user_chose_threads() or os.environ.get(CHOSEN) != "auto":
        return None
    threads = max(1, int(os.environ["OMP_NUM_THREADS"]) // max(1, processes))
    _set_threads(threads, mark="shared")
    return threads


def fix_threads(threads: int) -> None:
    """Use ``threads`` torch threads for the whole run, as ``OMP_NUM_THREADS=threads`` would
    (``train.py --threads``, ``coorddet.evaluate --threads``): the count is the user's, so no
    :class:`ThreadGovernor` changes it and DDP workers inherit it undivided. A run whose thread
    count never changes repeats its float rounding whatever else the machine does."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ.pop(CHOSEN, None)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def _set_threads(threads: int, mark: str = "auto") -> None:
    os.environ.update({"OMP_NUM_THREADS": str(threads), CHOSEN: mark})
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


class ThreadGovernor:
    """Re-checks, at most every ``every_seconds``, how many cores other processes keep busy,
    and sets torch's threads to :func:`threads_for` that: a neighbour that starts during a run
    takes a thread away, one that ends gives it back. Call :meth:`step` often (every training
    step); it reads ``/proc`` only when the interval has passed, so a step costs almost nothing.

    Inactive (``step`` does nothing) unless :func:`configure_threads` chose the threads in
    this process tree, so a user's ``OMP_NUM_THREADS`` or ``torch.set_num_threads`` stays.
    """

    def __init__(self, every_seconds: float = 2.0, *, active: bool | None = None) -> None:
        self.active = (
            (CHOSEN in os.environ and not user_chose_threads()) if active is None else active
        )
        self.every_seconds = every_seconds
        self.changes: list[tuple[float, int]] = []  # (time.monotonic(), threads) of each change
        self._share = CpuShare() if self.active else None
        self._last = time.monotonic()

    def step(self) -> None:
        now = time.monotonic()
        if self._share is None or now - self._last < self.every_seconds:
            return
        self._last = now
        import torch

        threads = threads_for(self._share.others())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.changes.append((now, threads))

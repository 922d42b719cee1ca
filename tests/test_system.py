"""coorddet.system: the process settings the command-line tools apply."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from coorddet.system import keep_freed_memory, use_huge_pages


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

def main(argv):
    block = bytearray(256 * 2**20)  # malloc'd and written (zero-filled), then freed
    del block
    pages = int(open("/proc/self/statm").read().split()[1])
    print(os.environ.get("THP_MEM_ALLOC_ENABLE"), pages * os.sysconf("SC_PAGE_SIZE") // 2**20)
    return 0

sys.exit(report_errors(main))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_command_line_tools_keep_freed_memory_and_use_huge_pages(tmp_path, keep):
    """What coorddet.cli.report_errors (train.py, coorddet.evaluate) sets, seen from the process: a freed
    256 MB block stays in the process for reuse, unless COORDDET_KEEP_FREED_MEMORY=0."""
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

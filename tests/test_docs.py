"""Docs that cannot drift: every command line shown in README.md and docs/*.md uses flags its
parser has, and names config files, scripts and make targets that exist; links and anchors
resolve; the README stays short; no page cites issue numbers.

Command lines are read from fenced code blocks (lines ending in ``\\`` joined) and from
inline code. A command is ``python train.py``, ``python -m coorddet.*`` / ``python -m
data_gen``, a console script (``coorddet-train``, ``coorddet-evaluate``,
``coorddet-generate``), ``python experiments/X.py`` / ``python benchmarks/X.py``, ``torchrun
... train.py`` or ``make TARGET``; inline code may also show one without ``python`` in front
(``coorddet.evaluate --group``). Flags are checked against what each command's ``--help``
prints (run once per command, in a subprocess: the command line is the contract); a study or
benchmark script's flags are first looked up among the string constants of its source and
the sibling modules it imports, and only a flag missing there costs a ``--help`` run.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HISTORY = ROOT / "CHANGELOG.md"
README_MAX_LINES = 200

NOT_SHELL = {"python", "py", "yaml", "yml", "json", "toml"}  # fenced blocks never read as shell
PYTHON = re.compile(r"(?:^|/)python(?:3(?:\.\d+)?)?$")
FLAG = re.compile(r"--[A-Za-z][\w-]*")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_]\w*=\S*")
MODULE = re.compile(r"(?:coorddet|data_gen)(?:\.\w+)*")
ISSUE_NUMBER = re.compile(r"\b[Ii]ssues?\s*#?\d+|(?<![\w&/])#\d+\b")
CONFIG = re.compile(r"\bconfigs/[\w.-]+\.ya?ml\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Shown:
    """One command line as a page shows it."""

    page: Path
    line: int
    text: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}: `{' '.join(self.text.split())}`"


# --- finding what the pages show ---------------------------------------------------------------


def shown_lines(page: Path, text: str | None = None) -> list[Shown]:
    """Candidate command lines of a Markdown page: each (joined) line of a fenced block that
    is not Python or data, and each inline code span outside fenced blocks."""
    lines = (page.read_text() if text is None else text).splitlines()
    shown: list[Shown] = []
    prose: list[str] = []  # fenced lines blanked, so offsets keep their line numbers
    fence: str | None = None
    pending, pending_line = "", 0
    for number, line in enumerate(lines, 1):
        marker = re.match(r"\s*(```|~~~)\s*([\w+-]*)", line)
        if marker:
            fence = marker.group(2).lower() if fence is None else None
            prose.append("")
            continue
        if fence is None:
            prose.append(line)
            continue
        prose.append("")
        if fence in NOT_SHELL:
            continue
        if not pending:
            pending_line = number
        pending += " " + line.strip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        shown.append(Shown(page, pending_line, pending.strip()))
        pending = ""
    joined = "\n".join(prose)
    for match in re.finditer(r"`((?:[^`\n]|\n(?!\s*\n))+)`", joined):
        line = joined.count("\n", 0, match.start()) + 1
        shown.append(Shown(page, line, match.group(1).replace("\n", " ")))
    return shown


def segments(text: str) -> list[list[str]]:
    """Shell words of ``text`` without its comment, cut at ``;``, ``&&``, ``|`` and
    parentheses (prose in a block, ``(make bench)``, cuts there too)."""
    text = re.sub(r"(?:^|\s)#.*$", "", text)
    try:
        lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:  # an apostrophe in prose: plain words will do
        words = text.split()
    parts: list[list[str]] = [[]]
    for word in words:
        if word and set(word) <= set("();<>|&"):
            parts.append([])
        else:
            parts[-1].append(word)
    return [part for part in parts if part]


@dataclass(frozen=True)
class Command:
    """A recognised command: its kind (``help``: flags from a ``--help`` run; ``script``: a
    study or benchmark script; ``make``), what it names, and the words after it."""

    kind: str
    name: str
    args: tuple[str, ...]


CONSOLE_SCRIPTS = {
    "coorddet-train": "train.py",
    "coorddet-evaluate": "-m coorddet.evaluate",
    "coorddet-generate": "-m data_gen",
    "coorddet-predict": "-m coorddet.predict",
    "coorddet-export": "-m coorddet.export",
}


def _script(path: str, args: list[str]) -> Command:
    path = path.removeprefix("./")
    if path == "train.py":
        return Command("help", "train.py", tuple(args))
    return Command("script", path, tuple(args))


def recognise(words: list[str]) -> Command | None:
    """The command a segment's words run, if it is one this test checks."""
    start = 0
    while start < len(words) and ENV_ASSIGNMENT.fullmatch(words[start]):
        start += 1
    words = words[start:]
    if not words:
        return None
    if words[0] == "make":
        return Command("make", "make", tuple(words[1:]))
    has_flags = any(FLAG.match(word) for word in words[1:])
    if words[0].endswith(".py") and has_flags:  # inline: `train.py --threads N`
        return _script(words[0], words[1:])
    if MODULE.fullmatch(words[0]) and has_flags:  # inline: `coorddet.evaluate --group`
        return Command("help", f"-m {words[0]}", tuple(words[1:]))
    for index, word in enumerate(words):
        rest = words[index + 1 :]
        if word in CONSOLE_SCRIPTS:
            return Command("help", CONSOLE_SCRIPTS[word], tuple(rest))
        if word == "torchrun":
            for offset, candidate in enumerate(rest):
                if candidate.endswith(".py"):
                    return _script(candidate, rest[offset + 1 :])
            return None
        if PYTHON.search(word) and rest:
            if rest[0] == "-m" and len(rest) > 1:
                if not MODULE.fullmatch(rest[1]):
                    return None  # python -m pytest, ...: not this project's command
                return Command("help", f"-m {rest[1]}", tuple(rest[2:]))
            if rest[0].endswith(".py"):
                return _script(rest[0], rest[1:])
            return None
    return None


# --- what the commands accept ------------------------------------------------------------------


@functools.cache
def help_run(command: str) -> tuple[int, str]:
    """``python COMMAND --help`` from the repository root: (exit code, output)."""
    result = subprocess.run(
        [sys.executable, *command.split(), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode, result.stdout + result.stderr


def help_flags(command: str) -> set[str] | None:
    """Every ``--flag`` that ``--help`` prints; ``None`` when it fails."""
    code, output = help_run(command)
    return set(FLAG.findall(output)) if code == 0 else None


@functools.cache
def source_flags(script: Path) -> frozenset[str]:
    """``--flag`` string constants in ``script`` and the sibling modules it imports (a study
    script's shared options live in ``experiments/study.py``)."""
    files = [script]
    for node in ast.walk(ast.parse(script.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            sibling = script.parent / f"{name.split('.')[0]}.py"
            if sibling.is_file() and sibling not in files:
                files.append(sibling)
    flags = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if FLAG.fullmatch(node.value):
                    flags.add(node.value)
    return frozenset(flags)


@functools.cache
def make_targets() -> frozenset[str]:
    text = (ROOT / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))


def problems(shown: Shown) -> list[str]:
    """What is wrong with one shown line: unknown flags, missing scripts or make targets."""
    found = []
    for words in segments(shown.text):
        command = recognise(words)
        if command is None:
            continue
        if command.kind == "make":
            for target in command.args:
                if not target.startswith("-") and "=" not in target:
                    if target not in make_targets():
                        found.append(f"{shown.where()}: no make target {target!r} in Makefile")
            continue
        flags = [FLAG.match(word).group() for word in command.args if FLAG.match(word)]
        if command.kind == "script":
            script = ROOT / command.name
            if not script.is_file():
                found.append(f"{shown.where()}: no script {command.name}")
                continue
            known: set[str] | None = set(source_flags(script))
            if set(flags) - known:  # not among the constants: ask the script itself
                known = help_flags(command.name)
        else:
            known = help_flags(command.name)
        if known is None:
            _, output = help_run(command.name)
            tail = " ".join(output.strip().splitlines()[-1:])
            found.append(f"{shown.where()}: `python {command.name} --help` fails: {tail}")
            continue
        for flag in dict.fromkeys(flags):
            if flag not in known and flag != "--help":
                found.append(
                    f"{shown.where()}: unknown flag {flag} (not in `python {command.name} --help`)"
                )
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M)}


# --- the tests ---------------------------------------------------------------------------------


def _id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_the_docs_pages_exist():
    names = {page.name for page in PAGES if page.parent.name == "docs"}
    expected = {"README.md", "data.md", "training.md", "evaluation.md", "coordconv.md"}
    expected |= {"results.md", "speed.md", "cluster.md"}
    assert expected <= names, f"missing docs/ pages: {sorted(expected - names)}"
    assert HISTORY.is_file()


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_shown_commands_use_known_flags_and_existing_files(page):
    found = [problem for shown in shown_lines(page) for problem in problems(shown)]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_named_config_files_exist(page):
    text = page.read_text()
    missing = sorted({name for name in CONFIG.findall(text) if not (ROOT / name).is_file()})
    assert not missing, f"{_id(page)} names config files that do not exist: {missing}"


@pytest.mark.parametrize("page", [*PAGES, HISTORY], ids=_id)
def test_links_and_anchors_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, f"{_id(page)}: broken links {broken}"


@pytest.mark.parametrize("page", [*PAGES, HISTORY], ids=_id)
def test_no_issue_numbers(page):
    hits = [
        f"{_id(page)}:{number}: {line.strip()}"
        for number, line in enumerate(page.read_text().splitlines(), 1)
        if ISSUE_NUMBER.search(line)
    ]
    assert not hits, "name the capability, not the issue:\n" + "\n".join(hits)


def test_console_scripts_shown_are_installed():
    installed = {entry.name for entry in importlib.metadata.entry_points(group="console_scripts")}
    assert set(CONSOLE_SCRIPTS) <= installed


BAD_PAGE = """\
Run `python train.py --config configs/demo.yaml --no-such-flag` or

```bash
python -m coorddet.evaluate --data data/demo \\
    --bogus-option runs/x.ckpt   # a comment --not-a-flag
make no-such-target
python experiments/no_such_script.py --quick
python benchmarks/lazy_memory.py --images 10 --imaginary
```
"""


def test_the_checker_catches_wrong_flags_targets_and_scripts():
    page = ROOT / "docs" / "example.md"  # only named, never written
    found = "\n".join(p for shown in shown_lines(page, BAD_PAGE) for p in problems(shown))
    assert "docs/example.md:1: `python train.py" in found
    assert "unknown flag --no-such-flag" in found
    assert "docs/example.md:4:" in found and "unknown flag --bogus-option" in found
    assert "unknown flag --not-a-flag" not in found and "unknown flag --data" not in found
    assert "no make target 'no-such-target'" in found
    assert "no script experiments/no_such_script.py" in found
    assert "unknown flag --imaginary" in found and "unknown flag --images" not in found

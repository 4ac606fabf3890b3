"""Reads requirements.lock, the one lock file every petit install comes from.

The lock is written by ``scripts/lock`` (uv pip compile, universal, with hashes). This module
never resolves a version: it only selects lock entries. Each entry's ``# via`` annotation names
the packages that need it, so the entries ``petit[EXTRAS]`` needs are the closure of its direct
requirements over those annotations. Environment markers stay on the selected lines for pip to
judge on the Python that installs them (the container's may differ from this one's).

    python3 scripts/locked.py select [EXTRAS]   lock lines for petit[EXTRAS] ("all": every line)
    python3 scripts/locked.py strays PYTHON     installed distributions the lock does not name
    python3 scripts/locked.py wheelhouse EXTRAS DIR PYTHON
        the wheels petit[EXTRAS] needs on any Python, petit's own wheel, and
        DIR/requirements.txt, the hashed pins to install them with

Runs on the system Python (3.11+, standard library only), before any venv exists.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT_VIA = "petit (pyproject.toml)"
# Installed but never locked: the installer itself and petit (installed editable from source).
UNLOCKED = frozenset({"pip", "petit"})

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")


def canonical(name: str) -> str:
    """PEP 503 normalised name: ``Trio_WebSocket`` and ``trio-websocket`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement.strip())
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return canonical(match.group(0))


@dataclass
class Entry:
    """One pinned package: its ``name==version ; markers`` line, hashes and who needs it."""

    name: str
    version: str
    marker: str
    lines: list[str]
    needed_by: set[str] = field(default_factory=set)

    def text(self, *, with_marker: bool = True) -> str:
        if with_marker:
            return "\n".join(self.lines)
        return "\n".join([f"{self.name}=={self.version} \\", *self.lines[1:]])


def read_lock(path: Path = LOCK) -> list[Entry]:
    """Parses the lock; a malformed line is an error naming it, never a silent skip.

    A name may have several entries, with markers that split the Pythons between them.
    """
    entries: list[Entry] = []
    current: Entry | None = None
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith(" "):
            pin, _, marker = line.rstrip("\\").strip().partition(";")
            name, sep, version = pin.strip().partition("==")
            if not sep:
                raise ValueError(f"{path.name}:{number}: not an exact pin: {line}")
            current = Entry(canonical(name), version.strip(), marker.strip(), [line])
            entries.append(current)
        elif current is None:
            raise ValueError(f"{path.name}:{number}: continuation before any pin")
        elif line.strip().startswith("--hash="):
            current.lines.append(line.rstrip(" \\") + " \\")
        elif line.strip().startswith("# via"):
            current.needed_by.update(
                PROJECT_VIA if via.strip() == PROJECT_VIA else canonical(via.strip())
                for via in line.strip().removeprefix("# via").split(",")
            )
        else:
            raise ValueError(f"{path.name}:{number}: unexpected line: {line}")
    for entry in entries:
        entry.lines[-1] = entry.lines[-1].rstrip(" \\")
        if len(entry.lines) < 2:
            raise ValueError(f"{path.name}: {entry.name} has no --hash")
    return entries


def project_requirements(extras: list[str] | None = None) -> list[str]:
    """petit's requirements from pyproject.toml with the build backend's; ``None``: every extra.

    The build backend is always in: petit itself is installed without build isolation, so that
    nothing unpinned is fetched to build it.
    """
    pyproject = tomllib.loads(PYPROJECT.read_text())
    project = pyproject["project"]
    requirements = list(project["dependencies"])
    optional: dict[str, list[str]] = project["optional-dependencies"]
    for extra in optional if extras is None else extras:
        if extra not in optional:
            raise ValueError(
                f"pyproject.toml has no extra {extra!r} (it has {', '.join(optional)})"
            )
        requirements += optional[extra]
    build: list[str] = pyproject["build-system"]["requires"]
    return requirements + build


def select(entries: list[Entry], extras: list[str]) -> list[Entry]:
    """The entries ``petit[extras]`` needs: its direct requirements, then whatever they need."""
    chosen = {requirement_name(r) for r in project_requirements(extras)}
    missing = chosen - {entry.name for entry in entries}
    if missing:
        raise ValueError(f"requirements.lock lacks {', '.join(sorted(missing))}: run scripts/lock")
    grew = True
    while grew:
        grew = False
        for entry in entries:
            if entry.name not in chosen and entry.needed_by & chosen:
                chosen.add(entry.name)
                grew = True
    return [entry for entry in entries if entry.name in chosen]


def fill_wheelhouse(entries: list[Entry], extras: list[str], into: Path, python: str) -> None:
    """Downloads (hash-checked) every wheel petit[extras] may need, whatever the Python.

    Markers are dropped for the download, since the Python that installs (a container's) may
    not be this one; they stay in ``requirements.txt``, which pip judges where it installs.
    Entries sharing a name (a marker split) go in separate pip calls, as pip refuses doubles.
    """
    chosen = select(entries, extras)
    into.mkdir(parents=True, exist_ok=True)
    (into / "requirements.txt").write_text("\n".join(entry.text() for entry in chosen) + "\n")
    rounds: list[list[Entry]] = []
    for entry in chosen:
        free = next((r for r in rounds if all(e.name != entry.name for e in r)), None)
        if free is None:
            rounds.append(free := [])
        free.append(entry)
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    for number, batch in enumerate(rounds):
        listing = into / f".download-{number}.txt"
        listing.write_text("\n".join(entry.text(with_marker=False) for entry in batch) + "\n")
        download = ["download", "-q", "--no-deps", "--require-hashes", "-d", str(into)]
        subprocess.run([*pip, *download, "-r", str(listing)], check=True)
        listing.unlink()
    # setuptools copies the packages into build/lib and never deletes a module that moved or
    # went away since the last build: it would ship in the wheel, stale.
    shutil.rmtree(ROOT / "build", ignore_errors=True)
    subprocess.run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(into), str(ROOT)],
        check=True,
    )


def installed(python: str) -> dict[str, str]:
    """Distributions installed for ``python``: canonical name → version."""
    listing = subprocess.run(
        [python, "-c", _LIST_INSTALLED], check=True, capture_output=True, text=True
    ).stdout
    return {canonical(name): version for name, version in json.loads(listing).items()}


_LIST_INSTALLED = (
    "import importlib.metadata as m, json;"
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
)


def main(argv: list[str]) -> int:
    command, *rest = argv or ["help"]
    entries = read_lock()
    if command == "select":
        wanted = rest[0] if rest else ""
        if wanted == "all":
            print(LOCK.read_text(), end="")
            return 0
        extras = [extra for extra in wanted.split(",") if extra]
        print("\n".join(entry.text() for entry in select(entries, extras)))
        return 0
    if command == "strays" and len(rest) == 1:
        names = sorted(installed(rest[0]).keys() - {entry.name for entry in entries} - UNLOCKED)
        print("\n".join(names))
        return 0
    if command == "wheelhouse" and len(rest) == 3:
        fill_wheelhouse(entries, [e for e in rest[0].split(",") if e], Path(rest[1]), rest[2])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""requirements.lock agrees with pyproject.toml, is closed, and is what this venv holds.

The lock is read with ``scripts/locked.py``, the same reader that bootstrap and the container
wheelhouse use, so these tests also hold that reader to the lock's real shape.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement

from scripts import locked

# Pythons the lock promises (3.11 and up, Linux); 3.11.2 is the container's stand-in base.
PYTHONS = ["3.11.2", "3.11.9", "3.12.8", "3.13.1", "3.14.0"]


def _linux(python: str) -> dict[str, str]:
    return {
        **{key: str(value) for key, value in default_environment().items()},
        "python_full_version": python,
        "python_version": ".".join(python.split(".")[:2]),
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
    }


def _applies(marker: str, env: dict[str, str]) -> bool:
    return not marker or Marker(marker).evaluate(env)


def _pins_for(env: dict[str, str]) -> dict[str, str]:
    """The lock as one environment sees it: name → version; at most one pin per name."""
    pins: dict[str, str] = {}
    for entry in locked.read_lock():
        if _applies(entry.marker, env):
            python = env["python_full_version"]
            assert entry.name not in pins, f"two pins of {entry.name} apply to {python}"
            pins[entry.name] = entry.version
    return pins


@pytest.mark.parametrize("python", PYTHONS)
def test_every_pyproject_requirement_is_pinned_within_its_range(python: str) -> None:
    env = _linux(python)
    pins = _pins_for(env)
    for text in locked.project_requirements():
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        name = locked.canonical(requirement.name)
        assert name in pins, f"{text!r} is not in requirements.lock: run scripts/lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {name}=={pins[name]}, outside pyproject's {text!r}: "
            "run scripts/lock"
        )


def test_the_lock_pins_nothing_pyproject_no_longer_asks_for() -> None:
    wanted = {locked.requirement_name(text) for text in locked.project_requirements()}
    names = {entry.name for entry in locked.read_lock()}
    for entry in locked.read_lock():
        if locked.PROJECT_VIA in entry.needed_by:
            assert entry.name in wanted, f"{entry.name} is locked for petit but not in pyproject"
        elif entry.name not in wanted:
            assert entry.needed_by, f"{entry.name} is locked but nothing needs it"
            assert entry.needed_by <= names, f"{entry.name} is needed by unlocked {entry.needed_by}"


def test_every_entry_is_an_exact_pin_with_hashes() -> None:
    for entry in locked.read_lock():
        assert entry.version, entry.name
        hashes = [line.strip() for line in entry.lines[1:]]
        assert all(line.startswith("--hash=sha256:") for line in hashes), entry.name


def test_this_venv_is_exactly_the_lock() -> None:
    """What bootstrap installed is the lock: `pip freeze` equals it, minus hashes."""
    if sys.prefix == sys.base_prefix:
        pytest.skip("not in a venv: scripts/bootstrap all makes .venv from the lock")
    here = _linux(".".join(map(str, sys.version_info[:3])))
    expected = _pins_for(here)
    got = {
        locked.canonical(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
    }
    for name in locked.UNLOCKED:
        got.pop(name, None)
    moved = sorted(name for name in got.keys() & expected.keys() if got[name] != expected[name])
    assert got == expected, (
        f"not in the lock: {sorted(got.keys() - expected.keys())}; "
        f"missing: {sorted(expected.keys() - got.keys())}; other versions: {moved}"
        " — run scripts/bootstrap all"
    )


@pytest.mark.parametrize("extras", [[], ["redis"], ["deploy"]])
def test_a_selection_is_closed_over_what_its_packages_require(extras: list[str]) -> None:
    """bootstrap, the demo and the container install a selection: nothing it needs is left out."""
    here = _linux(".".join(map(str, sys.version_info[:3])))
    chosen = {entry.name for entry in locked.select(locked.read_lock(), extras)}
    for name in chosen:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # pinned for another Python only
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({**here, "extra": ""}):
                needed = locked.canonical(requirement.name)
                assert needed in chosen, f"{name} needs {needed}, left out of petit{extras}"


def test_a_runtime_selection_leaves_out_the_tools() -> None:
    chosen = {entry.name for entry in locked.select(locked.read_lock(), ["redis"])}
    assert {"trio", "h11", "cryptography", "redis"} <= chosen
    assert not {"pytest", "selenium", "mypy", "ruff", "uv", "atheris"} & chosen


def test_a_malformed_lock_is_named_by_line(tmp_path: Path) -> None:
    bad = tmp_path / "requirements.lock"
    bad.write_text("trio>=0.25 \\\n    --hash=sha256:00\n")
    with pytest.raises(ValueError, match=r"requirements.lock:1: not an exact pin"):
        locked.read_lock(bad)

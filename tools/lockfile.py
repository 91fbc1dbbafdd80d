"""The pinned versions `make install`/`make test`/CI install with: ``requirements/lock.txt``, written and checked here.

``pyproject.toml`` keeps ranges (users need them); the lock file pins one exact version of every package those
ranges pull in, torch included, so that a new upstream release cannot change what CI tests. It is a plain sorted
list of ``name==version`` lines (names normalised as pip compares them: lowercase, ``-`` for ``_``/``.``), after a
header of ``#`` comments, used as a pip constraints file: ``pip install -c requirements/lock.txt -e ".[dev]"``.
Lines can be added by hand (keep the order); ``make lock`` rewrites the whole file from a fresh virtual
environment holding the newest releases the ranges allow.

    python tools/lockfile.py write requirements/lock.txt < <(pip freeze --exclude-editable)
    python tools/lockfile.py check requirements/lock.txt pyproject.toml
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable
from pathlib import Path

HEADER = """\
# Exact versions `make install`, `make test` and CI install (pip constraints: -c requirements/lock.txt).
# Ranges live in pyproject.toml. Refresh every pin: `make lock`; add a dependency: add its range to pyproject.toml
# and one `name==version` line here, in order (tools/lockfile.py checks both; see the README's Tests section).
"""
PIN = re.compile(r"^(?P<name>[a-z0-9]([a-z0-9-]*[a-z0-9])?)==(?P<version>[A-Za-z0-9.!+_-]+)$")


def normalise(name: str) -> str:
    """A distribution name as pip compares it (PEP 503): lowercase, runs of ``-_.`` become one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_from_freeze(lines: Iterable[str]) -> dict[str, str]:
    """``name -> version`` from ``pip freeze`` output. Editable and direct-URL installs (the project itself) are
    left out; a local version label (``2.13.0+cpu``) is dropped, since ``==2.13.0`` admits every build of it
    (CPU or CUDA) and the build is chosen by where torch is installed from (``TORCH_INDEX``)."""
    pins: dict[str, str] = {}
    for raw in lines:
        line = raw.strip()
        if not line or line.startswith(("#", "-")) or " @ " in line or "==" not in line:
            continue
        name, version = line.split("==", 1)
        pins[normalise(name)] = version.split("+", 1)[0]
    return pins


def render(pins: dict[str, str]) -> str:
    """The lock file's text: the header, then one sorted ``name==version`` line per package."""
    return HEADER + "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))


def read(text: str) -> tuple[dict[str, str], list[str]]:
    """(pins, problems) of a lock file's text: every non-comment line must be ``name==version`` in sorted order."""
    pins: dict[str, str] = {}
    problems: list[str] = []
    names: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        if match is None:
            problems.append(f"line {number}: {line!r} is not `name==version` (lowercase name, exact version)")
            continue
        name = match["name"]
        if name != normalise(name):
            problems.append(f"line {number}: write {name!r} as {normalise(name)!r}")
        if name in pins:
            problems.append(f"line {number}: {name} is pinned twice")
        pins[name] = match["version"]
        names.append(name)
    if names != sorted(names):
        first = next(a for a, b in zip(names, sorted(names)) if a != b)
        problems.append(f"the lines are not sorted by name (first out of place: {first}); keep them in order")
    return pins, problems


def project_requirements(pyproject: Path) -> list[str]:
    """Every requirement string of the project: runtime dependencies and all optional extras."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: pytest depends on tomli there
        import tomli as tomllib  # type: ignore[no-redef]
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [*project.get("dependencies", []), *(r for reqs in extras.values() for r in reqs)]


def check(lock: Path, pyproject: Path) -> list[str]:
    """Problems of ``lock`` against ``pyproject``: its format, and a pin inside the range of every requirement."""
    from packaging.requirements import Requirement

    pins, problems = read(lock.read_text())
    for text in project_requirements(pyproject):
        req = Requirement(text)
        name = normalise(req.name)
        if name not in pins:
            problems.append(f"{req.name} ({text!r} in pyproject.toml) has no pin; add `{name}==<version>` to {lock}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{name}=={pins[name]} is outside pyproject.toml's range {text!r}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "write":
        Path(argv[1]).write_text(render(pins_from_freeze(sys.stdin)))
        return 0
    if len(argv) == 3 and argv[0] == "check":
        problems = check(Path(argv[1]), Path(argv[2]))
        for problem in problems:
            print(f"{argv[1]}: {problem}", file=sys.stderr)
        return 1 if problems else 0
    print("usage: lockfile.py write LOCK < freeze.txt | lockfile.py check LOCK PYPROJECT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`make test-compat` installs every dependency the project declares, at the compat stack's versions."""

import re
from importlib.metadata import requires
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements"


def name(requirement: str) -> str:
    """A requirement's distribution name, normalised (PEP 503); extras, versions and markers dropped."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group()).lower()


def test_compat_requirements_cover_the_project_dependencies():
    # The installed project's metadata: pyproject.toml's dependencies, `make` reinstalls when it changes.
    declared = {name(r) for r in requires("modernbert-train") if "extra ==" not in r or '"dev"' in r}
    compat = set()
    for file in ("compat.txt", "compat-no-deps.txt"):
        lines = (line.split("#")[0].strip() for line in (REQUIREMENTS / file).read_text().splitlines())
        compat |= {name(line) for line in lines if line}
    # ruff only lints, in the pinned venv.
    assert declared - compat == {"ruff"}

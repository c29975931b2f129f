"""The install surfaces agree: the `hf` extra and requirements/hf.txt pin the same versions, and
the base install never pulls torch (a GGUF-only install must not import it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line!r}"
            out[name.lower()] = version
    return out


def test_hf_extra_matches_requirements_file() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extra = _pins(project["optional-dependencies"]["hf"])
    required = _pins((REPO / "requirements/hf.txt").read_text().splitlines())
    assert extra == required
    assert extra["torch"] == "2.13.0"  # the local CPU build; a newer one pulls CUDA wheels


def test_base_install_has_no_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip().lower()
             for d in project["dependencies"]]
    assert "torch" not in names and "transformers" not in names

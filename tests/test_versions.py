"""Dependency pins: nnsight within 0.8.x from 0.8.1, transformers within the range the tests
pass on, and the installed versions inside both (the suite runs on what the pins allow)."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement


def pins() -> dict[str, Requirement]:
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_nnsight_allows_patch_releases_of_0_8_from_0_8_1():
    spec = pins()["nnsight"].specifier
    assert [v in spec for v in ("0.8.0", "0.8.1", "0.8.2", "0.9.0")] == [False, True, True, False]


def test_transformers_is_pinned_to_the_tested_releases():
    """The range's ends are the releases ``make test-ends`` runs the suite on."""
    spec = pins()["transformers"].specifier
    assert [v in spec for v in ("5.23.0", "5.24.0", "5.25.0", "5.25.9", "5.26.0")] == [False, True, True, True, False]


def test_the_installed_versions_are_inside_the_pins():
    for name in ("nnsight", "transformers"):
        assert version(name) in pins()[name].specifier, f"{name} {version(name)} is outside {pins()[name]}"

"""pytest fixtures for the chart tests; helpers live in chartlib.py."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from chartlib import VALUE_SETS, Rendered, render  # noqa: E402


@pytest.fixture(scope="session")
def rendered_sets() -> dict[str, Rendered]:
    return {name: render(values) for name, values in VALUE_SETS.items()}


@pytest.fixture(scope="session")
def default(rendered_sets: dict[str, Rendered]) -> Rendered:
    return rendered_sets["default"]

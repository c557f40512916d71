"""tools/plot_run.py imported as a module (tools/ is not a package)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="session")
def plot_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("forge_plot_run", REPO / "tools/plot_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

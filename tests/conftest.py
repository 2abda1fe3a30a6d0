"""Fixtures shared by the whole suite.

``tests.support`` (torch, the app, the model) is imported only when a fixture of it is
used: the batching tests run without the model side, as ``batching/`` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.support import Reference, RunningApp


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected what will not run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A run of tests that need the real photos stops before any test runs when they are
    missing, with one line, rather than failing each of those tests with it."""
    if any("photos" in getattr(item, "fixturenames", ()) for item in items):
        from tests.support import photo_paths

        try:
            photo_paths()
        except AssertionError as missing:
            pytest.exit(str(missing).partition("\n")[0], returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session")
def reference() -> Reference:
    from tests.support import Reference

    return Reference()


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    from tests.support import photo_paths

    return photo_paths()


@pytest.fixture
async def served() -> AsyncIterator[RunningApp]:
    """The app with default test settings (random weights), lifespan running."""
    from tests.support import make_settings, running_app

    async with running_app(make_settings()) as running:
        yield running

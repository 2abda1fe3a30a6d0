"""Fixtures shared by the whole suite."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import Reference, RunningApp, make_settings, photo_paths, running_app


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference()


@pytest.fixture(scope="session")
def photos() -> list[Path]:
    return photo_paths()


@pytest.fixture
async def served() -> AsyncIterator[RunningApp]:
    """The app with default test settings (random weights), lifespan running."""
    async with running_app(make_settings()) as running:
        yield running

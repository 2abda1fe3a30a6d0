"""``classification`` knows nothing of asyncio, HTTP or the service: plain functions and a
model class, which another model package replaces without touching ``batching``."""

from __future__ import annotations

from pathlib import Path

from tests.batching.test_isolation import imported_modules

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = PROJECT_ROOT / "classification"

FORBIDDEN = frozenset(
    {
        "asyncio",
        "anyio",
        "concurrent",
        "fastapi",
        "starlette",
        "uvicorn",
        "gunicorn",
        "http",
        "urllib",
        "socketserver",
        "h11",
        "httpcore",
        "httpx",
        "aiohttp",
        "requests",
        "multipart",
        "prometheus_client",
        "batching",
        "service",
        "main",
    }
)


def test_classification_imports_no_event_loop_http_or_service_module() -> None:
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "model.py" in sources

    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module.partition(".")[0] in FORBIDDEN
    ]
    assert not offenders, "\n".join(offenders)

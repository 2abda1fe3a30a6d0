"""``batching`` depends on the standard library only: no model, web or metrics package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = PROJECT_ROOT / "batching"

BLOCKED = (
    "torch",
    "torchvision",
    "fastapi",
    "starlette",
    "numpy",
    "PIL",
    "pydantic",
    "prometheus_client",
)

# The start of a script run in a fresh interpreter: argv[1] is the project root, the rest
# are the packages it cannot import.
BLOCKER = """
import importlib.abc
import sys

root, blocked = sys.argv[1], frozenset(sys.argv[2:])


class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ImportError(f"{name} is blocked")
        return None
"""

BLOCKED_IMPORT_SCRIPT = (
    BLOCKER
    + """
import asyncio


already = sorted(name for name in sys.modules if name.partition(".")[0] in blocked)
assert not already, f"imported before the check began: {already}"
sys.meta_path.insert(0, Block())
sys.path.insert(0, root)

try:
    import numpy  # installed in this environment, so this proves the block works
except ImportError:
    pass
else:
    raise AssertionError("the import blocker let numpy through")

import batching


async def main():
    async def handler(items):
        return [item * 2 for item in items]

    processor = batching.BatchProcessor(handler, batching.BatchConfig(max_batch_size=4))
    processor.start()
    outputs = await asyncio.gather(*(processor.submit(item) for item in range(10)))
    await processor.stop(drain_timeout_s=1.0)
    assert outputs == [item * 2 for item in range(10)], outputs


asyncio.run(main())
leaked = sorted(name for name in sys.modules if name.partition(".")[0] in blocked)
assert not leaked, f"imported despite the block: {leaked}"
print("batching ran with", ", ".join(sorted(blocked)), "blocked")
"""
)


def test_batching_runs_with_third_party_packages_blocked() -> None:
    """``import batching`` and a small batch succeed when torch, FastAPI and the rest are
    unimportable.
    """
    completed = subprocess.run(
        [sys.executable, "-I", "-c", BLOCKED_IMPORT_SCRIPT, str(PROJECT_ROOT), *BLOCKED],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "batching ran with" in completed.stdout


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every absolute module name that ``path`` imports, with its line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    modules: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            modules.append((node.lineno, node.module))
        # Relative imports (level > 0) stay inside the package by construction.
    return modules


def test_batching_source_imports_only_the_standard_library() -> None:
    """Every import in ``batching/`` names a standard-library module or ``batching`` itself."""
    sources = sorted(PACKAGE_DIR.rglob("*.py"))
    assert PACKAGE_DIR / "processor.py" in sources

    offenders = [
        f"{path.relative_to(PROJECT_ROOT)}:{line} imports {module}"
        for path in sources
        for line, module in imported_modules(path)
        if module.partition(".")[0] not in sys.stdlib_module_names | {"batching"}
    ]
    assert not offenders, "\n".join(offenders)


# pytest's collection of this folder with the model side and the web stack unimportable.
BLOCKED_COLLECTION_SCRIPT = (
    BLOCKER
    + """
import pytest

sys.meta_path.insert(0, Block())
sys.exit(pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", f"{root}/tests/batching"]))
"""
)


def test_the_batching_tests_need_no_model_side() -> None:
    """Another model replaces ``classification/``; the tests of ``batching/`` still load, the
    suite's shared fixtures included, with neither it nor torch nor the app importable."""
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCKED_COLLECTION_SCRIPT,
            str(PROJECT_ROOT),
            *BLOCKED,
            "classification",
            "main",
            "service",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "test_processor.py::" in completed.stdout

"""Test helpers: the photos, an in-process torchvision reference, a running app and a
Python process of its own."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from PIL import Image
from torchvision.models import ResNet18_Weights, resnet18

from classification import Prediction
from main import Service, create_app
from service import core
from service.protocol import SIBLINGS_STATE
from service.settings import PROJECT_ROOT, Settings
from service.siblings import Siblings

IMAGES_DIR = Path(os.environ.get("TEST_IMAGES_DIR", PROJECT_ROOT.parent / "shared" / "images"))
SEED = 0


def photo_paths() -> list[Path]:
    """The real photos beside the checkout; the suite needs them, so their absence fails."""
    paths = sorted(IMAGES_DIR.glob("*.jpg"))
    distinct = {path.read_bytes() for path in paths}
    assert len(distinct) >= 3, (
        f"no test photos in {IMAGES_DIR} (at least three distinct *.jpg files are needed, "
        f"{len(distinct)} found); set TEST_IMAGES_DIR"
    )
    return paths


class Reference:
    """torchvision's own pipeline: PIL convert, the weights' transforms, a seeded ResNet18."""

    def __init__(self) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            self.network = resnet18(num_classes=1000).eval()
        self.transform = ResNet18_Weights.IMAGENET1K_V1.transforms()

    def input_for(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image.convert("RGB"))

    @torch.inference_mode()
    def top_k(self, image: Image.Image, k: int = 5) -> tuple[list[int], list[float]]:
        probabilities = self.network(self.input_for(image).unsqueeze(0)).softmax(dim=1)[0]
        scores, indices = probabilities.topk(k)
        return indices.tolist(), scores.tolist()


# Every in-process test's task store lives under this directory, removed as pytest exits.
_TASK_STORES = tempfile.TemporaryDirectory(prefix="resnet18-service-tests-")


def make_settings(**overrides: object) -> Settings:
    """Settings for in-process tests: random weights on the CPU (a test of CUDA asks for it),
    a fresh task store, small limits where a test needs them."""
    values: dict[str, object] = {
        "weights": "random",
        "device": "cpu",
        "seed": SEED,
        "torch_threads": 2,
        "data_dir": tempfile.mkdtemp(prefix="tasks-", dir=_TASK_STORES.name),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@dataclass
class RunningApp:
    """An app with its lifespan running, and an httpx client wired to it in-process."""

    app: FastAPI
    client: httpx.AsyncClient

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service


@asynccontextmanager
async def running_app(
    settings: Settings, *, siblings: Siblings | None = None
) -> AsyncIterator[RunningApp]:
    """Start the app's lifespan (model load, batcher) and talk to it through ASGITransport;
    as a gunicorn worker, if given the ``siblings`` it would have."""
    app = create_app(settings)
    setattr(app.state, SIBLINGS_STATE, siblings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield RunningApp(app, client)


FINISHED = {"succeeded", "failed", "cancelled"}


async def submit(client: httpx.AsyncClient, data: bytes, **fields: str) -> dict[str, str]:
    """Submit ``data`` as a task; its 202 answer."""
    files = {"file": ("image.jpg", data, "application/octet-stream")}
    response = await client.post("/tasks", files=files, data=fields)
    assert response.status_code == 202, response.text
    body: dict[str, str] = response.json()
    return body


async def finished(client: httpx.AsyncClient, task_id: str, timeout_s: float = 30) -> dict:
    """Poll the task's status until it has finished."""
    async with asyncio.timeout(timeout_s):
        while True:
            response = await client.get(f"/task-status/{task_id}")
            assert response.status_code == 200, response.text
            body: dict = response.json()
            if body["status"] in FINISHED:
                return body
            await asyncio.sleep(0.02)


def run_python(
    code: str,
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path = PROJECT_ROOT,
    timeout_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` with ``args`` in a new Python process (this environment's unless given
    ``env``), from the project's root unless given ``cwd``: its exit status and output."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def metric_value(text: str, sample: str) -> float:
    """The value of one exposition line, e.g. ``batch_size_count``; 0 if absent."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class GatedModel:
    """Wraps the real classify: records batch sizes and holds each call until released."""

    def __init__(self, served: RunningApp) -> None:
        classifier = served.service.classifier
        assert classifier is not None
        self._real = classifier.classify
        self.batch_sizes: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_next = False
        classifier.classify = self.classify  # type: ignore[method-assign]

    def classify(
        self, pixels: Sequence[np.ndarray], top_k: Sequence[int]
    ) -> list[list[Prediction]]:
        self.batch_sizes.append(len(pixels))
        self.entered.set()
        if not self.release.wait(timeout=30):
            raise RuntimeError("test never released the model")
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("injected failure in /secret/path/model.py")
        return self._real(pixels, top_k)


async def wait_for(condition: object, timeout_s: float = 10.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


class HeldDecode:
    """Holds every decode until ``release`` is set; ``started`` is set as one begins and
    ``calls`` counts them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0
        self._real = core.preprocess
        monkeypatch.setattr(core, "preprocess", self._preprocess)

    def _preprocess(self, data: bytes, *, max_pixels: int, reduced_jpeg: bool) -> np.ndarray:
        self.calls += 1
        self.started.set()
        self.release.wait(10)
        return self._real(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)

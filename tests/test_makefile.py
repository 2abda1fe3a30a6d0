"""The Makefile's set-up, up to where it would download: what a new user's first `make` does
with the wrong interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import PROJECT_ROOT

MAKEFILE = str(PROJECT_ROOT / "Makefile")
OLD_PYTHON = """#!/bin/sh
# Answers as a Python 3.10 would: its version check fails.
case "$*" in *version_info*) exit 1 ;; esac
echo "unexpected call: $*" >&2
exit 2
"""


def would_make(directory: Path, target: str) -> str:
    """What ``make target`` would run in ``directory`` (``make -n``)."""
    return subprocess.run(
        ["make", "-n", "-f", MAKEFILE, target],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout


def test_an_interpreter_older_than_3_11_is_refused_in_one_line_before_any_venv(
    tmp_path: Path,
) -> None:
    python = tmp_path / "python3.10"
    python.write_text(OLD_PYTHON)
    python.chmod(0o755)
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        (tmp_path / name).touch()
    made = subprocess.run(
        ["make", "-f", MAKEFILE, f"PYTHON={python}", ".venv/.installed-stamp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode != 0
    assert f"needs Python 3.11 or newer, which {python} is not" in made.stderr
    assert "unexpected call" not in made.stderr
    assert not (tmp_path / ".venv").exists()


def test_help_names_every_target_once_with_its_continuations_indented() -> None:
    shown = subprocess.run(
        ["make", "-s", "-f", MAKEFILE, "help"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    phony = next(
        line for line in Path(MAKEFILE).read_text().splitlines() if line.startswith(".PHONY:")
    )
    named = [line.split(":")[0] for line in shown if not line.startswith("  ")]
    assert sorted(named) == sorted(phony.split()[1:])


def test_a_venv_whose_interpreter_is_gone_is_made_anew(tmp_path: Path) -> None:
    """Its stamp newer than the requirements, a venv left by a Python since upgraded or
    removed would be taken as installed, and every target fail on its missing tools."""
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        (tmp_path / name).touch()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)

    def would_install() -> str:
        for stamp in (".runtime-stamp", ".installed-stamp"):
            (tmp_path / ".venv" / stamp).touch()
        return would_make(tmp_path, ".venv/.installed-stamp")

    (bin_dir / "python").symlink_to(sys.executable)
    assert "is up to date" in would_install()
    (bin_dir / "python").unlink()
    (bin_dir / "python").symlink_to("/nonexistent/python3.11")
    assert "-m venv .venv" in would_install()


def test_a_working_venv_is_installed_into_again_whatever_python_names(tmp_path: Path) -> None:
    """Once the venv is made (with PYTHON=python3.11, say), a change to the requirements
    reinstalls into it: the default python3, older, is not asked again."""
    old_python = tmp_path / "python3.10"
    old_python.write_text(OLD_PYTHON)
    old_python.chmod(0o755)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for stamp in (".runtime-stamp", ".installed-stamp"):
        (tmp_path / ".venv" / stamp).touch()
    venv_python = bin_dir / "python"
    venv_python.write_text(
        '#!/bin/sh\ncase "$*" in *version_info*) exit 0 ;; esac\necho "$*" >> calls.log\n'
    )
    venv_python.chmod(0o755)
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        (tmp_path / name).touch()  # newer than the stamp

    made = subprocess.run(
        ["make", "-f", MAKEFILE, f"PYTHON={old_python}", ".venv/.installed-stamp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    assert "unexpected call" not in made.stderr
    calls = (tmp_path / "calls.log").read_text()
    assert "-m pip install --quiet -r requirements.txt -c constraints.txt" in calls
    assert "-m pip install --quiet -r requirements-dev.txt -c constraints.txt" in calls
    assert "-m venv" not in made.stdout


def test_a_venv_without_pip_is_made_anew(tmp_path: Path) -> None:
    """venv fails in ensurepip where python3-venv is missing, leaving an interpreter without
    pip: once that is installed, the next make makes the venv again rather than fail on pip
    for good."""
    new_python = tmp_path / "python3.11"
    new_python.write_text(
        '#!/bin/sh\ncase "$*" in *version_info*) exit 0 ;; esac\necho "$*" >> made.log\n'
    )
    new_python.chmod(0o755)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    venv_python = bin_dir / "python"
    venv_python.write_text(
        '#!/bin/sh\ncase "$*" in *version_info*) exit 0 ;; *"pip --version"*) exit 1 ;; esac\n'
    )
    venv_python.chmod(0o755)
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        (tmp_path / name).touch()

    subprocess.run(
        ["make", "-f", MAKEFILE, f"PYTHON={new_python}", ".venv/.installed-stamp"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "-m venv .venv" in (tmp_path / "made.log").read_text()


def test_serving_installs_the_runtime_requirements_and_testing_adds_the_dev_ones(
    tmp_path: Path,
) -> None:
    """`make run` and `make dev` install what serving needs, not the test, lint, benchmark
    and deployment-check tools; `make test` installs those beside it."""
    for name in ("requirements.txt", "requirements-dev.txt", "constraints.txt"):
        (tmp_path / name).touch()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)

    for target in ("run", "dev"):
        commands = would_make(tmp_path, target)
        assert "-r requirements.txt -c constraints.txt" in commands
        assert "requirements-dev.txt" not in commands
    assert "-r requirements-dev.txt -c constraints.txt" in would_make(tmp_path, "test")
    (tmp_path / ".venv" / ".runtime-stamp").touch()
    assert "pip install" not in would_make(tmp_path, "run")
    commands = would_make(tmp_path, "test")
    assert "-r requirements.txt" not in commands
    assert "-r requirements-dev.txt -c constraints.txt" in commands


def test_a_run_without_the_photos_stops_as_it_collects_with_one_line(tmp_path: Path) -> None:
    """As the README says: not an error for each test that needs them. Tests that need none
    run."""

    def pytest_run(*arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *arguments],
            cwd=PROJECT_ROOT,
            env={**os.environ, "TEST_IMAGES_DIR": str(tmp_path)},
            capture_output=True,
            text=True,
            timeout=300,
        )

    needing = pytest_run("tests/classification/test_preprocess.py")
    assert needing.returncode == pytest.ExitCode.USAGE_ERROR, needing.stdout
    assert f"no test photos in {tmp_path}" in needing.stdout
    assert "set TEST_IMAGES_DIR" in needing.stdout
    assert "no tests ran" in needing.stdout
    not_needing = pytest_run("tests/test_makefile.py", "-k", "help_names")
    assert not_needing.returncode == 0, not_needing.stdout
    # Those -k leaves out do not count.
    selected = pytest_run("tests/classification/test_preprocess.py", "-k", "composited_on_white")
    assert selected.returncode == 0, selected.stdout

"""Thread counts follow the cores a container may really use, its CPU quota included."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import available_cores, cgroup_cpu_quota

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    root.mkdir(exist_ok=True)
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: str, period: str) -> Path:
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [("max 100000", None), ("200000 100000", 2.0), ("150000 100000", 1.5), ("50000 100000", 0.5)],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, quota: float | None) -> None:
    assert cgroup_cpu_quota(cgroup_v2(tmp_path, cpu_max)) == quota


def test_cgroup_v1_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(cgroup_v1(tmp_path, "300000", "100000")) == 3.0
    assert cgroup_cpu_quota(cgroup_v1(tmp_path / "unlimited", "-1", "100000")) is None


def test_no_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert available_cores(tmp_path) == AFFINITY


def test_a_quota_caps_the_cores_and_rounds_up(tmp_path: Path) -> None:
    assert available_cores(cgroup_v2(tmp_path, "50000 100000")) == 1  # half a CPU: one thread
    assert available_cores(cgroup_v2(tmp_path, "100000 100000")) == 1
    if AFFINITY >= 2:
        assert available_cores(cgroup_v2(tmp_path, "150000 100000")) == 2
    # A quota above the affinity mask does not add cores.
    assert available_cores(cgroup_v2(tmp_path, f"{(AFFINITY + 8) * 100000} 100000")) == AFFINITY

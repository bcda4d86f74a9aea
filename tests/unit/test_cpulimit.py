"""A CPU bandwidth limit read from cgroup files, and the bursts the probes size from it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from edgeorch.runtime.cpulimit import CpuLimit, cpu_limit
from edgeorch.runtime.probes import (
    BURST_PERIODS,
    MAX_BURST_S,
    REPEATS,
    _time_unit,
    load_probe,
    probe_interval_s,
    sustained_burst_s,
)


def _tree(root: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    (root / "proc_cgroup").write_text(proc)
    return root / "fs", root / "proc_cgroup"


@pytest.mark.parametrize(
    ("files", "proc", "expected"),
    [
        # cgroup v2, the group /proc/self/cgroup names (a systemd slice, a pod)
        ({"fs/pods/a/cpu.max": "50000 100000", "fs/cpu.max": "max 100000"}, "0::/pods/a\n", CpuLimit(0.05, 0.1)),
        ({"fs/cpu.max": "max 100000"}, "0::/\n", None),
        # v1 inside Docker: the container's group is mounted at the root, its path is not there
        ({"fs/cpu/cpu.cfs_quota_us": "1000", "fs/cpu/cpu.cfs_period_us": "2000"},
         "4:cpu,cpuacct:/docker/0123abcd\n1:name=systemd:/docker/0123abcd\n", CpuLimit(0.001, 0.002)),
        ({"fs/cpu/cpu.cfs_quota_us": "-1", "fs/cpu/cpu.cfs_period_us": "100000"}, "4:cpu,cpuacct:/\n", None),
        # v1 on a host: the process's own group below the root
        ({"fs/cpu/batch/cpu.cfs_quota_us": "150000", "fs/cpu/batch/cpu.cfs_period_us": "100000",
          "fs/cpu/cpu.cfs_quota_us": "-1", "fs/cpu/cpu.cfs_period_us": "100000"},
         "3:cpu:/batch\n", CpuLimit(0.15, 0.1)),
        ({}, "", None),  # no cgroup filesystem at all
    ],
)  # fmt: skip
def test_the_limit_of_the_process_group(tmp_path, files, proc, expected) -> None:
    root, proc_cgroup = _tree(tmp_path, files, proc)
    assert cpu_limit(root, proc_cgroup) == expected


def test_half_a_core() -> None:
    assert CpuLimit(0.001, 0.002).cores == 0.5


def test_bursts_span_periods_under_a_limit_only() -> None:
    assert sustained_burst_s(None) == 0.0
    assert sustained_burst_s(CpuLimit(0.001, 0.002)) == pytest.approx(BURST_PERIODS * 0.002)
    assert sustained_burst_s(CpuLimit(0.05, 0.1)) == MAX_BURST_S  # Kubernetes' 100 ms period: 5 periods


def test_long_probes_run_less_often(store) -> None:
    probe = load_probe("tiny-llama", store.path("tiny-llama"))
    assert probe_interval_s(0.25, [probe]) == 0.25  # this process has no limit: 2 ms probes, 4 a second
    probe.burst_s = 0.02
    assert probe_interval_s(0.25, [probe]) == pytest.approx(0.4)  # 20 ms bursts at most 5 % of the time


def test_a_timed_block_lasts_the_sustained_burst(store) -> None:
    probe = load_probe("tiny-llama", store.path("tiny-llama"))
    _, step_s = _time_unit(probe, 1, 1, True, lambda t0: time.perf_counter() - t0)
    probe.burst_s = max(0.05, 20 * step_s)
    t0 = time.perf_counter()
    held_s, computed_s = _time_unit(probe, 1, 1, True, lambda t0: time.perf_counter() - t0)
    took_s = time.perf_counter() - t0
    assert took_s >= probe.burst_s
    steps = round(took_s / computed_s)
    assert steps > REPEATS, (steps, took_s, computed_s)  # ran on past the three steps, per-step figures
    assert held_s == pytest.approx(computed_s, rel=0.2)

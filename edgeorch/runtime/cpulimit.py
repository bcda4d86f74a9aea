"""This process's CPU bandwidth limit, as its cgroup sets it (a container's ``cpus:``).

The kernel enforces such a limit as a quota of CPU time per period (CFS
bandwidth control): a process may run at full speed until it has used its
quota, then waits for the next period. A burst of compute shorter than the
quota never sees the limit, so a speed measurement shows it only when it runs
for several periods back to back. The probes (runtime/probes.py) read the
period here to size their bursts; the figure they report is still the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class CpuLimit:
    """A CFS bandwidth limit: ``quota_s`` of CPU time per ``period_s`` of wall time."""

    quota_s: float
    period_s: float

    @property
    def cores(self) -> float:
        """The limit in cores (0.5: half a core)."""
        return self.quota_s / self.period_s


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_groups(proc_cgroup: str | None) -> tuple[str, str]:
    """This process's group path on cgroup v2 and in v1's cpu hierarchy ("" when not listed)."""
    v2 = v1 = ""
    for line in (proc_cgroup or "").splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path.strip("/")
        elif "cpu" in controllers.split(","):
            v1 = path.strip("/")
    return v2, v1


def _parse(quota: str | None, period: str | None) -> CpuLimit | None:
    if quota is None or period is None or not quota.isdigit() or not period.isdigit():
        return None  # "max" (v2) or "-1" (v1): no quota
    return CpuLimit(int(quota) / 1e6, int(period) / 1e6)


def cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> CpuLimit | None:
    """The limit of this process's cgroup; None when there is none (or it cannot be read).

    On cgroup v2 the group's ``cpu.max`` ("max 100000" or "50000 100000",
    microseconds); on v1 its ``cpu.cfs_quota_us`` (-1: none) and
    ``cpu.cfs_period_us``. The group is the one /proc/self/cgroup names; inside
    a container whose cgroup filesystem shows only its own group at the root
    (Docker on v1, or a cgroup namespace), that path is not there and the root
    is the group.
    """
    v2_path, v1_path = _own_groups(_read(proc_cgroup))
    for group in dict.fromkeys((root / v2_path, root)):
        cpu_max = _read(group / "cpu.max")
        if cpu_max is not None:
            quota, _, period = cpu_max.partition(" ")
            return _parse(quota, period)
    for group in dict.fromkeys((root / "cpu" / v1_path, root / "cpu")):
        quota_v1, period_v1 = _read(group / "cpu.cfs_quota_us"), _read(group / "cpu.cfs_period_us")
        if quota_v1 is not None:
            return _parse(quota_v1, period_v1)
    return None

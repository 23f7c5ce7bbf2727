"""How many CPUs this process may use, and so how many threads the CPU forward runs on.

    available_cpus()       # the fewest of: os.cpu_count(), the affinity mask, the cgroup CPU quota
    default_threads()      # the forward's threads when the pipeline sets none
    passive_waits()        # before torch loads: OpenMP threads that sleep, on a busy or limited machine

A container limited with `--cpus 2` (cgroup v2 `cpu.max` "200000 100000", v1 `cpu.cfs_quota_us`)
still sees every core of the host in os.cpu_count(), and libgomp (torch's OpenMP) starts one
thread per core of the affinity mask. A forward on more threads than the quota gives runs them
by turns: its barriers wait for a thread that the quota has stopped, and a 6 ms step takes
tens of milliseconds. The quota is read along the process's cgroup up to the hierarchy's root
(a parent's limit holds for its children), rounded up as other runtimes do (Go, the JVM):
1.5 CPUs give 2 threads. `taskset -c 0` (the affinity mask) torch already follows.

libgomp's threads spin for milliseconds at each barrier and between parallel regions before they
sleep. On a quiet machine that is the fastest; when other processes hold the cores, a spinning
thread takes the time slice the thread it waits for needs, and under a CPU quota it spends the
quota: beside two `yes` hogs on 2 cores a 20-token prefill (torch's kernels) took 1.8-6.6 s on 2
threads against 0.26-0.36 s on one, and 0.26-0.28 s on 2 with OMP_WAIT_POLICY=PASSIVE. libgomp
reads the policy once, when torch loads it, so `agp run`, `serve` and `bench` choose it first:
PASSIVE when the machine is busy as they start (its load average at least its CPUs) or a CPU
quota allows fewer CPUs than the affinity mask; libgomp's default otherwise (measured a few per
cent faster on a quiet machine) and whenever OMP_WAIT_POLICY or GOMP_SPINCOUNT is set.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def cpus_text(n: int) -> str:
    """`n` CPUs in words: "1 CPU", "2 CPUs" (the summary, the banner, warnings)."""
    return f"{n} CPU" + ("s" if n != 1 else "")


def affinity_cpus() -> int:
    """The CPUs of this process's affinity mask (`taskset`, a cpuset), else os.cpu_count()."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_limit(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5: 150 ms a 100 ms period), the lowest
    along its path to the root; None without one (no cgroup, no limit, unreadable files)."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hid == "0" and controllers == "":                    # cgroup v2: "0::/path"
            limits += _along(root, path, _v2_limit)
        elif "cpu" in controllers.split(","):                    # cgroup v1: "4:cpu,cpuacct:/path"
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    limits += _along(mount, path, _v1_limit)
                    break
    return min(limits) if limits else None


def _along(mount: Path, path: str, read) -> list[float]:
    """The limits `read` finds in the cgroup at `path` under `mount` and in each parent up to the
    mount itself (inside a container the host's path may not exist: the mount is its cgroup)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    found = []
    for n in range(len(parts), -1, -1):
        limit = read(mount.joinpath(*parts[:n]))
        if limit is not None:
            found.append(limit)
    return found


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text().strip().partition(" ")
        if quota == "max":
            return None
        quota_us, period_us = int(quota), int(period or 100000)
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota_us = int((folder / "cpu.cfs_quota_us").read_text())
        period_us = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def available_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The CPUs this process may keep busy: its affinity mask's, at most its cgroup quota rounded up."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def default_threads(current: int, root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """The forward's threads when the pipeline sets none: torch's `current` count (libgomp's: the
    affinity mask's CPUs, or OMP_NUM_THREADS), lowered to the CPUs the cgroup quota allows.
    OMP_NUM_THREADS, when set, is the user's choice and kept."""
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return current
    return max(1, min(current, available_cpus(root, proc_cgroup)))


def busy_reason(load: float | None = None) -> str | None:
    """Why this process's OpenMP threads should sleep rather than spin while they wait: a CPU quota
    below the affinity mask's CPUs, or a machine whose load average (`load`, else the 1-minute one)
    is at least its CPUs; None when neither holds."""
    cpus, quota = affinity_cpus(), cgroup_cpu_limit()
    if quota is not None and quota < cpus:
        return f"a CPU quota of {quota:g} CPUs"
    try:
        load = os.getloadavg()[0] if load is None else load
    except OSError:
        return None
    host = os.cpu_count() or 1                  # the load average counts the whole machine's
    return f"load average {load:.1f} on {host} CPUs" if load >= host else None


def passive_waits(environ: dict | None = None, load: float | None = None) -> str | None:
    """Set OMP_WAIT_POLICY=PASSIVE in `environ` (os.environ) when busy_reason() gives a reason and
    the user chose no wait policy (module docstring); only before torch is imported (libgomp reads
    it once). Returns the reason it was set for, or None when it was not."""
    env = os.environ if environ is None else environ
    if "torch" in sys.modules or any(env.get(k, "").strip() for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")):
        return None
    why = busy_reason(load)
    if why is not None:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return why

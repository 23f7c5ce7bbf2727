"""How many threads the CPU forward gets (pipeline_dsl/engine/cpus.py): the process's affinity mask
(taskset, a cpuset) and its cgroup's CPU quota (a container's --cpus: cgroup v2 cpu.max, v1
cpu.cfs_quota_us), whichever allows fewer; read from a fake cgroup tree here."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline_dsl.commands.runner import format_summary
from pipeline_dsl.engine import Engine, EngineConfig
from pipeline_dsl.engine import cpus
from pipeline_dsl.engine.executor import cpu_overlap_pays


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def v2(tmp_path, limits: dict[str, str], path: str = "/kubepods/pod1/ctr"):
    """A cgroup v2 tree: cpu.max per folder (relative to the root), the process in `path`."""
    root = tmp_path / "cgroup"
    (root / path.strip("/")).mkdir(parents=True)
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "cpu.max").write_text(value + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def test_cgroup_v2_cpu_max_is_read_along_the_path_to_the_root(tmp_path):
    root, proc = v2(tmp_path, {"kubepods/pod1/ctr": "150000 100000", "kubepods": "max 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) == 1.5
    root, proc = v2(tmp_path / "b", {"kubepods/pod1/ctr": "max 100000", "kubepods/pod1": "50000 100000"})
    assert cpus.cgroup_cpu_limit(root, proc) == 0.5                 # a parent's limit holds for its children
    root, proc = v2(tmp_path / "c", {"kubepods/pod1/ctr": "max 100000", "": "max"})
    assert cpus.cgroup_cpu_limit(root, proc) is None
    root, proc = v2(tmp_path / "d", {"": "300000 100000"}, path="/")   # inside the container's namespace
    assert cpus.cgroup_cpu_limit(root, proc) == 3.0
    root, proc = v2(tmp_path / "e", {"kubepods/pod1/ctr": "garbage"})
    assert cpus.cgroup_cpu_limit(root, proc) is None
    assert cpus.cgroup_cpu_limit(tmp_path / "none", tmp_path / "no_proc_file") is None


def test_cgroup_v1_cfs_quota_is_read_and_a_host_path_missing_in_the_container_falls_back_to_its_mount(tmp_path):
    root = tmp_path / "cgroup"
    mount = root / "cpu,cpuacct"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text("200000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    assert cpus.cgroup_cpu_limit(root, proc) == 2.0
    (mount / "cpu.cfs_quota_us").write_text("-1\n")                 # no limit
    assert cpus.cgroup_cpu_limit(root, proc) is None


def test_available_cpus_is_the_affinity_at_most_the_quota_rounded_up(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    root, proc = v2(tmp_path, {"kubepods/pod1/ctr": "150000 100000"})
    assert cpus.available_cpus(root, proc) == 2
    root, proc = v2(tmp_path / "b", {"kubepods/pod1/ctr": "20000 100000"})
    assert cpus.available_cpus(root, proc) == 1
    root, proc = v2(tmp_path / "c", {"kubepods/pod1/ctr": "1600000 100000"})
    assert cpus.available_cpus(root, proc) == 8                     # the quota allows more than the mask
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})   # taskset -c 3
    assert cpus.available_cpus(root, proc) == 1


def test_default_threads_follow_the_quota_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    root, proc = v2(tmp_path, {"kubepods/pod1/ctr": "200000 100000"})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpus.default_threads(16, root, proc) == 2
    assert cpus.default_threads(1, root, proc) == 1                 # never raised
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert cpus.default_threads(6, root, proc) == 6                 # the user's choice


def contained(tmp_path, monkeypatch, quota: str):
    """This process as if in a container with 8 CPUs in its mask and the quota `quota`."""
    root, proc = v2(tmp_path, {"": quota}, path="/")
    monkeypatch.setattr(cpus, "CGROUP_ROOT", root)
    monkeypatch.setattr(cpus, "PROC_CGROUP", proc)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_an_engine_in_a_container_takes_the_quota_s_threads_and_says_so(tiny_gguf, tmp_path, monkeypatch):
    contained(tmp_path, monkeypatch, "100000 100000")
    torch.set_num_threads(2)                  # torch's default: the mask's CPUs (here 2 of the 8)
    eng = Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32", kv_budget_bytes=4 << 20, max_batch_size=4))
    assert eng.threads == 1 and torch.get_num_threads() == 1
    stats = eng.stats(latencies=False)
    assert stats["threads"] == 1 and stats["cpus"] == 1 and stats["one_thread_steps"] == 0
    assert not cpu_overlap_pays(1)                                  # no core to spare beside the forward


def test_threads_above_the_cpus_are_kept_with_a_warning(tiny_gguf, tmp_path, monkeypatch, caplog):
    contained(tmp_path, monkeypatch, "100000 100000")
    with caplog.at_level(logging.WARNING, logger="agp.engine"):
        eng = Engine(EngineConfig(model=str(tiny_gguf), dtype="fp32", kv_budget_bytes=4 << 20, max_batch_size=4,
                                  threads=2))
    assert eng.threads == 2 and torch.get_num_threads() == 2
    assert "threads = 2 is more than the 1 CPU this process may use" in caplog.text


def test_the_run_summary_names_the_threads():
    s = {"requests": 1, "errors": 0, "prompt_tokens": 1, "cached_tokens": 0, "completion_tokens": 1,
         "output_tokens_per_s": 1.0, "generation_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
         "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0, "mean_batch_size": 1.0, "kv_hit_rate": 0.0,
         "engines": {"gen": {"threads": 2, "cpus": 4}}}
    assert "threads         gen 2 (of the 4 CPUs this process may use)" in format_summary(s).splitlines()
    s["engines"] = {"gen": {"device": "cuda"}}                       # a GPU engine: no line
    assert not any(line.startswith("threads") for line in format_summary(s).splitlines())


PROBE = """
import json, os, sys
from pipeline_dsl.engine import cpus
if len(sys.argv) > 2:
    import torch  # noqa: F401  (libgomp already read its policy)
why = cpus.passive_waits(load=float(sys.argv[1]))
print(json.dumps([why, os.environ.get("OMP_WAIT_POLICY")]))
"""


def probe(load: float, *, env: dict | None = None, torch_first: bool = False) -> list:
    """passive_waits in a fresh process (before torch is imported, as the CLI calls it)."""
    e = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    e.update(env or {}, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", PROBE, str(load), *(["torch"] if torch_first else [])],
                         capture_output=True, text=True, env=e, check=True).stdout
    return json.loads(out)


def test_openmp_threads_sleep_while_they_wait_on_a_busy_machine_unless_the_user_chose():
    cpus_here = os.cpu_count()
    why, policy = probe(10.0 * cpus_here)
    assert policy == "PASSIVE" and why == f"load average {10.0 * cpus_here:.1f} on {cpus_here} CPUs"
    assert probe(10.0 * cpus_here, env={"OMP_WAIT_POLICY": "active"}) == [None, "active"]
    assert probe(10.0 * cpus_here, env={"GOMP_SPINCOUNT": "100000"}) == [None, None]
    assert probe(10.0 * cpus_here, torch_first=True) == [None, None]      # too late: libgomp has read it


def test_the_model_commands_choose_the_wait_policy_before_anything_loads(monkeypatch, tmp_path):
    from pipeline_dsl import cli

    called = []
    monkeypatch.setattr(cpus, "passive_waits", lambda: called.append(True))
    assert cli.main(["run", str(tmp_path / "missing.agp")]) == 2
    assert called == [True]
    assert cli.main(["check", str(tmp_path / "missing.agp")]) == 2               # no model: not asked
    assert called == [True]


def test_the_run_summary_says_when_openmp_threads_wait_passively():
    s = {"requests": 1, "errors": 0, "prompt_tokens": 1, "cached_tokens": 0, "completion_tokens": 1,
         "output_tokens_per_s": 1.0, "generation_s": 1.0, "ttft_p50_ms": 1.0, "ttft_p99_ms": 1.0,
         "tpot_p50_ms": 1.0, "tpot_p99_ms": 1.0, "mean_batch_size": 1.0, "kv_hit_rate": 0.0,
         "engines": {"gen": {"threads": 2, "cpus": 2, "omp_wait_policy": "passive"}}}
    assert ("threads         gen 2 (of the 2 CPUs this process may use); OpenMP waits passive"
            in format_summary(s).splitlines())


def test_a_cpu_quota_below_the_mask_or_a_loaded_machine_is_a_reason_to_sleep(tmp_path, monkeypatch):
    contained(tmp_path, monkeypatch, "150000 100000")
    assert cpus.busy_reason(load=0.0) == "a CPU quota of 1.5 CPUs"     # spinning would spend the quota
    contained(tmp_path / "b", monkeypatch, "800000 100000")             # the quota allows every CPU
    assert cpus.busy_reason(load=0.0) is None
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert cpus.busy_reason(load=7.9) is None
    assert cpus.busy_reason(load=8.0) == "load average 8.0 on 8 CPUs"

"""A finer hardware id (issue 24 §5), read from fake /proc and /sys trees.

The committed baseline's CPU read "AMD EPYC" and nothing else, so any 2-CPU AVX2 EPYC shared
its id; a container limited by taskset or a CPU quota shared it with the whole host.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from qbench.host import envinfo

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
stepping\t: 1
cpu MHz\t\t: 2445.424
flags\t\t: fpu avx avx2 fma

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 2
"""

ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd40
CPU revision\t: 1
"""


def test_cpu_identity_reads_family_model_stepping(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text(X86)
    assert envinfo.cpu_identity(tmp_path / "cpuinfo") == {
        "vendor": "AuthenticAMD", "family": 25, "model": 1, "stepping": 1}   # first CPU only
    (tmp_path / "arm").write_text(ARM)
    assert envinfo.cpu_identity(tmp_path / "arm") == {
        "implementer": "0x41", "variant": "0x0", "part": "0xd40", "revision": 1}
    assert envinfo.cpu_identity(tmp_path / "missing") == {}


def cgroup_tree(tmp_path: Path, proc_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    (tmp_path / "cgroup").write_text(proc_cgroup)
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return tmp_path / "cgroup", root


@pytest.mark.parametrize("proc_cgroup, files, quota", [
    # v2: the tightest quota on the way to the root wins (the parent's 1.5 CPUs here)
    ("0::/kube/pod1/ctr\n", {"kube/pod1/ctr/cpu.max": "400000 100000\n",
                             "kube/pod1/cpu.max": "150000 100000\n",
                             "kube/cpu.max": "max 100000\n"}, 1.5),
    ("0::/a\n", {"a/cpu.max": "max 100000\n"}, None),                       # unlimited
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),                       # a cgroup namespace
    # v1 (and a hybrid host): cpu.cfs_quota_us / cpu.cfs_period_us, -1 unlimited
    ("4:cpu,cpuacct:/docker/abc\n1:memory:/docker/abc\n0::/\n",
     {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
      "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
      "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 0.5),
    ("1:cpu:/\n0::/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"},
     None),                                                                # this machine
])
def test_cgroup_cpu_quota(tmp_path: Path, proc_cgroup: str, files: dict[str, str],
                          quota: float | None) -> None:
    cg, root = cgroup_tree(tmp_path, proc_cgroup, files)
    assert envinfo.cgroup_cpu_quota(cg, root) == quota


def test_cgroup_quota_unreadable_is_none(tmp_path: Path) -> None:
    assert envinfo.cgroup_cpu_quota(tmp_path / "none", tmp_path / "sys") is None


OLD_ENV = {"cpu": "AMD EPYC", "cpu_flags": ["avx", "avx2", "fma"], "cpu_cores_logical": 2,
           "gpus": [], "hostname": "a", "memory_total_mb": 24000}


def old_hardware_id(env: dict) -> str:
    """The id as qbench computed it before issue 24 (main @46f171d)."""
    fp = {"cpu": env.get("cpu"), "cpu_flags": sorted(env.get("cpu_flags") or []),
          "cpu_cores_logical": env.get("cpu_cores_logical"),
          "gpus": [{"name": g.get("name"), "memory_total_mb": round(g.get("memory_total_mb") or 0),
                    "driver": g.get("driver")} for g in env.get("gpus") or []]}
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def test_a_stored_environment_keeps_its_id() -> None:
    """Records written before still load and compare with each other: their id is what it
    was; a new record (with the finer fields) has another."""
    assert envinfo.hardware_id(OLD_ENV) == old_hardware_id(OLD_ENV)
    new = OLD_ENV | {"cpu_id": {"vendor": "AuthenticAMD", "family": 25, "model": 1,
                                "stepping": 1}, "cpus_usable": 2, "cpu_quota": None}
    assert envinfo.hardware_id(new) != envinfo.hardware_id(OLD_ENV)


@pytest.mark.parametrize("change", [
    {"cpu_id": {"vendor": "AuthenticAMD", "family": 25, "model": 17, "stepping": 1}},  # Zen 4
    {"cpus_usable": 1},                      # taskset -c 0
    {"cpu_quota": 1.5},                      # a container's quota
    {"gpus": [{"name": "NVIDIA H100", "memory_total_mb": 81559.0, "driver": "550.54"}]},
])
def test_what_decides_timings_decides_the_id(change: dict) -> None:
    base = OLD_ENV | {"cpu_id": {"vendor": "AuthenticAMD", "family": 25, "model": 1,
                                 "stepping": 1}, "cpus_usable": 2, "cpu_quota": None}
    assert envinfo.hardware_id(base | change) != envinfo.hardware_id(base)
    # what does not decide timings does not
    assert envinfo.hardware_id(base | {"hostname": "b", "memory_total_mb": 1}) == \
        envinfo.hardware_id(base)


def test_gpu_free_memory_does_not_change_the_id() -> None:
    gpu = {"name": "NVIDIA H100", "memory_total_mb": 81559.2, "driver": "550.54"}
    a = OLD_ENV | {"gpus": [gpu | {"memory_free_mb": 100.0}]}
    b = OLD_ENV | {"gpus": [gpu | {"memory_free_mb": 80000.0}]}
    assert envinfo.hardware_id(a) == envinfo.hardware_id(b)


def test_this_machine_collects_the_finer_fields() -> None:
    env = envinfo.collect()
    assert env["cpus_usable"] is None or env["cpus_usable"] >= 1
    assert isinstance(env["cpu_id"], dict)
    assert "cpu_quota" in env

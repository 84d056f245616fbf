"""kdtune.perf: physical core count, thread setup with the oversubscription warning, teacher forward."""

import logging
import os

import pytest
import torch

import kdtune.losses as L
from kdtune import perf
from kdtune.errors import ConfigError
from kdtune.models.llama import llama


@pytest.fixture(autouse=True)
def _keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cpuinfo_cores() -> int | None:
    """Independent count: distinct (physical id, core id) pairs in /proc/cpuinfo."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    pairs, phys = set(), None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            pairs.add((phys, value.strip()))
    return len(pairs) or None


def test_physical_cores_match_cpuinfo():
    n = perf.physical_cpu_cores()
    assert 1 <= n <= os.cpu_count()
    expected = _cpuinfo_cores()
    full_affinity = len(os.sched_getaffinity(0)) == os.cpu_count()
    if expected is not None and full_affinity and perf._cgroup_cpu_limit() is None:
        assert n == expected


def _fake_topology(monkeypatch, files: dict[str, str], cpus: set[int]):
    monkeypatch.setattr(perf, "_read", lambda path: files.get(path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)


def test_hyperthreads_affinity_and_quota(monkeypatch):
    topo = {}
    for cpu, core in enumerate([0, 1, 0, 1]):  # 4 logical CPUs, 2 physical cores (2 hyperthreads each)
        topo[f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id"] = "0"
        topo[f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id"] = str(core)
    _fake_topology(monkeypatch, topo, {0, 1, 2, 3})
    assert perf.physical_cpu_cores() == 2
    _fake_topology(monkeypatch, topo, {0, 2})  # both hyperthreads of core 0
    assert perf.physical_cpu_cores() == 1
    _fake_topology(monkeypatch, {**topo, "/sys/fs/cgroup/cpu.max": "150000 100000"}, {0, 1, 2, 3})
    assert perf.physical_cpu_cores() == 2  # ceil(1.5)
    _fake_topology(monkeypatch, {**topo, "/sys/fs/cgroup/cpu.max": "50000 100000"}, {0, 1, 2, 3})
    assert perf.physical_cpu_cores() == 1
    _fake_topology(monkeypatch, {}, {0, 1, 2})  # no topology readable: logical CPUs
    assert perf.physical_cpu_cores() == 3


def test_configure_threads_explicit_env_default(monkeypatch):
    monkeypatch.setattr(perf, "physical_cpu_cores", lambda: 2)
    assert perf.configure_threads(1, check_load=False) == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert perf.configure_threads(check_load=False) == 1  # the user's OMP_NUM_THREADS is kept
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert perf.configure_threads(check_load=False) == 2
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="num_threads"):
            perf.configure_threads(bad, check_load=False)


def test_oversubscription_warning(monkeypatch, caplog):
    monkeypatch.setattr(perf, "physical_cpu_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    monkeypatch.setattr(perf, "other_busy_cores", lambda interval_s=0.3: 1.8)
    with caplog.at_level(logging.WARNING, logger="kdtune.perf"):
        perf.configure_threads(2)
    assert "oversubscribed" in caplog.text and "num_threads" in caplog.text
    caplog.clear()
    monkeypatch.setattr(perf, "other_busy_cores", lambda interval_s=0.3: 0.0)
    with caplog.at_level(logging.WARNING, logger="kdtune.perf"):
        perf.configure_threads(2)
    assert caplog.text == ""
    monkeypatch.setattr(os, "getloadavg", lambda: (3.5, 1.0, 1.0))  # load average above the cores
    with caplog.at_level(logging.WARNING, logger="kdtune.perf"):
        perf.configure_threads(2)
    assert "load average 3.5" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kdtune.perf"):
        perf.configure_threads(1)  # one thread: nothing to lower, so no warning (it would only be noise)
    assert caplog.text == ""


def test_other_busy_cores_sane():
    busy = perf.other_busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= os.cpu_count() + 0.5


def _model(vocab, dim, seed):
    torch.manual_seed(seed)
    return llama(
        vocab_size=vocab, num_layers=1, num_heads=2, num_kv_heads=1, embed_dim=dim, intermediate_dim=32, max_seq_len=32
    )


def test_teacher_forward_inference_mode_feeds_the_objective():
    student, teacher = _model(40, 16, 0), _model(40, 24, 1).requires_grad_(False).eval()
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = tokens.clone()
    labels[:, :2] = -100
    t_hidden = perf.teacher_forward(teacher, tokens, return_hidden=True)
    assert t_hidden.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(t_hidden, teacher(tokens, return_hidden=True), rtol=0, atol=0)
    mask = labels[:, 1:] != -100
    objective = L.DistillationObjective(L.ForwardKLLoss(), teacher=teacher, kd_ratio=0.5, temperature=2.0)
    out = objective.from_hidden(student, student(tokens, return_hidden=True), labels, (t_hidden[:, :-1][mask],))
    out.loss_sum.backward()
    grads = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    ref = objective(student, {"tokens": tokens, "labels": labels})  # LiveTeacher.prepare: its own inference mode
    ref.loss_sum.backward()
    for g, p in zip(grads, student.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_setup_runtime_sets_the_configured_threads_on_cpu(tmp_path) -> None:
    from kdtune.training import setup_runtime

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        rt = setup_runtime("cpu", "fp32", str(tmp_path / "run"), 0, num_threads=1)
        assert torch.get_num_threads() == 1
        rt.close()
    finally:
        torch.set_num_threads(before)


def test_flush_denormals_zeroes_subnormals_and_setup_runtime_turns_it_on(tmp_path):
    """A subnormal operand (what a confident softmax's gradient is full of) becomes zero once flushing is on."""
    from kdtune.training.runtime import setup_runtime

    try:
        if not perf.flush_denormals():
            pytest.skip("this CPU cannot flush subnormals")
        torch.set_flush_denormal(False)
        tiny = torch.tensor([1e-39])  # subnormal in fp32 (the smallest normal is ~1.18e-38)
        assert (tiny * 1.0).item() != 0.0
        runtime = setup_runtime(device="cpu", dtype="fp32", output_dir=tmp_path / "run", seed=0, cfg=None)
        runtime.close()
        assert (tiny * 1.0).item() == 0.0
        assert (torch.tensor([1e-37]) * 1.0).item() == pytest.approx(1e-37)  # normal numbers are untouched
    finally:
        torch.set_flush_denormal(False)


_FAULTS = """
import resource, sys, torch
from kdtune import perf
applied = perf.keep_freed_memory() if sys.argv[1] == "keep" else False
def step():
    x = torch.empty(16 * 2**20)  # 64 MiB fp32, above glibc's largest mmap threshold
    x.fill_(1.0)
for _ in range(10):  # warm-up: glibc's heap settles (freed blocks coalesce) within a few steps
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(
    not (os.uname().sysname == "Linux" and __import__("platform").libc_ver()[0] == "glibc"), reason="glibc only"
)
def test_keep_freed_memory_reuses_pages_of_large_temporaries():
    """With the setting, a 64 MiB temporary page-faults no more once the heap has settled; without, every time."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    runs = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], env=env, capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        runs[mode] = (applied == "True", int(faults))
    assert runs["keep"][0] and not runs["default"][0]
    pages = 3 * 64 * 2**20 // 4096
    assert runs["default"][1] > pages // 2  # each fresh mmap faults its pages in again
    assert runs["keep"][1] < pages // 20


def test_keep_freed_memory_leaves_user_malloc_settings_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    assert perf.keep_freed_memory() is False

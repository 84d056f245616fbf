"""Runtime settings that keep a run from wasting work: CPU thread count, an oversubscription check, teacher forward.

* :func:`physical_cpu_cores` — the physical cores this process may run on (hyperthreads, the affinity mask and a
  cgroup CPU quota taken into account).
* :func:`configure_threads` — sets torch's intra-op threads to that count unless the user chose (``num_threads`` or
  ``OMP_NUM_THREADS``), and warns when other processes already keep the cores busy: torch's default threads on a busy
  2-core machine were measured 7-10× slower than one thread.
* :func:`flush_denormals` — treat subnormal floats as zero on the CPU: a trained model's near-one-hot softmax makes
  subnormal gradients, and every matmul touching them ran 10-40x slower (a quickstart teacher's step: 198 -> 74 ms).
* :func:`keep_freed_memory` — tells glibc's malloc to serve every allocation from its heap and keep freed memory
  there, so a training step's large temporaries (a loss chunk's ``[rows, V]`` fp32 logits, tens of MiB) reuse
  already-mapped pages instead of being ``mmap``-ed fresh and page-faulted in on every step: measured 1.13x on a whole
  KD step (52M teacher / 13M LoRA student, vocab 32k, CPU fp32), the output-layer GEMMs from ~100 to ~150 GFLOP/s.
* :func:`teacher_forward` — a frozen teacher's forward under ``torch.inference_mode`` (no autograd bookkeeping).
* :func:`compile_options` — the inductor options of everything ``compile: true`` compiles.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kdtune.errors import ConfigError

__all__ = [
    "compile_options",
    "configure_cpu_process",
    "configure_threads",
    "flush_denormals",
    "keep_freed_memory",
    "other_busy_cores",
    "physical_cpu_cores",
    "teacher_forward",
]

log = logging.getLogger(__name__)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_cpu_limit() -> float | None:
    """CPUs allowed by a cgroup quota (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None without a quota."""
    v2 = _read("/sys/fs/cgroup/cpu.max")
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def physical_cpu_cores() -> int:
    """Physical cores available to this process: distinct (package, core) pairs among the CPUs of the affinity mask,
    capped by a cgroup CPU quota; falls back to the logical CPU count where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = list(range(os.cpu_count() or 1))
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        base = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        package, core = _read(base + "physical_package_id"), _read(base + "core_id")
        if package is None or core is None:
            cores = set()
            break
        cores.add((package, core))
    count = len(cores) if cores else len(cpus)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy ticks of all CPUs, total ticks of all CPUs, number of CPUs) from /proc/stat."""
    stat = _read("/proc/stat")
    if not stat:
        return None
    lines = stat.splitlines()
    fields = [int(x) for x in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user
    ncpu = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return total - idle, total, max(1, ncpu)


def _own_ticks() -> int | None:
    stat = _read("/proc/self/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15), all threads


def other_busy_cores(interval_s: float = 0.3) -> float | None:
    """How many CPUs other processes keep busy, sampled over ``interval_s`` (this process's own use subtracted).

    Returns None where /proc is not available.
    """
    a, own_a = _cpu_ticks(), _own_ticks()
    if a is None or own_a is None:
        return None
    time.sleep(interval_s)
    b, own_b = _cpu_ticks(), _own_ticks()
    if b is None or own_b is None or b[1] == a[1]:
        return None
    ticks_per_cpu = (b[1] - a[1]) / b[2]
    return max(0.0, ((b[0] - a[0]) - (own_b - own_a)) / ticks_per_cpu)


def configure_threads(num_threads: int | None = None, *, check_load: bool = True) -> int:
    """Set torch's CPU threads and warn when the machine is oversubscribed.

    Args:
        num_threads: explicit thread count (the ``num_threads`` setting); None: keep ``OMP_NUM_THREADS`` when it is
            set in the environment, else use :func:`physical_cpu_cores` (hyperthreads do not speed up GEMMs).
        check_load: sample other processes' CPU use and the load average, and log one warning when the threads
            would compete with them for the cores.

    Returns:
        The thread count in force.
    """
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise ConfigError(f"num_threads={num_threads!r} is invalid: give a positive integer (e.g. num_threads=1)")
        torch.set_num_threads(num_threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(physical_cpu_cores())
    threads = torch.get_num_threads()
    if check_load:
        cores = physical_cpu_cores()
        busy = other_busy_cores()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        # with one thread there is nothing to lower: only warn when fewer threads would help
        if threads > 1 and ((busy is not None and busy + threads > cores + 0.5) or load > cores):
            busy_txt = f", other processes busy on ~{busy:.1f}" if busy is not None else ""
            log.warning(
                "CPU oversubscribed: load average %.1f on %d physical cores%s; torch uses %d threads, which then run "
                "several times slower than fewer; set num_threads (e.g. num_threads=1) or OMP_NUM_THREADS",
                load,
                cores,
                busy_txt,
                threads,
            )
    return threads


def flush_denormals() -> bool:
    """Make the CPU treat subnormal floats (|x| < 1.2e-38 in fp32) as zero, for this process.

    Confident softmaxes (a trained teacher, a student memorising its data) produce subnormal probabilities and
    gradients; x86 CPUs handle every arithmetic operation on them in microcode, and the matmuls of the output layer and
    its backward ran 10-40x slower than on normal numbers. Flushing them changes results only below 1.2e-38, far under
    fp32's rounding of any loss or weight. GPUs are unaffected (CUDA flushes in its fast paths already).

    Returns:
        Whether the CPU supports it (SSE3 and later do; otherwise nothing changes).
    """
    return bool(torch.set_flush_denormal(True))


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
#: free bytes glibc may keep at the top of its heap before returning them to the system (``M_TRIM_THRESHOLD``).
KEEP_FREED_BYTES = 2**31 - 1
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Serve all allocations from glibc's heap and keep freed memory mapped (``mallopt``), once per process.

    glibc ``mmap``-s every allocation above its threshold (at most 32 MiB) and unmaps it on free, so each fresh
    ``[rows, V]`` fp32 tensor of a loss chunk costs a page fault per 4 KiB page on every step (the GEMM that writes
    it runs at about two thirds of its speed). ``M_MMAP_MAX = 0`` puts such blocks on the heap (glibc still falls back
    to ``mmap`` where the heap cannot grow) and ``M_TRIM_THRESHOLD`` of 2 GiB keeps freed blocks there for the next
    step. Measured peak RSS on the KD benchmark (benchmarks/bench_kd_step.py) unchanged (1.05 GiB medium, 0.57 GiB
    small pair). The cost is heap fragmentation: glibc's aligned allocations cannot always reuse a freed block of the
    same size, so the heap grows for a few steps before it settles (a synthetic 64 MiB temporary per step with small
    allocations in between: +384 MiB resident, then no growth and no page faults), and memory freed after the peak
    stays with the process. Left alone when the user set any ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` (e.g.
    ``MALLOC_MMAP_MAX_=65536`` keeps glibc's defaults), and off glibc (macOS, musl, Windows).

    Returns:
        Whether the allocator settings were applied.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(k in os.environ for k in _MALLOC_ENV) or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        return False


def configure_cpu_process() -> None:
    """The process-wide CPU settings every run and calibration uses: :func:`flush_denormals` and
    :func:`keep_freed_memory` (threads are :func:`configure_threads`, which takes the user's setting)."""
    flush_denormals()
    keep_freed_memory()


def compile_options(device: torch.device) -> dict[str, Any] | None:
    """The ``torch.compile`` options of everything ``compile: true`` compiles (decoder layers, the fused chunk loss).

    On a CPU inductor's C++ wrapper calls the compiled kernels from C++ instead of generated Python: the same kernels
    and numbers, less per-call overhead, which small models' many short kernels feel (KD step of the 5M / 1.3M
    benchmark pair: +0.6 to +15 %, median ~+7 %, over 4 A/B pairs). Elsewhere inductor's defaults.
    """
    return {"cpp_wrapper": True} if device.type == "cpu" else None


def teacher_forward(teacher: nn.Module | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a frozen teacher under ``torch.inference_mode()`` (no graph, no version counters).

    The outputs are inference tensors: use them in ops that need no gradient (the teacher's output layer under
    ``no_grad``, a divergence's teacher side); ``.clone()`` one outside inference mode before an op that saves it for
    backward.
    """
    with torch.inference_mode():
        return teacher(*args, **kwargs)

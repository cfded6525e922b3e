"""The timing method (DESIGN §8, §11): warm-up, synchronisation inside the timed region, median and IQR.

- :func:`measure` calls a target ``warmup`` times untimed, then ``repeats`` times timed. On CUDA each call
  sits between a pair of ``torch.cuda.Event(enable_timing=True)`` records on the current stream, with
  ``torch.cuda.synchronize()`` before the first call and after each end event, so the sample is the time
  the GPU took, not the time it took the host to queue kernels. On the CPU it is ``time.perf_counter()``.
- :func:`summarize` is a pure function of the samples: median, first and third quartiles (numpy's linear
  percentiles), IQR, mean. :func:`per_item` turns seconds per call into items per second *per sample*
  and summarises those (the median rate, not the rate of the median time, which differ for even n).
- :class:`PeakMemory` resets and reads ``torch.cuda.max_memory_allocated`` around a block; on the CPU
  it reads the process's maximum resident set size (``getrusage``), a lifetime high-water mark that
  cannot be reset, and says so in :attr:`MemoryPeak.kind`.
- :func:`top_kernels` runs a target once under ``torch.profiler`` and returns the top rows by self CUDA
  time (GPU: the kernel events only, :func:`device_events`) or self CPU time (CPU) as plain data.
  ``quiet=True`` silences the ``USDT: ... profiler_start`` / ``profiler_stop`` lines that kineto (the
  profiler's C++ side) writes straight to file descriptor 2 (no environment variable turns them off), by
  pointing fd 2 at ``/dev/null`` while the profiler starts and stops only: what the profiled call itself
  writes still shows.
- :func:`run_with_oom_retry` (from :mod:`cloakbench.oom`, re-exported) halves the batch on a CUDA out-of-memory
  error and says what it tried.
- :class:`StageTimer` accumulates wall seconds per named stage, synchronising CUDA at stage boundaries.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import torch

from cloakbench.oom import OomRecord as OomRecord  # re-exported: their home is cloakbench.oom
from cloakbench.oom import is_oom as is_oom
from cloakbench.oom import run_with_oom_retry as run_with_oom_retry

log = logging.getLogger(__name__)


class _ProfilerEvent(Protocol):
    @property
    def device_type(self) -> Any: ...


E = TypeVar("E", bound=_ProfilerEvent)

MemoryKind = Literal["cuda_max_allocated", "process_max_rss"]


@dataclass(frozen=True)
class TimingStats:
    """Seconds per call of a timed target: the raw samples and their summary."""

    samples: tuple[float, ...]
    median: float
    q1: float
    q3: float
    iqr: float
    mean: float
    n: int


@dataclass(frozen=True)
class Throughput:
    """Items per second, one value per timed sample (``items / seconds``), and their summary."""

    items: int
    samples: tuple[float, ...]
    median: float
    q1: float
    q3: float
    iqr: float


def summarize(samples: Sequence[float]) -> TimingStats:
    """Median, quartiles (numpy ``percentile``, linear interpolation), IQR and mean of ``samples``."""
    values = tuple(float(s) for s in samples)
    if not values:
        raise ValueError("summarize: no samples")
    bad = [v for v in values if not np.isfinite(v) or v < 0]
    if bad:
        raise ValueError(f"summarize: samples must be finite and >= 0, got {bad[:3]}")
    arr = np.asarray(values, dtype=np.float64)
    q1, median, q3 = (float(v) for v in np.percentile(arr, [25.0, 50.0, 75.0], method="linear"))
    return TimingStats(samples=values, median=median, q1=q1, q3=q3, iqr=q3 - q1, mean=float(arr.mean()), n=len(values))


def per_item(stats: TimingStats, items: int) -> Throughput:
    """Items per second for each sample of ``stats`` (``items`` per call), summarised like the seconds."""
    if items < 1:
        raise ValueError(f"per_item: items must be >= 1, got {items}")
    if any(s <= 0 for s in stats.samples):
        raise ValueError(f"per_item: a sample of {min(stats.samples)} s has no finite rate")
    rates = summarize([items / s for s in stats.samples])
    return Throughput(items=items, samples=rates.samples, median=rates.median, q1=rates.q1, q3=rates.q3, iqr=rates.iqr)


def _check_counts(warmup: int, repeats: int) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> TimingStats:
    """``warmup`` untimed calls of ``fn``, then ``repeats`` timed ones (CUDA events on CUDA, else
    ``perf_counter``); returns the summary of the ``repeats`` samples in seconds."""
    _check_counts(warmup, repeats)
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.synchronize(device)
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize(device)
                samples.append(start.elapsed_time(end) / 1000.0)  # elapsed_time is in milliseconds
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return summarize(samples)


@dataclass(frozen=True)
class MemoryPeak:
    """A peak memory reading and what it is: the CUDA caching allocator's peak since the last reset
    (``cuda_max_allocated``) or the process's lifetime maximum RSS (``process_max_rss``)."""

    bytes: int
    kind: MemoryKind


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # Linux reports KiB, macOS bytes


def reset_peak_memory(device: torch.device) -> None:
    """Reset the CUDA peak-memory counter (nothing to reset on the CPU: max RSS is a lifetime mark)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> MemoryPeak:
    """``torch.cuda.max_memory_allocated`` on CUDA, else the process's max RSS (see :class:`MemoryPeak`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return MemoryPeak(bytes=int(torch.cuda.max_memory_allocated(device)), kind="cuda_max_allocated")
    return MemoryPeak(bytes=_max_rss_bytes(), kind="process_max_rss")


class PeakMemory:
    """``with PeakMemory(device) as mem: ...`` resets the CUDA peak on entry; :attr:`peak` is read on exit."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.peak: MemoryPeak | None = None

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)  # earlier queued work must not land in this block's peak
        reset_peak_memory(self.device)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        synchronize(self.device)
        self.peak = peak_memory(self.device)


@contextlib.contextmanager
def _fd2_silenced(enabled: bool) -> Iterator[None]:
    """File descriptor 2 points at ``/dev/null`` inside the block (C++ libraries write there, not to sys.stderr)."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def device_events(events: Iterable[E]) -> list[E]:
    """The profiler events (or their key averages) that happened on the GPU: kernels, copies, memsets.

    ``key_averages()`` of a CUDA profile holds every kernel twice: as its own event (``device_type`` CUDA) and
    inside the self device time of the CPU op that launched it (a CPU op's ``self_device_time_total`` is the
    time of the kernels it launched directly). Summing both counts each kernel twice. The GPU-side user
    annotations (``record_function`` ranges mirrored on the GPU timeline, ``is_user_annotation``) span
    kernels already counted and are left out too, as torch's own ``table()`` leaves them out of its total."""
    cuda = torch.profiler.DeviceType.CUDA
    return [e for e in events if e.device_type == cuda and not getattr(e, "is_user_annotation", False)]


def top_kernels(
    fn: Callable[[], object], *, device: torch.device, n: int = 10, quiet: bool = False
) -> list[dict[str, Any]]:
    """Run ``fn`` once under ``torch.profiler`` and return the ``n`` rows with the most self time.

    On CUDA the rows are the GPU events only (:func:`device_events`: kernels and copies, not the CPU ops
    that launched them), sorted by self CUDA time, and ``share`` is the fraction of their total; on the CPU
    the rows are all CPU ops by self CPU time. Each row: ``name``, ``calls``, ``self_ms``, ``total_ms``,
    ``share`` and ``clock`` (``"cuda"`` or ``"cpu"``: which time it is).
    Warm the target up first: the first call's one-off costs (cuDNN autotuning, lazy init) would dominate.
    ``quiet``: no profiler chatter on stderr (see the module docstring).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"top_kernels: n must be an integer >= 1, got {n!r}")
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    profiling = contextlib.ExitStack()
    with _fd2_silenced(quiet):
        prof = profiling.enter_context(torch.profiler.profile(activities=activities))
    try:
        fn()
        synchronize(device)
    finally:
        with _fd2_silenced(quiet):
            profiling.close()

    def self_us(event: Any) -> float:
        if not on_cuda:
            return float(event.self_cpu_time_total)
        value = getattr(event, "self_device_time_total", None)
        return float(value if value is not None else event.self_cuda_time_total)

    def total_us(event: Any) -> float:
        if not on_cuda:
            return float(event.cpu_time_total)
        value = getattr(event, "device_time_total", None)
        return float(value if value is not None else event.cuda_time_total)

    averages = list(prof.key_averages())
    # on CUDA, CPU ops carry the device time of the kernels they launched as well: keep the kernels only
    events = [e for e in (device_events(averages) if on_cuda else averages) if self_us(e) > 0]
    grand = sum(self_us(e) for e in events)
    events.sort(key=self_us, reverse=True)
    clock = "cuda" if on_cuda else "cpu"
    return [
        {
            "name": str(e.key),
            "calls": int(e.count),
            "self_ms": self_us(e) / 1000.0,
            "total_ms": total_us(e) / 1000.0,
            "share": self_us(e) / grand if grand > 0 else 0.0,
            "clock": clock,
        }
        for e in events[:n]
    ]


class StageTimer:
    """Wall seconds accumulated per named stage: ``with timer.stage("embedding"): ...``.

    On CUDA the device is synchronised when a stage starts and when it ends, so queued GPU work is
    charged to the stage that queued it. Re-entering a stage adds to its total.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not name:
            raise ValueError("StageTimer.stage: the stage name is empty")
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self._seconds[name] = self._seconds.get(name, 0.0) + time.perf_counter() - t0

    def as_dict(self) -> dict[str, float]:
        """Seconds per stage, in the order the stages first ran."""
        return dict(self._seconds)


def stage_timer(device: torch.device | str = "cpu") -> StageTimer:
    """A new :class:`StageTimer` for ``device``."""
    return StageTimer(device)

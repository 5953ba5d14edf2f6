"""Peak memory of a block of code (:class:`PeakMemory`: traced Python/numpy allocations and
resident-set growth), for the benchmarks.

Part of :mod:`napari_propseg.bench`; also importable from :mod:`napari_propseg.bench.protocol`.
"""
from __future__ import annotations

import math
import resource
import threading
import tracemalloc

import numpy as np


# --------------------------------------------------------------------------- memory


class PeakMemory:
    """Peak memory of a block of code, in MB.

    Two measurements, both reported:

    * ``traced_mb``: :mod:`tracemalloc`'s peak of memory allocated during the block
      (Python objects and numpy arrays; not torch tensors nor ITK buffers). Exact, even
      when freed pages are reused (which hides allocations from the RSS).
    * ``rss_delta_mb``: growth of the process's resident set size during the block: with
      psutil installed, a background thread samples the RSS every ``interval`` seconds
      (``method`` ``"tracemalloc+psutil-rss"``); without psutil, the growth of
      ``resource.getrusage(...).ru_maxrss`` (``"tracemalloc+ru_maxrss"``, only visible
      when the block raises the process's lifetime peak). Catches native allocations
      (torch, ITK), misses reuse of memory the process already held.

    ``peak_mb`` is the larger of the two; ``peak_rss_mb`` the absolute peak RSS seen.
    tracemalloc costs a little time per Python allocation; the numpy/torch/ITK-bound code
    benchmarked here is slowed by a few percent at most.

    Example:
        >>> import numpy as np
        >>> with PeakMemory() as mem:
        ...     _ = np.ones(2**20)
        >>> mem.peak_mb >= 8
        True
    """

    def __init__(self, interval: float = 0.005, *, trace: bool = True):
        self.interval = interval
        self.trace = trace
        self.peak_mb = math.nan
        self.traced_mb = math.nan
        self.rss_delta_mb = math.nan
        self.peak_rss_mb = math.nan
        try:
            import psutil  # noqa: F401

            rss = "psutil-rss"
        except ImportError:
            rss = "ru_maxrss"
        self.method = f"tracemalloc+{rss}" if trace else rss

    def __enter__(self) -> "PeakMemory":
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._thread = None
        if self.method.endswith("psutil-rss"):
            import psutil

            self._proc = psutil.Process()
            self._base = self._proc.memory_info().rss
            self._peak = self._base
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.is_set():
                    rss = self._proc.memory_info().rss
                    if rss > self._peak:
                        self._peak = rss
                    self._stop.wait(self.interval)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        if self.trace:
            self._started = not tracemalloc.is_tracing()
            if self._started:
                tracemalloc.start()
            tracemalloc.reset_peak()
            self._traced0 = tracemalloc.get_traced_memory()[0]
        return self

    def __exit__(self, *exc) -> None:
        if self.trace:
            self.traced_mb = max(0, tracemalloc.get_traced_memory()[1] - self._traced0) / 2**20
            if self._started:
                tracemalloc.stop()
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._peak = max(self._peak, self._proc.memory_info().rss)
            self.rss_delta_mb = (self._peak - self._base) / 2**20
            self.peak_rss_mb = self._peak / 2**20
        else:
            self.rss_delta_mb = (maxrss - self._maxrss0) / 1024
            self.peak_rss_mb = maxrss / 1024
        self.peak_mb = float(np.nanmax([self.traced_mb, self.rss_delta_mb]))

"""The host allocator's policy during a run: keep freed memory for the next op (glibc only).

A CPU forward over the whole calibration batch allocates and frees tensors of hundreds of MB per op
(SmolLM2 at 128x512 tokens: 151 MB per (tokens, hidden) tensor, 403 MB per (tokens, intermediate)).
glibc serves blocks above its mmap threshold (32 MiB at most) with fresh mappings and unmaps them on
free, so every op's output is page-faulted and zeroed by the kernel again: one SmolLM2 block forward at
128x512 takes ~780,000 page faults and 5.7 s (31,000 and 5.4 s with PyTorch's huge pages), against
~37,000 and 4.0 s when freed blocks are reused (0 and 4.4 s with huge pages too); 2 cores,
`experiments/results/host_alloc.md`. PyTorch's CPU performance tuning guide makes the same point and
recommends a caching allocator (jemalloc, tcmalloc); `reuse_freed_memory` gets it from glibc itself: no
mmaps (M_MMAP_MAX = 0: every block comes from the heap) and a high trim threshold (freed blocks stay
there).

The price is memory: freed blocks are kept and the heap fragments (a large block freed and a small one
carved from it leaves a hole the next large one does not fit), so the peak RSS grows: that block
forward's process peaked at 2.27 GiB instead of 1.43 (1.82 with huge pages), and 12 rounds of one 64 MB
tensor grew the heap to ~0.75 GB before it settled. So the engine calls `Heap.tidy` between blocks (the
free chunks' pages go back to the system once they hold more than the plan's estimate), and the memory
plan turns the policy on only where memory is plentiful (plan.with_reuse); on exit glibc's mmap
behaviour is restored and the free memory is returned (malloc_trim). A no-op where the C library is not
glibc. The setting is the process's: runs in one process one after another each set and restore it;
nested ones restore at the first exit (slower afterwards, never wrong).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

# mallopt parameters and glibc's defaults (malloc/malloc.h, malloc.c)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_FREED = 2**31 - 1  # the largest trim threshold mallopt takes (2 GiB of free heap top): freed memory stays


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc():
    """The C library when it is glibc with mallopt, else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _Mallinfo2
    return libc


class Heap:
    """The policy in force (`active`), and `tidy` to call between blocks."""

    def __init__(self, libc=None):
        self.libc = libc  # None: glibc's own behaviour is in force

    @property
    def active(self) -> bool:
        return self.libc is not None

    def free_bytes(self) -> int | None:
        """Bytes in the heap's free chunks (glibc >= 2.33), else None."""
        return self.libc.mallinfo2().fordblks if self.active and hasattr(self.libc, "mallinfo2") else None

    def tidy(self, keep: int) -> bool:
        """Between blocks: when the heap's free chunks hold more than `keep` bytes (e.g. the plan's estimate of
        a block's working set), their pages go back to the system (malloc_trim), so that the heap's
        fragmentation does not pile up over the blocks; the next block faults its working set in once.
        Returns whether it trimmed."""
        free = self.free_bytes()
        if free is None or free <= keep:
            return False
        self.libc.malloc_trim(0)
        return True


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Within this context large freed blocks are kept and reused instead of unmapped (see the module doc).
    Yields a Heap (inactive where disabled or not glibc)."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield Heap()
        return
    set_ = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED) == 1
    try:
        yield Heap(libc if set_ else None)
    finally:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)

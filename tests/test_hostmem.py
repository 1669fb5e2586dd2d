"""hostmem.reuse_freed_memory, checked on glibc's own accounting (mallinfo2) and on page-fault counts,
not on time: inside the context a large block comes from the heap and a freed one is reused without
faulting in fresh pages; outside it glibc maps (and unmaps) large blocks as usual."""

import os
import resource
import subprocess
import sys

import pytest
import torch

from compresslab import hostmem
from compresslab.engine import SequentialEngine
from compresslab.models.adapters import adapter_for
from compresslab.models.loaders import TinyModel

LIBC = hostmem._glibc()
pytestmark = pytest.mark.skipif(LIBC is None or not hasattr(LIBC, "mallinfo2"), reason="glibc >= 2.33 only")
BIG = 64 << 20  # bytes: above glibc's largest mmap threshold (32 MiB), so a mapping of its own by default


def _info():
    return LIBC.mallinfo2()


def _mapped() -> int:
    """Bytes glibc holds in blocks of their own mapping."""
    return _info().hblkhd


def _mapped_while_alive(nbytes: int | None = None) -> int:
    """How much more glibc maps while a block is alive; by default a block larger than all the heap's free
    chunks (so that none of them, left by earlier tests, can serve it)."""
    nbytes = nbytes or BIG + _info().fordblks
    before = _mapped()
    x = torch.empty(nbytes // 4)
    grown = _mapped() - before
    del x
    return grown


def test_large_blocks_come_from_the_heap_inside_and_are_mapped_outside():
    assert _mapped_while_alive() >= BIG
    with hostmem.reuse_freed_memory() as heap:
        assert heap.active
        assert _mapped_while_alive(BIG) == 0
    assert _mapped_while_alive() >= BIG  # glibc's behaviour is back (pages of freed heap chunks returned)
    with hostmem.reuse_freed_memory(False) as heap:
        assert not heap.active and not heap.tidy(keep=0)
        assert _mapped_while_alive() >= BIG


FAULTS = """
import resource, sys, torch
from compresslab.hostmem import reuse_freed_memory
def faults(n):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
n = int(sys.argv[1]) // 4
outside = faults(n)  # a fresh mapping: every page faulted in
with reuse_freed_memory() as heap:
    rounds = [faults(n) for _ in range(16)]  # the heap grows (small blocks carved from freed big ones) ...
    grown = rss()
    trimmed = heap.tidy(keep=n * 4)
    print(outside, sum(rounds[-4:]), grown - rss(), int(trimmed), int(heap.tidy(keep=100 * n * 4)))
"""


def test_a_freed_block_is_reused_without_faulting_in_pages_and_tidy_returns_the_rest():
    # a process of its own: the heap as a run starts it, not as earlier tests left it
    out = subprocess.run([sys.executable, "-c", FAULTS, str(BIG)], capture_output=True, text=True, check=True,
                         env={**os.environ, "THP_MEM_ALLOC_ENABLE": "0"})
    outside, steady, returned, trimmed, again = map(int, out.stdout.split())
    pages = BIG // resource.getpagesize()
    assert outside >= pages // 2, (outside, pages)
    assert steady < pages // 100, (steady, pages)  # ... until it holds enough: then no page is faulted in
    assert trimmed == 1 and returned >= BIG, returned  # more than one tensor's worth was free: given back
    assert again == 0  # not while the free chunks hold less than `keep`


class _SeeAllocator:
    """A stage that records, while the engine compresses, whether a large block is mapped."""

    needs = frozenset({"act_norm"})

    def __init__(self):
        self.mapped = []
        self.size = BIG + _info().fordblks  # fixed: larger than the heap's free chunks before the run

    def check(self, name, layer):
        pass

    def compress(self, name, layer, stats):
        self.mapped.append(_mapped_while_alive(self.size))


@pytest.mark.parametrize("max_memory, reuse", [("auto", True), (None, True), ("8GB", False)])
def test_engine_reuses_freed_memory_as_planned(max_memory, reuse):
    model, _ = TinyModel(family="llama", num_layers=2, device="cpu").load()
    stage = _SeeAllocator()
    result = SequentialEngine(device="cpu", max_memory=max_memory, progress=False).run(
        model, torch.randint(0, 256, (2, 8)), [stage])
    assert result["plan"].reuse_freed is reuse
    assert len(stage.mapped) == len(list(adapter_for(model).named_linears(model)))
    assert all((m == 0) is reuse for m in stage.mapped), stage.mapped
    assert _mapped_while_alive() >= BIG  # restored after the run

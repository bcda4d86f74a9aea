"""The heap trimmer returns freed memory that glibc would otherwise keep (edgeorch/service/heap.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from edgeorch.service import heap

# In a fresh process: 300 MB in 100 KB blocks (glibc's heap, not mmap) with one live block above
# them, so freeing them leaves the memory inside the heap, where glibc keeps it; then the trimmer.
PROBE = textwrap.dedent(
    """
    import re, sys, time
    from edgeorch.service.heap import start_heap_trimmer
    def anon():
        return int(re.search(r"RssAnon:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) // 1024
    base = anon()
    blocks = [bytearray(100_000) for _ in range(3000)]
    pin = bytearray(100_000)
    held = anon()
    del blocks
    freed = anon()
    started = start_heap_trimmer(float(sys.argv[1]))
    time.sleep(1.0)
    print(base, held, freed, anon(), started, start_heap_trimmer(0.1))
    """
)


def _run(interval: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, interval], capture_output=True, text=True, check=True)
    return out.stdout.split()


@pytest.mark.skipif(heap._malloc_trim() is None, reason="the C library is not glibc")
def test_freed_heap_stays_resident_until_the_trimmer_returns_it() -> None:
    base, held, freed, after, started, again = _run("0.2")
    base, held, freed, after = int(base), int(held), int(freed), int(after)
    assert held - base >= 250  # the blocks were resident
    assert freed - base >= 250  # freed, but glibc kept them (the pinned block sits above)
    assert after - base <= 30  # the trimmer gave them back
    assert (started, again) == ("True", "False")  # one trimmer per process
    _, _, freed_off, after_off, started_off, _ = _run("0")
    assert started_off == "False" and int(after_off) >= int(freed_off) - 30  # 0 turns it off


def test_the_interval_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("EDGEORCH_HEAP_TRIM_S", "0")
    assert heap.interval_from_env() == 0.0
    monkeypatch.setenv("EDGEORCH_HEAP_TRIM_S", "bogus")
    assert heap.interval_from_env() == heap.DEFAULT_INTERVAL_S
    monkeypatch.delenv("EDGEORCH_HEAP_TRIM_S")
    assert heap.interval_from_env() == heap.DEFAULT_INTERVAL_S

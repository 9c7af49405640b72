"""Tests for training/loop.py helpers that the stage tests do not exercise directly."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Allocate, touch and free a 64 MiB tensor five times (after two untimed cycles); print the page
# faults this cost.
_CYCLE = """
import resource, sys, torch
from training.loop import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def cycle():
    block = torch.empty(64 << 20, dtype=torch.uint8)
    block.fill_(1)
    del block
cycle()  # the heap settles over the first two cycles
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CYCLE, mode], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux",
                    reason="mallopt and page-fault counts are glibc/Linux specific")
def test_loop_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    pages = (64 << 20) // 4096  # faults for one cycle when every page is fresh
    assert _faults("default") >= 4 * pages  # glibc mmaps and unmaps the block every time
    assert _faults("keep") < pages // 10  # the block stays in the heap and is reused

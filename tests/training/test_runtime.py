"""How a training process uses its machine: keeping freed host memory."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


REPO = Path(__file__).resolve().parents[2]


# A training-like step: activations of several sizes, above glibc's largest mmap threshold and
# below it, live through the step and are freed together. Print the page faults of four steps
# after eight untimed ones (the heap settles within four).
_STEPS = """
import resource, sys, torch
from training.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    activations = [torch.empty(mib << 20, dtype=torch.uint8).fill_(1)
                   for mib in (48, 16, 48, 16, 48, 16)]
    del activations
for _ in range(8):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _STEPS, mode], cwd=REPO, capture_output=True,
                          text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or sys.platform != "linux",
                    reason="mallopt and page-fault counts are glibc/Linux specific")
def test_runtime_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    pages = (16 << 20) // 4096  # faults for one fresh 16 MiB block
    assert _faults("default") >= 4 * pages  # glibc unmaps and maps blocks every step
    assert _faults("keep") < pages // 10  # the freed blocks stay in the heap and are reused

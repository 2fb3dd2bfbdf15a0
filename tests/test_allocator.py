"""keep_freed_memory: freed blocks are reused instead of page-faulted in afresh (checked in a child process,
since the setting is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource, sys
import torch
from fusionsearch.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold; freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _run(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is what this configures")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = 64 * 2**20 // 4096
    default, kept = _run("default"), _run("keep")
    assert not default["applied"] and kept["applied"]
    assert min(default["faults"]) > pages // 2  # a fresh mapping every time
    # kept: PyTorch's 64-byte aligned blocks fit into freed ones once a few neighbours have
    # coalesced (the heap grows for the first few rounds), then nothing is faulted in any more
    assert max(kept["faults"][-5:]) < pages // 20

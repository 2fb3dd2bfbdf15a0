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


HUGE_PAGES_CHILD = r"""
import json, os, sys
if sys.argv[1] == "torch_first":
    import torch
from fusionsearch.allocator import use_huge_pages
applied = use_huge_pages()
import torch
# PyTorch page-aligns the large tensors it advises for huge pages (otherwise: 64-byte alignment)
aligned = [torch.empty(4 * 2**20).data_ptr() % 4096 == 0 for _ in range(4)]
print(json.dumps({"applied": applied, "variable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "aligned": aligned}))
"""


@pytest.mark.parametrize(
    ("mode", "variable", "applied"),
    [
        ("fresh", None, True),  # set before torch is imported: PyTorch uses it
        ("fresh", "0", False),  # the user's explicit choice is respected
        ("fresh", "1", True),  # already on
        ("torch_first", None, False),  # too late: torch may have read it already, nothing is changed
    ],
)
def test_huge_pages_are_set_only_before_torch_and_never_against_the_user(mode, variable, applied, monkeypatch):
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    if variable is not None:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", variable)
    done = subprocess.run([sys.executable, "-c", HUGE_PAGES_CHILD, mode], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    on_linux = sys.platform.startswith("linux")
    assert result["applied"] is (applied and on_linux)
    assert result["variable"] == ("1" if result["applied"] and variable is None else variable)
    # PyTorch honours what the process had before its first allocation
    assert all(result["aligned"]) is (result["variable"] == "1")

"""Huge-page tables and the allocator setting of peer_ll.kernels.memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peer_ll.kernels import memory
from peer_ll.optim import SparseAdamW

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text.split("[")[1].split("]")[0]


def _anon_huge_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_zeros_is_zeros(dtype):
    big = memory.huge_zeros(1 << 14, 1024, dtype=dtype)  # 32-64 MiB: advised
    small = memory.huge_zeros(3, 5, dtype=dtype)
    for out, shape in ((big, (1 << 14, 1024)), (small, (3, 5))):
        assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
        assert not out.any()
    like = memory.huge_zeros_like(small, dtype=torch.float64)
    assert like.shape == (3, 5) and like.dtype == torch.float64 and not like.any()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
    reason="needs Linux with transparent huge pages on madvise or always",
)
def test_huge_zeros_gets_huge_pages():
    before = _anon_huge_kib()
    table = memory.huge_zeros(1 << 16, 256)  # 64 MiB
    gained = _anon_huge_kib() - before
    # All 2 MiB-aligned pages inside the 64 MiB (at least 62 MiB) are huge, unless the
    # kernel had no free huge page to give (fragmented memory), which it reports as 0.
    assert gained >= 62 * 1024 or gained == 0
    assert memory.advise_huge_pages(table)
    assert not memory.advise_huge_pages(torch.zeros(8))  # no whole huge page inside


def test_advise_rejects_what_it_cannot_advise():
    assert not memory.advise_huge_pages(torch.zeros(1 << 20, 4).T)  # not contiguous


def test_retain_freed_memory_checks_its_argument():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_bytes"):
            memory.retain_freed_memory(bad)
    # The setting is process-wide (it would change how later tests allocate): a child makes it.
    code = "from peer_ll.kernels.memory import retain_freed_memory as r; print(r(1 << 26))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(sys.platform.startswith("linux"))


def test_optimizer_moments_are_zero_and_separate():
    table = torch.nn.Parameter(torch.randn(1 << 15, 256))  # 32 MiB: on huge pages
    table.grad = torch.randn_like(table)
    opt = SparseAdamW([table], lr=1e-3)
    opt.step()
    state = opt.state[table]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    assert m.shape == v.shape == table.shape and m.data_ptr() != v.data_ptr()
    torch.testing.assert_close(m, 0.1 * table.grad)  # (1 - β1)·g from zero moments
    torch.testing.assert_close(v, 0.001 * table.grad.square())


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("madvise", "always"),
    reason="needs Linux with transparent huge pages on madvise or always",
)
def test_peer_tables_and_moments_get_huge_pages():
    from peer_ll.experts import PEER

    before = _anon_huge_kib()
    layer = PEER(64, num_keys=512, heads=2, topk=4, dim_key=16)  # tables 2 × 64 MiB
    tables = _anon_huge_kib() - before
    opt = SparseAdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(8, 64)).sum().backward()
    before = _anon_huge_kib()
    opt.step()  # allocates the moments: 4 × 64 MiB
    moments = _anon_huge_kib() - before
    # 0 only where the kernel had no free huge page (fragmented memory)
    assert tables >= 2 * 62 * 1024 or tables == 0
    assert moments >= 4 * 62 * 1024 or moments == 0

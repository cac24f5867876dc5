"""Every Triton kernel compiles for sm_80 and sm_90 on this CPU-only machine, in seconds.

The compile runs in a subprocess with ``TRITON_INTERPRET=0`` (conftest sets it to 1,
which makes ``@triton.jit`` return interpreted functions that cannot be compiled) and
a fresh Triton cache, so every configuration really compiles.

Bounds: each configuration within CPU_BOUND CPU-seconds (compiler and ptxas). The
largest, product top-k with k = 16, takes about 8 CPU-seconds; k = 32 or 64, which
took minutes or never finished, is no longer chosen by the launcher. The wall-clock
timeout of the subprocess (WALL_BOUND per configuration) catches a compile that
hangs; it is loose because this machine is shared.

The default run compiles a representative subset (``Config.fast``: each kernel in
fp32 for sm_90, product top-k in bf16 for sm_80); the whole set (36
configurations × 2 targets) is marked slow.
"""

import json
import os
import subprocess
import sys

import pytest

from peer_ll.kernels.aot import CCS, configurations

CPU_BOUND = 30.0
WALL_BOUND = 120.0


def _compile(tmp_path, args, count):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-m", "peer_ll.kernels.aot", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=WALL_BOUND * count,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _check(rows, expected):
    assert {(r["name"], r["cc"]) for r in rows} == expected
    for r in rows:
        assert r["cpu_seconds"] <= CPU_BOUND, r
        assert r["ptx_bytes"] > 0 and r["cubin_bytes"] > 0, r


def test_representative_kernels_compile_for_sm80_and_sm90(tmp_path):
    expected = {(c.name, cc) for c in configurations() for cc in c.fast}
    assert {cc for _, cc in expected} == set(CCS)
    assert {c.kernel for c in configurations()} == {
        c.kernel for c in configurations() if c.fast
    } | {"_row_grad_atomic_kernel", "_selected_scores_bwd_kernel"}
    _check(_compile(tmp_path, ["--fast"], len(expected)), expected)


@pytest.mark.slow
def test_every_configuration_compiles(tmp_path):
    expected = {(c.name, cc) for c in configurations() for cc in CCS}
    _check(_compile(tmp_path, [], len(expected)), expected)


def test_launcher_never_chooses_a_k_that_compiles_for_minutes():
    from peer_ll.kernels.product_topk import COMPILED_MAX_K

    ks = {c.constexprs["K"] for c in configurations() if c.kernel == "_product_topk_fwd_kernel"}
    assert max(ks) == COMPILED_MAX_K == 16

"""Ahead-of-time compilation of every Triton kernel for a GPU target, on any machine.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` produces PTX and
a cubin without a GPU. This module lists the configurations the launchers can choose
and compiles them, so CI checks the GPU path on CPU-only machines.

What a "configuration" covers: every constexpr that changes a kernel's code structure
(dtype, k, activation, mask, deterministic or atomic sums, moment dtype). Tile sizes
the launchers clamp (``BLOCK_R``, ``BLOCK_DH``, ``BLOCK_D``, ...) are compiled at
their largest value, which unrolls the most code and so compiles slowest.

Run it as a script (``TRITON_INTERPRET`` must be unset or 0; each result is a JSON
line, printed as soon as that configuration has compiled)::

    python -m peer_ll.kernels.aot [--cc 80 90] [--fast] [--only NAME ...]

Each line reports wall seconds and CPU seconds (this process and ptxas); on a shared
machine the CPU seconds are the stable measure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import time
from typing import NamedTuple

CCS = (80, 90)


class Config(NamedTuple):
    """One kernel configuration: ``module.kernel`` with pointer dtypes and constexprs."""

    name: str
    module: str
    kernel: str
    pointers: dict  # argument -> pointee type ("fp32", "bf16", "i64", ...)
    constexprs: dict
    fast: tuple = ()  # the compute capabilities compiled in the default (fast) test run


def configurations() -> list[Config]:
    """Every configuration the launchers can choose (see module docstring)."""
    from peer_ll.kernels._topk_triton import COMPILED_MAX_K

    out = []
    for dt in ("fp32", "bf16"):
        for K in (2, 4, 8, 16):
            if K > COMPILED_MAX_K:
                continue
            for mask in (False, True):
                out.append(
                    Config(
                        f"product_topk_{dt}_K{K}{'_mask' if mask else ''}",
                        "_topk_triton",
                        "_product_topk_fwd_kernel",
                        dict(
                            q_ptr=dt,
                            keys_ptr=dt,
                            seg_ptr="i64",
                            mask_ptr="i8",
                            scores_ptr=dt,
                            ids_ptr="i64",
                        ),
                        dict(
                            K=K,
                            CL=max(1, min(K, 256 // K)),
                            BLOCK_Q=32 if K <= 8 else 16,
                            BLOCK_R=64,
                            BLOCK_DH=64,
                            HAS_MASK=mask,
                            IEEE=dt == "fp32",
                            SELECT="bitonic",
                        ),
                        fast=() if K != 16 or mask else (80,) if dt == "bf16" else (90,),
                    )
                )
        for act in ("gelu", "relu"):
            blocks = dict(ACT=act, BLOCK_M=32, BLOCK_D=128, BLOCK_E=128)
            fast = (90,) * (dt == "fp32" and act == "gelu")
            out.append(
                Config(
                    f"expert_mix_fwd_{dt}_{act}",
                    "_mix_triton",
                    "_expert_mix_fwd_kernel",
                    dict(
                        x_ptr=dt,
                        ids_ptr="i64",
                        gates_ptr=dt,
                        down_ptr=dt,
                        up_ptr=dt,
                        a_ptr="fp32",
                        out_ptr=dt,
                    ),
                    blocks,
                    fast=fast,
                )
            )
            out.append(
                Config(
                    f"expert_mix_bwd_{dt}_{act}",
                    "_mix_triton",
                    "_expert_mix_bwd_kernel",
                    dict(
                        dy_ptr=dt,
                        ids_ptr="i64",
                        gates_ptr=dt,
                        down_ptr=dt,
                        up_ptr=dt,
                        a_ptr="fp32",
                        dgates_ptr=dt,
                        da_ptr="fp32",
                        coef_up_ptr="fp32",
                        dx_ptr=dt,
                    ),
                    blocks,
                    fast=fast,
                )
            )
        rows = dict(
            order_ptr="i64", offsets_ptr="i64", slots_ptr="i64", coef_ptr="fp32", rhs_ptr=dt
        )
        out.append(
            Config(
                f"row_grad_sorted_{dt}",
                "_rows_triton",
                "_row_grad_sorted_kernel",
                dict(rows, out_ptr=dt),
                dict(BLOCK_P=16, BLOCK_C=128),
                fast=(90,) * (dt == "fp32"),
            )
        )
        out.append(
            Config(
                f"row_grad_atomic_{dt}",
                "_rows_triton",
                "_row_grad_atomic_kernel",
                dict(rows, out_ptr="fp32"),
                dict(BLOCK_P=32, BLOCK_C=128),
            )
        )
        scores = dict(keys_ptr=dt, left_ptr="i64", right_ptr="i64")
        out.append(
            Config(
                f"selected_scores_fwd_{dt}",
                "_scores_triton",
                "_selected_scores_fwd_kernel",
                dict(scores, q_ptr=dt, out_ptr=dt),
                dict(BLOCK_K=16, BLOCK_DH=64),
                fast=(90,) * (dt == "fp32"),
            )
        )
        out.append(
            Config(
                f"selected_scores_bwd_{dt}",
                "_scores_triton",
                "_selected_scores_bwd_kernel",
                dict(scores, g_ptr=dt, dq_ptr=dt),
                dict(BLOCK_K=16, BLOCK_DH=64),
            )
        )
        for mt in ("fp32", "bf16"):
            out.append(
                Config(
                    f"lazy_adamw_{dt}_moments_{mt}",
                    "_adamw_triton",
                    "_lazy_adamw_kernel",
                    dict(p_ptr=dt, m_ptr=mt, v_ptr=mt, g_ptr=dt, rows_ptr="i64"),
                    dict(BLOCK_R=8, BLOCK_C=128),
                    fast=(90,) * (dt == mt == "fp32"),
                )
            )
    return out


def compile_config(config: Config, cc: int):
    """Compile one configuration for ``sm_<cc>``; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(f"peer_ll.kernels.{config.module}"), config.kernel)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("set TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    signature = {}
    for name in fn.arg_names:
        if name in config.constexprs:
            signature[name] = "constexpr"
        elif name in config.pointers:
            signature[name] = "*" + config.pointers[name]
        elif name in ("decay", "beta1", "c1", "beta2", "c2", "step_size", "bc2_sqrt", "eps"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs=config.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cc", type=int, nargs="+", default=list(CCS))
    parser.add_argument("--fast", action="store_true", help="only the default-test subset")
    parser.add_argument("--only", nargs="+", help="configuration names")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("set TRITON_INTERPRET=0 to compile for a GPU")
    for config in configurations():
        if args.only and config.name not in args.only:
            continue
        for cc in args.cc:
            if args.fast and cc not in config.fast:
                continue
            start, cpu = time.perf_counter(), _cpu_seconds()
            kernel = compile_config(config, cc)
            row = {
                "name": config.name,
                "cc": cc,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": _cpu_seconds() - cpu,
                "ptx_bytes": len(kernel.asm["ptx"]),
                "cubin_bytes": len(kernel.asm["cubin"]),
            }
            print(json.dumps(row), flush=True)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as one)."""
    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if __name__ == "__main__":
    main()

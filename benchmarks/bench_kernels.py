"""Kernel benchmarks: product-key retrieval, expert mixing and a whole PEER layer.

GPU setting (issue "Triton kernels for product-key top-k retrieval and expert
mixing"): N = 1024² experts, dim = 1024, bf16, heads = 8, topk = 16, dim_key = 128,
16k tokens. Times are ``triton.testing.do_bench`` medians. Bandwidth is reported
against the device-to-device copy bandwidth measured in the same run; baselines
(the torch reference path, peer-pytorch 0.2.2) run side by side, so the ratios
are what matter.

CPU setting (``--cpu``): dim = 256, 256² experts, 2048 tokens, the torch path of
the layer: training step (forward, backward, SparseAdamW) and forward, medians of
wall-clock repeats. Run it on an export of an older commit (``PYTHONPATH=...``) to
compare before and after; the table names the peer_ll it imported.

Usage:
    python benchmarks/bench_kernels.py [--tokens 16384] [--no-write] [--out FILE]
    python benchmarks/bench_kernels.py --cpu [--label after] [--repeats 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
DEVICE = "cuda"  # "cpu" only with --smoke
HEADING = "## Kernels: retrieval, expert mixing, layer step (bench_kernels.py)"


def _versions() -> str:
    import peer_ll

    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    parts.append(f"peer_ll from {Path(peer_ll.__file__).parent.parent.name or '.'}")
    return ", ".join(parts)


def _machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


def record(block: str, out: str | None, write: bool) -> None:
    """Print ``block``; write it to ``out``; append it under HEADING in RESULTS.md."""
    print(block)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(block + "\n")
    if not write:
        return
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in text:
        text = text.rstrip("\n") + f"\n\n{HEADING}\n"
    start = text.index(HEADING) + len(HEADING)
    nxt = text.find("\n## ", start)
    end = len(text) if nxt < 0 else nxt
    text = text[:end].rstrip("\n") + "\n\n" + block.strip("\n") + "\n" + text[end:]
    RESULTS.write_text(text)


# ----------------------------------------------------------------------------- CPU
def cpu_bench(repeats: int) -> list[tuple[str, float]]:
    from peer_ll.experts import PEER
    from peer_ll.optim import make_optimizer

    torch.manual_seed(0)
    layer = PEER(256, num_keys=256, heads=8, topk=16, dim_key=128, backend="torch")
    opt = make_optimizer(layer, lr=1e-3)
    x = torch.randn(2048, 256)

    def step():
        opt.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        opt.step()

    def forward():
        with torch.no_grad():
            layer(x)

    rows = []
    for name, fn in (("training step", step), ("forward", forward)):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        rows.append((name, statistics.median(times) * 1e3))
    return rows


# ----------------------------------------------------------------------------- GPU
def copy_bandwidth(bench) -> tuple[float, float]:
    """(ms, GB/s) of a 512 MiB device-to-device copy, counting read + write."""
    src = torch.empty(1 << (28 if DEVICE == "cuda" else 20), dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    return ms, 2 * src.numel() * 2 / ms / 1e6


def retrieval_bench(T, H, K, dk, n, bench) -> list[tuple[str, str, float, str]]:
    from peer_ll.kernels import reference
    from peer_ll.kernels.product_topk import product_topk

    q = torch.randn(T, H, dk, device=DEVICE, dtype=torch.bfloat16)
    keys = (torch.randn(n, 2, dk // 2, device=DEVICE) / 8).to(torch.bfloat16)
    segs = torch.tensor([[0, n, n, 0]], device=DEVICE)
    cases = {
        # select="extract" runs in the interpreter only (it does not compile for a GPU)
        "triton bitonic": lambda: product_topk(q, keys, segs, K, backend="triton"),
        "torch reference": lambda: reference.product_topk(q, keys, segs, K),
    }
    return [("retrieval", name, bench(fn), "") for name, fn in cases.items()]


def mix_bench(T, D, H, K, N, copy_bw, bench) -> list[tuple[str, str, float, str]]:
    from peer_ll.kernels.expert_mix import expert_mix

    dev, bf16, M = DEVICE, torch.bfloat16, H * K
    x = torch.randn(T, D, device=dev, dtype=bf16, requires_grad=True)
    ids = torch.randint(0, N, (T, H, K), device=dev)
    gates = torch.rand(T, H, K, device=dev, dtype=bf16, requires_grad=True)
    down = (torch.randn(N, D, device=dev) / 32).to(bf16).requires_grad_()
    up = (torch.randn(N, D, device=dev) / 32).to(bf16).requires_grad_()
    dy = torch.randn(T, D, device=dev, dtype=bf16)
    # Floor: every gathered row read once, plus x, ids, gates read and out written.
    floor_bytes = T * M * 2 * D * 2 + 2 * T * D * 2 + T * M * (8 + 2)
    floor_ms = floor_bytes / copy_bw / 1e6
    rows = [("mix forward", "bandwidth floor", floor_ms, f"{floor_bytes / 1e9:.2f} GB moved")]
    for backend in ("triton", "torch"):

        def fwd(backend=backend):
            with torch.no_grad():
                return expert_mix(x, ids, gates, down, up, backend=backend)

        ms = bench(fwd)
        rows.append(
            (
                "mix forward",
                backend,
                ms,
                f"{floor_bytes / ms / 1e6:.0f} GB/s, {ms / floor_ms:.2f}x floor",
            )
        )
    for backend, det in (("triton", True), ("triton", False), ("torch", True)):

        def fwd_bwd(backend=backend, det=det):
            out = expert_mix(x, ids, gates, down, up, backend=backend, deterministic=det)
            torch.autograd.grad(out, (x, gates, down, up), dy)

        name = backend if backend == "torch" else f"triton {'sorted' if det else 'atomic'}"
        rows.append(("mix fwd+bwd", name, bench(fwd_bwd), ""))
    return rows


def _wall_clock(fn, repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def gpu_bench(tokens: int, smoke: bool = False) -> list[tuple[str, str, float, str]]:
    """Rows (what, provider, median ms, note); ``smoke``: tiny sizes, CPU, wall clock."""
    T, D, H, K, dk, n = tokens, 1024, 8, 16, 128, 1024
    if smoke:
        T, D, H, K, dk, n = 8, 32, 2, 4, 32, 16
        bench = _wall_clock
    else:
        from triton.testing import do_bench

        def bench(fn):
            return do_bench(fn, warmup=25, rep=200, return_mode="median")

    torch.manual_seed(0)

    copy_ms, copy_bw = copy_bandwidth(bench)
    rows = [("d2d copy 512 MiB", "torch", copy_ms, f"{copy_bw:.0f} GB/s")]
    rows += retrieval_bench(T, H, K, dk, n, bench)
    torch.cuda.empty_cache()
    rows += mix_bench(T, D, H, K, n * n, copy_bw, bench)
    torch.cuda.empty_cache()
    rows += layer_bench(T, D, H, K, dk, n, bench)
    return rows


def _peak(dev) -> str:
    """Peak device memory since the last reset, as a note (empty on CPU)."""
    if dev != "cuda":
        return ""
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return f"peak {peak:.1f} GiB"


def layer_bench(T, D, H, K, dk, n, bench) -> list[tuple[str, str, float, str]]:
    """The whole layer: peer_ll (Triton, torch reference) and peer-pytorch, with peaks."""
    dev, bf16 = DEVICE, torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=bf16, requires_grad=True)
    dy = torch.randn(T, D, device=dev, dtype=bf16)
    rows = _peer_ll_layer(x, dy, H, K, dk, n, bench)  # its pool is freed on return
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows + _lucid_layer(x, dy, H, K, dk, n, bench)


def _peer_ll_layer(x, dy, H, K, dk, n, bench):
    from peer_ll.experts import PEER
    from peer_ll.optim import make_optimizer

    dev, rows = DEVICE, []
    torch.manual_seed(0)
    with torch.device(dev):  # build the 1024² pool on the device, not on the host
        layer = PEER(x.shape[1], num_keys=n, heads=H, topk=K, dim_key=dk).to(x.dtype)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for backend in ("triton", "torch"):
        layer.backend = backend

        def fwd_bwd():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).backward(dy)

        rows.append(("layer fwd+bwd", backend, bench(fwd_bwd), _peak(dev)))
        opt = make_optimizer(layer, lr=1e-4, backend="auto" if backend == "triton" else "torch")

        def step(opt=opt):
            opt.zero_grad(set_to_none=True)
            layer(x).backward(dy)
            opt.step()

        rows.append(
            (
                "layer train step",
                backend,
                bench(step),
                f"SparseAdamW ({opt.backend} rows), {_peak(dev)}",
            )
        )
        del opt
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    return rows


def _lucid_layer(x, dy, H, K, dk, n, bench):
    from PEER_pytorch import PEER as LucidPEER

    dev, (T, D) = DEVICE, x.shape
    # peer-pytorch with the paper's semantics: softmax over 16 experts per head; its
    # dim_key is the size of one half, so 64 here matches dim_key = 128.
    with torch.device(dev):
        lucid = LucidPEER(
            D,
            heads=H,
            num_experts=n * n,
            num_experts_per_head=K,
            dim_key=dk // 2,
            non_competing_scores=False,
        ).to(x.dtype)
    x3, dy3 = x.detach().view(1, T, D).requires_grad_(), dy.view(1, T, D)

    def lucid_fb():
        lucid.zero_grad(set_to_none=True)
        x3.grad = None
        lucid(x3).backward(dy3)

    rows = [("layer fwd+bwd", "peer-pytorch", bench(lucid_fb), f"dense table grads, {_peak(dev)}")]
    lucid_opt = torch.optim.Adam(lucid.parameters(), lr=1e-4)

    def lucid_step():
        lucid_opt.zero_grad(set_to_none=True)
        lucid(x3).backward(dy3)
        lucid_opt.step()

    rows.append(
        ("layer train step", "peer-pytorch", bench(lucid_step), f"torch.optim.Adam, {_peak(dev)}")
    )
    return rows


def gpu_table(rows) -> str:
    base = {}
    for what, provider, ms, _ in rows:
        if provider in ("torch", "torch reference", "peer-pytorch"):
            base.setdefault(what, {})[provider] = ms
    lines = [
        "| what | provider | median ms | vs torch | vs peer-pytorch | note |",
        "|---|---|---|---|---|---|",
    ]
    for what, provider, ms, note in rows:
        b = base.get(what, {})
        torch_ms = b.get("torch", b.get("torch reference"))
        measured = provider not in ("torch", "bandwidth floor") and what != "d2d copy 512 MiB"
        vs_t = f"{torch_ms / ms:.2f}x" if torch_ms and measured else "—"
        vs_l = f"{b['peer-pytorch'] / ms:.2f}x" if "peer-pytorch" in b and measured else "—"
        lines.append(f"| {what} | {provider} | {ms:.3f} | {vs_t} | {vs_l} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU layer step instead")
    parser.add_argument("--tokens", type=int, default=16384, help="GPU setting: tokens")
    parser.add_argument("--repeats", type=int, default=7, help="CPU setting: repeats")
    parser.add_argument("--label", default="", help="CPU setting: a name for this code state")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="check this script: tiny GPU setting on CPU (TRITON_INTERPRET=1)",
    )
    args = parser.parse_args()
    if args.smoke:  # before anything imports Triton
        os.environ.setdefault("TRITON_INTERPRET", "1")
    command = shlex.join(["python", "benchmarks/bench_kernels.py", *sys.argv[1:]])
    stamp = f"`{command.strip()}` — {datetime.date.today()}, {_machine()}, {_versions()}."
    if args.cpu:
        torch.set_num_threads(os.cpu_count() or 1)
        rows = cpu_bench(args.repeats)
        label = args.label or "this tree"
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        lines = [
            f"CPU layer (dim 256, 256² experts, 2048 tokens, torch path), {label} "
            f"(load average {load} after the run):"
        ]
        lines += [f"- {name}: {ms:.0f} ms (median of {args.repeats})" for name, ms in rows]
        record(stamp + "\n\n" + "\n".join(lines), args.out, not args.no_write)
        return
    if args.smoke:
        global DEVICE
        DEVICE = "cpu"
        print(gpu_table(gpu_bench(args.tokens, smoke=True)))
        return
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA device (or pass --cpu)")
    rows = gpu_bench(args.tokens)
    setting = (
        f"GPU setting: N = 1024², dim 1024, bf16, heads 8, topk 16, dim_key 128, "
        f"{args.tokens} tokens; do_bench medians."
    )
    record(stamp + " " + setting + "\n\n" + gpu_table(rows), args.out, not args.no_write)


if __name__ == "__main__":
    main()

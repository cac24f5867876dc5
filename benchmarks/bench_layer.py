"""CPU speed and memory of one PEER layer as the pool grows, against baselines.

Setting (issue "PEER layer with a growable expert pool"): dim=256, heads=8, topk=16,
dim_key=128, 2048 tokens, pools of 128², 256², 512² and 1024² experts. For each pool it
measures the forward time, a full training step (forward, backward, optimizer) and the
peak memory of the process, for:

- ``peer_ll``: this package's PEER with ``make_optimizer`` (lazy Adam, fp32 moments);
- ``peer_ll_bf16``: the same with bf16 Adam moments for the expert tables;
- ``peer_pytorch``: the PyPI package peer-pytorch 0.2.2 with the paper's semantics
  (non_competing_scores=False, heads=8, num_experts_per_head=16, dim_key=128) and
  ``torch.optim.Adam``;
- ``dense_ffn``: a dense FFN with the same active parameters per token (hidden =
  heads·topk = 128) and ``torch.optim.Adam``.

Each (provider, pool) runs in a fresh subprocess, so peak RSS is its own. Times are
medians over repeats; figures that matter are the ratios within this run.

Usage:
    python benchmarks/bench_layer.py [--sizes 128 256 512 1024] [--tokens 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM, HEADS, TOPK, DIM_KEY = 256, 8, 16, 128
PROVIDERS = ("peer_ll", "peer_ll_bf16", "peer_pytorch", "dense_ffn")
RESULTS = Path(__file__).with_name("RESULTS.md")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _build(provider: str, keys: int):
    import torch
    from torch import nn

    if provider.startswith("peer_ll"):
        from peer_ll.experts import PEER
        from peer_ll.optim import make_optimizer

        model = PEER(DIM, num_keys=keys, heads=HEADS, topk=TOPK, dim_key=DIM_KEY)
        dtype = torch.bfloat16 if provider == "peer_ll_bf16" else None
        return model, make_optimizer(model, lr=1e-3, expert_state_dtype=dtype)
    if provider == "peer_pytorch":
        from PEER_pytorch import PEER as LucidPEER

        model = LucidPEER(
            DIM, heads=HEADS, num_experts=keys * keys, num_experts_per_head=TOPK,
            dim_key=DIM_KEY, non_competing_scores=False,
        )
        return model, torch.optim.Adam(model.parameters(), lr=1e-3)
    hidden = HEADS * TOPK
    model = nn.Sequential(nn.Linear(DIM, hidden), nn.GELU(), nn.Linear(hidden, DIM))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def worker(provider: str, keys: int, tokens: int, repeats: int) -> dict:
    """Measure one (provider, pool) in this process."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model, opt = _build(provider, keys)
    x = torch.randn(1, tokens, DIM)  # peer-pytorch wants (batch, seq, dim)
    rss_before = _rss_kib("VmRSS")

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def forward():
        with torch.no_grad():
            model(x)

    timings = {}
    for name, fn in (("step", step), ("forward", forward)):
        fn()  # warm-up (and optimizer state allocation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        timings[name] = statistics.median(times)
    params = sum(p.numel() for p in model.parameters())
    return {
        "provider": provider, "experts": keys * keys, "forward_s": timings["forward"],
        "step_s": timings["step"], "peak_rss_mib": _rss_kib("VmHWM") / 1024,
        "model_rss_mib": rss_before / 1024, "params": params,
    }


def run(provider: str, keys: int, tokens: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", provider, str(keys),
           "--tokens", str(tokens), "--repeats", str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"provider": provider, "experts": keys * keys, "error": out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict], sizes: list[int]) -> str:
    by = {(r["provider"], r["experts"]): r for r in rows}
    lines = [
        "| experts | provider | forward (s) | step (s) | peak RSS (MiB) | step vs peer-pytorch "
        "| peak RSS vs peer-pytorch | step vs own 128²-step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for keys in sizes:
        n = keys * keys
        base = by.get(("peer_pytorch", n), {})
        for provider in PROVIDERS:
            r = by.get((provider, n))
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {keys}² | {provider} | failed: {r['error'][-80:]!r} | | | | | |")
                continue
            small = by.get((provider, sizes[0] ** 2), {})
            speed = (f"{base['step_s'] / r['step_s']:.1f}× faster"
                     if "step_s" in base else "—")
            mem = (f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}×"
                   if "peak_rss_mib" in base else "—")
            growth = f"{r['step_s'] / small['step_s']:.2f}×" if "step_s" in small else "—"
            lines.append(
                f"| {keys}² | {provider} | {r['forward_s']:.3f} | {r['step_s']:.3f} | "
                f"{r['peak_rss_mib']:.0f} | {speed} | {mem} | {growth} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024],
                        help="sub-keys per side; the pool holds size² experts")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--worker", nargs=2, metavar=("PROVIDER", "KEYS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        provider, keys = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(provider, keys, args.tokens, args.repeats)))
        return
    from tqdm import tqdm

    jobs = [(p, k) for k in args.sizes for p in args.providers
            if not (p == "dense_ffn" and k != args.sizes[0])]
    rows = [run(p, k, args.tokens, args.repeats) for p, k in tqdm(jobs, desc="bench_layer")]
    dense = next((r for r in rows if r["provider"] == "dense_ffn" and "step_s" in r), None)
    if dense is not None:  # a dense FFN does not depend on the pool size
        rows += [dict(dense, experts=k * k) for k in args.sizes[1:]]
    text = table(rows, args.sizes)
    print(text)
    if not args.no_write:
        import torch

        command = "python benchmarks/bench_layer.py " + " ".join(sys.argv[1:])
        header = (
            f"\n## PEER layer on CPU (bench_layer.py)\n\n`{command.strip()}` — "
            f"{datetime.date.today()}, {os.cpu_count()} CPU cores, no GPU, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"{args.tokens} tokens, dim={DIM}, heads={HEADS}, topk={TOPK}, dim_key={DIM_KEY}, "
            f"median of {args.repeats}.\n\n"
        )
        with RESULTS.open("a") as f:
            f.write(header + text + "\n")


if __name__ == "__main__":
    main()

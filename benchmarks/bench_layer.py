"""CPU training step of one PEER layer against its memory floor and against peer-pytorch.

Setting (paper defaults for the pool): dim 256, 1024² experts, heads 8, topk 16, dim_key
128, 1024 tokens, ``make_optimizer``. Each (provider, threads) runs in a fresh
subprocess, so peak RSS is its own. Each measures, as medians over repeats:

- the training step (forward, backward, optimizer step);
- a decoding step: one token (batch 1), no gradient, the latency a server sees;
- the peak RSS of the process, beside the least it could be: the RSS of the runtime
  (interpreter, torch, the provider's code) before the layer is built, plus the bytes of
  parameters, buffers and optimizer state that training must keep.

For ``peer_ll`` the same process also measures the machine's copy bandwidth (a
256 MiB ``copy_``, read + write bytes) and counts the step's retrievals A and distinct
touched rows R, so the memory floor of the step comes from the same run:

    floor = (6·A + 14·R) · dim · 4 bytes / copy bandwidth

(forward and backward read about 6 rows per retrieval; lazy Adam reads p, g, m, v and
writes p, m, v of each touched row of two tables). Beside it the same bytes are priced
at the bandwidth of gathering A random rows of the expert table (``index_select``), what
a step's scattered 1 KiB rows can reach on the machine; the goal is stated against the
copy floor. With one thread the step and the copy
are also timed by the process's CPU time, which a loaded, shared machine inflates much
less than the wall clock. Every provider's process keeps large freed blocks for reuse
(``peer_ll.kernels.memory.retain_freed_memory``; ``--default-malloc`` leaves glibc as it
is). Providers:

- ``peer_ll``: this package (lazy AdamW in place, fp32 moments);
- ``peer_ll_bf16``: the same with bf16 moments for the expert tables;
- ``peer_ll_gather``: the optimizer's gather/update/scatter torch path (the old one);
- ``peer_pytorch``: peer-pytorch 0.2.2 with the paper's semantics and ``torch.optim.Adam``.

Usage:
    python benchmarks/bench_layer.py [--keys 1024] [--tokens 1024] [--threads 1 2]
        [--repeats 5] [--providers ...] [--default-malloc] [--no-write]
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

DIM, HEADS, TOPK, DIM_KEY = 256, 8, 16, 128  # paper: h = 8, k = 16
PROVIDERS = ("peer_ll", "peer_ll_bf16", "peer_ll_gather", "peer_pytorch")
RESULTS = Path(__file__).with_name("RESULTS.md")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _build(provider: str, keys: int):
    import torch

    if provider.startswith("peer_ll"):
        from peer_ll.experts import PEER
        from peer_ll.optim import make_optimizer

        model = PEER(DIM, num_keys=keys, heads=HEADS, topk=TOPK, dim_key=DIM_KEY)
        dtype = torch.bfloat16 if provider == "peer_ll_bf16" else None
        backend = "torch" if provider == "peer_ll_gather" else "auto"
        return model, make_optimizer(model, lr=1e-3, expert_state_dtype=dtype, backend=backend)
    from PEER_pytorch import PEER as LucidPEER

    model = LucidPEER(
        DIM,
        heads=HEADS,
        num_experts=keys * keys,
        num_experts_per_head=TOPK,
        dim_key=DIM_KEY,
        non_competing_scores=False,
    )
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def _state_bytes(model, opt) -> int:
    """Bytes of what a training run must keep: parameters, buffers, optimizer state."""
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def _median_time(fn, repeats: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def copy_bandwidth(mib: int = 256, repeats: int = 5, clock=time.perf_counter) -> float:
    """Bytes moved per second (read + write) by a large ``copy_``, median of repeats."""
    import torch

    src = torch.ones(mib << 18)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), repeats, clock)


def gather_bandwidth(table, rows: int, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) gathering ``rows`` random rows of ``table``."""
    import torch

    idx = torch.randint(0, table.shape[0], (rows,), generator=torch.Generator().manual_seed(0))
    out = table.new_empty(rows, table.shape[1])
    torch.index_select(table, 0, idx, out=out)
    moved = 2 * out.numel() * out.element_size()
    return moved / _median_time(lambda: torch.index_select(table, 0, idx, out=out), repeats)


def worker(provider: str, keys: int, tokens: int, threads: int, repeats: int, retain: bool) -> dict:
    """Measure one (provider, threads) in this process."""
    import torch

    from peer_ll.kernels.memory import retain_freed_memory

    if retain:  # every provider alike: a process-wide allocator setting
        retain_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    if provider == "peer_pytorch":
        import PEER_pytorch  # noqa: F401  (its import is runtime, not the layer's memory)
    runtime_kib = _rss_kib("VmRSS")  # interpreter, torch and the provider's code
    model, opt = _build(provider, keys)
    x = torch.randn(1, tokens, DIM)  # peer-pytorch wants (batch, seq, dim)
    one = torch.randn(1, 1, DIM)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    def decode():
        with torch.no_grad():
            model(one)

    step()  # warm-up and optimizer state
    step()
    row = {"provider": provider, "threads": threads, "step_s": _median_time(step, repeats)}
    if threads == 1:  # CPU time: what the step costs on a shared, loaded machine
        row["step_cpu_s"] = _median_time(step, repeats, time.process_time)
    model.eval()  # serving: BatchNorm uses its running statistics
    decode()
    row["decode_s"] = _median_time(decode, 20 * repeats)
    model.train()
    row["peak_rss_mib"] = _rss_kib("VmHWM") / 1024
    row["runtime_rss_mib"] = runtime_kib / 1024
    row["state_mib"] = _state_bytes(model, opt) / 2**20
    if provider.startswith("peer_ll"):
        with torch.no_grad():
            _, ids = model.retrieve(x.view(-1, DIM))  # train mode, as in the step
        row["A"], row["R"] = ids.numel(), int(torch.unique(ids).numel())
        row["bandwidth"] = copy_bandwidth()
        row["floor_s"] = (6 * row["A"] + 14 * row["R"]) * DIM * 4 / row["bandwidth"]
        row["gather_bandwidth"] = gather_bandwidth(model.down.detach(), row["A"])
        row["floor_rows_s"] = row["floor_s"] * row["bandwidth"] / row["gather_bandwidth"]
        if threads == 1:
            row["bandwidth_cpu"] = copy_bandwidth(clock=time.process_time)
            row["floor_cpu_s"] = row["floor_s"] * row["bandwidth"] / row["bandwidth_cpu"]
    return row


def run(provider: str, keys: int, tokens: int, threads: int, repeats: int, retain: bool) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        provider,
        str(threads),
        "--keys",
        str(keys),
        "--tokens",
        str(tokens),
        "--repeats",
        str(repeats),
        *([] if retain else ["--default-malloc"]),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        return {"provider": provider, "threads": threads, "error": out.stderr[-300:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| threads | provider | step (ms) | step / floor | peer-pytorch step / step "
        "| peak RSS (MiB) | RSS / peer-pytorch's | decode 1 token (ms) "
        "| peer-pytorch decode / decode | step, CPU time (ms) | CPU step / CPU floor "
        "| peer-pytorch CPU step / CPU step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by = {(r["provider"], r["threads"]): r for r in rows}
    for threads in sorted({r["threads"] for r in rows}):
        base = by.get(("peer_pytorch", threads), {})
        floor = by.get(("peer_ll", threads), {}).get("floor_s")
        floor_cpu = by.get(("peer_ll", threads), {}).get("floor_cpu_s")
        for provider in PROVIDERS:
            r = by.get((provider, threads))
            if r is None:
                continue
            if "error" in r:
                lines.append(
                    f"| {threads} | {provider} | failed: {r['error'][-80:]!r} | | | | | | | | | |"
                )
                continue
            ratio = lambda a, b, f: f.format(a / b) if a and b else "—"  # noqa: E731
            cpu = f"{r['step_cpu_s'] * 1e3:.0f}" if "step_cpu_s" in r else "—"
            lines.append(
                f"| {threads} | {provider} | {r['step_s'] * 1e3:.0f} "
                f"| {ratio(r['step_s'], floor, '{:.2f}×')} "
                f"| {ratio(base.get('step_s'), r['step_s'], '{:.1f}×')} "
                f"| {r['peak_rss_mib']:.0f} "
                f"| {ratio(r['peak_rss_mib'], base.get('peak_rss_mib'), '{:.2f}×')} "
                f"| {r['decode_s'] * 1e3:.2f} "
                f"| {ratio(base.get('decode_s'), r['decode_s'], '{:.1f}×')} | {cpu} "
                f"| {ratio(r.get('step_cpu_s'), floor_cpu, '{:.2f}×')} "
                f"| {ratio(base.get('step_cpu_s'), r.get('step_cpu_s'), '{:.1f}×')} |"
            )
    return "\n".join(lines)


def floors(rows: list[dict]) -> str:
    out = []
    for r in rows:
        if r.get("provider") == "peer_ll" and "floor_s" in r:
            out.append(
                f"- {r['threads']} thread(s): A = {r['A']:,} retrievals, R = {r['R']:,} distinct "
                f"rows, copy bandwidth {r['bandwidth'] / 1e9:.1f} GB/s, floor "
                f"**{r['floor_s'] * 1e3:.0f} ms**; at the bandwidth of gathering A random rows "
                f"of a table ({r['gather_bandwidth'] / 1e9:.1f} GB/s) it would be "
                f"{r['floor_rows_s'] * 1e3:.0f} ms (step / that: "
                f"{r['step_s'] / r['floor_rows_s']:.2f}×)"
                + (
                    f"; by CPU time, copy bandwidth {r['bandwidth_cpu'] / 1e9:.1f} GB/s, floor "
                    f"**{r['floor_cpu_s'] * 1e3:.0f} ms**."
                    if "floor_cpu_s" in r
                    else "."
                )
            )
    return "\n".join(out)


def memory_floor(rows: list[dict]) -> str:
    """Each provider's peak RSS against the least it could be: runtime plus kept state."""
    out = []
    by = {(r["provider"], r["threads"]): r for r in rows if "state_mib" in r}
    for (provider, threads), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        base = by.get(("peer_pytorch", threads))
        if threads != min(t for _, t in by) or base is None:
            continue
        least = r["runtime_rss_mib"] + r["state_mib"]
        out.append(
            f"- {provider}: runtime {r['runtime_rss_mib']:.0f} MiB + parameters, buffers and "
            f"optimizer state {r['state_mib']:.0f} MiB = {least:.0f} MiB, "
            f"**{least / base['peak_rss_mib']:.2f}× peer-pytorch's peak** "
            f"({base['peak_rss_mib']:.0f} MiB); the step's transients add "
            f"{r['peak_rss_mib'] - least:.0f} MiB (peak {r['peak_rss_mib']:.0f} MiB, "
            f"{r['peak_rss_mib'] / base['peak_rss_mib']:.2f}×)."
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=1024, help="sub-keys per side (keys² experts)")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's malloc as it is (default: every provider's process keeps freed "
        "blocks for reuse, peer_ll.kernels.memory.retain_freed_memory)",
    )
    parser.add_argument(
        "--worker", nargs=2, metavar=("PROVIDER", "THREADS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        row = worker(
            args.worker[0],
            args.keys,
            args.tokens,
            int(args.worker[1]),
            args.repeats,
            not args.default_malloc,
        )
        print(json.dumps(row))
        return
    from tqdm import tqdm

    jobs = [(p, t) for t in args.threads for p in args.providers]
    retain = not args.default_malloc
    rows = [run(p, args.keys, args.tokens, t, args.repeats, retain) for p, t in tqdm(jobs)]
    text = table(rows) + "\n\nFloor of the step, measured in the same run:\n\n" + floors(rows)
    memory = memory_floor(rows)
    if memory:
        text += "\n\nLeast peak memory (runtime RSS before the layer is built, plus state):\n\n"
        text += memory
    print(text)
    if not args.no_write:
        import torch

        command = "python benchmarks/bench_layer.py " + " ".join(sys.argv[1:])
        header = (
            f"### Run of {datetime.date.today()}\n\n`{command.strip()}` — "
            f"{os.cpu_count()} CPU cores, no GPU, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {args.keys}² experts, {args.tokens} tokens, "
            f"dim={DIM}, heads={HEADS}, topk={TOPK}, dim_key={DIM_KEY}, median of "
            f"{args.repeats} steps (decode: of {20 * args.repeats}).\n\n"
        )
        from peer_ll.cli.results import write_section

        write_section(RESULTS, "## PEER layer on CPU (bench_layer.py)", header + text)


if __name__ == "__main__":
    main()

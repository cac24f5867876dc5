"""``peer-ll lm --base hf-gpt2``: PEER experts vs PEFT's LoRA vs full finetuning on a HF GPT-2.

1. Build a Hugging Face ``GPT2LMHeadModel`` from a ``GPT2Config`` (no hub; byte
   tokens, ``--dim``/``--layers``, context ``--block-size``) and train it on the
   first domain (``--steps-first`` steps at ``--lr-first``).
2. Every method of :mod:`peer_ll.cli.hf_lm_methods` starts from that model and
   learns the later domains in order, ``--steps`` steps each at ``--lr`` (equal
   steps): full finetuning, LoRA with its rank chosen to train as many
   parameters per domain as the PEER experts do (equal trainable parameters),
   and PEER experts (``--grow-keys``² experts per block and domain), with and
   without per-domain low-rank deltas on the attention projections.
3. After each domain, each method's modes are evaluated on every domain's test
   blocks (perplexity matrix R). The PEER model's experts are saved
   (adapter-only) and reloaded in a new process, which must give the same
   perplexities bit for bit; its base route must give the base model's logits
   bit for bit.

The run folder holds ``results.json`` and ``table.txt``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from peer_ll.cli import hf_lm_methods as hm

TINY = dict(dim=32, layers=2, block_size=32)


def gpt2(vocab_size: int, *, dim: int, layers: int, block_size: int):
    """A GPT-2 built from a config (no hub), without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=block_size,
        n_embd=dim,
        n_layer=layers,
        n_head=max(1, dim // 32),
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
    )
    return GPT2LMHeadModel(config).eval()


def lora_rank(base, target: float) -> int:
    """The LoRA rank whose trainable parameters per domain come closest to ``target``."""
    probe = hm.LoRA(base, {"lora_rank": 1})
    per_rank = hm.trainable(probe.model)
    return max(1, round(target / per_rank))


def main(args) -> int:
    import transformers

    from peer_ll.cli.lm_train import load_blocks
    from peer_ll.data.text import TEXT_VOCAB_SIZE

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shape = (
        TINY if args.tiny else dict(dim=args.dim, layers=args.layers, block_size=args.block_size)
    )
    if args.tiny:
        args.max_bytes, args.eval_blocks = min(args.max_bytes, 60_000), min(args.eval_blocks, 8)
        args.block_size, args.grow_keys = TINY["block_size"], min(args.grow_keys, 8)
    blocks = load_blocks(args)
    names = list(blocks)
    tests = [blocks[n]["test"] for n in names]
    out = Path(args.out or f"runs/lm-hf-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)

    base = gpt2(TEXT_VOCAB_SIZE, **shape)
    base.requires_grad_(True)
    first_seconds = hm.train_route(
        base,
        lambda x: base(input_ids=x).logits,
        blocks[names[0]]["train"],
        steps=args.steps_first,
        batch_size=args.batch_size,
        lr=args.lr_first,
        seed=args.seed,
    )
    first_row = [hm.perplexity(lambda x: base(input_ids=x).logits, t) for t in tests]

    settings = {"num_keys": args.grow_keys}
    records = {}
    for key in ("peer", "peer-experts-only", "full", "lora"):  # LoRA matches PEER's count
        if key == "lora":
            peer_counts = records["peer"]["trainable"]
            settings["lora_rank"] = lora_rank(base, sum(peer_counts) / len(peer_counts))
        records[key] = run_method(
            hm.METHODS[key](base, settings), names, blocks, tests, first_row, args
        )
    peer = records["peer"]["method"]
    with torch.no_grad():
        x = tests[0][:, :-1]
        bit_identical = torch.equal(
            peer.model(input_ids=x, owners=0).logits, base(input_ids=x).logits
        )
    results = summarize(names, first_row, first_seconds, records, args)
    results["base_bit_identical"] = bit_identical
    results["reload"] = reload_check(peer, base, tests, records["peer"]["R"], out)
    text = table(results)
    print(text)
    (out / "table.txt").write_text(text + "\n")
    with open(out / "results.json", "w") as f:
        json.dump(results, f, indent=1)
    print(f"run folder: {os.fspath(out)}")
    return 0 if results["reload"]["identical"] and bit_identical else 1


def run_method(method, names, blocks, tests, first_row, args) -> dict:
    """Learn domains 1..T-1; R[mode] rows after each, training seconds and tokens."""
    R = {mode: [list(first_row)] for mode in method.modes}
    seconds, tokens = 0.0, 0
    for t in range(1, len(names)):

        def train(model, route, t=t):
            return hm.train_route(
                model,
                route,
                blocks[names[t]]["train"],
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed + t,
            )

        seconds += method.learn(t, blocks[names[t]]["train"], train)
        tokens += args.steps * args.batch_size * args.block_size
        for mode in method.modes:
            R[mode].append(
                [hm.perplexity(method.routes(mode, j), test) for j, test in enumerate(tests)]
            )
    return {
        "method": method,
        "R": R,
        "trainable": method.trainable,
        "added": method.added,
        "tokens_per_s": tokens / seconds if seconds else float("nan"),
    }


def summarize(names, first_row, first_seconds, records, args) -> dict:
    """Forgetting of the first domain and gain per later domain as a share of full's."""
    full = records["full"]["R"]["full finetuning"]
    full_gain = [first_row[t] - full[t][t] for t in range(1, len(names))]
    rows = {}
    for rec in records.values():
        for mode, R in rec["R"].items():
            gain = [first_row[t] - R[t][t] for t in range(1, len(names))]
            rows[mode] = {
                "R": R,
                "base_change": R[-1][0] / first_row[0] - 1,
                "gain_vs_full": [
                    g / f if f > 0 else float("nan") for g, f in zip(gain, full_gain, strict=True)
                ],
                "trainable_per_domain": rec["trainable"],
                "added": rec["added"],
                "tokens_per_s": rec["tokens_per_s"],
            }
    return {
        "domains": names,
        "first_row": first_row,
        "first_seconds": first_seconds,
        "lora_rank": records["lora"]["method"].rank,
        "rows": rows,
        "args": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"
        },
    }


RELOAD = """
import json, sys, torch
from peer_ll.adapters import ExpertsModel
from peer_ll.cli import hf_lm_methods as hm
from transformers import GPT2LMHeadModel
folder = sys.argv[1]
torch.set_num_threads(int(sys.argv[2]))  # the parent's: same reduction order, same bits
model = ExpertsModel.from_pretrained(GPT2LMHeadModel.from_pretrained(folder + "/base"),
                                     folder + "/experts")
tests = torch.load(folder + "/tests.pt")
known = [hm.perplexity(lambda x, j=j: model(input_ids=x, owners=j).logits, t)
         for j, t in enumerate(tests)]
infer = [hm.perplexity(lambda x: model(input_ids=x, owners="infer").logits, t) for t in tests]
print(json.dumps({"known": known, "infer": infer}))
"""


def reload_check(peer, base, tests, R, out: Path) -> dict:
    """Save the PEER experts (adapter only) and the base; reload both in a new process."""
    folder = out / "checkpoints"
    base.save_pretrained(folder / "base")
    peer.model.save_pretrained(folder / "experts")
    torch.save(tests, folder / "tests.pt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    threads = str(torch.get_num_threads())
    done = subprocess.run(
        [sys.executable, "-c", RELOAD, os.fspath(folder), threads],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    got = json.loads(done.stdout.strip().splitlines()[-1])
    known, infer = peer.modes
    want = {"known": R[known][-1], "infer": R[infer][-1]}
    return {
        "identical": got == want,
        "reloaded": got,
        "expected": want,
        "adapter_bytes": (folder / "experts" / "adapter_model.safetensors").stat().st_size,
    }


def table(results: dict) -> str:
    names = results["domains"]
    head = ["method", f"{names[0]} end (change)"]
    head += [f"{n} (gain/full)" for n in names[1:]]
    head += ["trainable/domain", "added", "train tok/s"]
    lines = []
    for mode, row in results["rows"].items():
        R = row["R"]
        cells = [mode, f"{R[-1][0]:.3f} ({100 * row['base_change']:+.1f}%)"]
        for t in range(1, len(names)):
            cells.append(
                f"{results['first_row'][t]:.3f}→{R[t][t]:.3f} "
                f"({100 * row['gain_vs_full'][t - 1]:.0f}%)"
            )
        per = row["trainable_per_domain"]
        cells += [
            f"{round(sum(per) / len(per)):,}",
            f"{row['added']:,}",
            f"{row['tokens_per_s']:,.0f}",
        ]
        lines.append(cells)
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(len(head))]
    fmt = " | ".join(f"{{:{w}}}" for w in widths)
    text = [fmt.format(*head), "-+-".join("-" * w for w in widths)]
    text += [fmt.format(*r) for r in lines]
    reload = results["reload"]
    text += [
        "",
        f"columns: test perplexity; '{names[0]} end': after the last domain (change from the "
        "base model); later domains: base model → right after training on that domain "
        "(gain as a share of full finetuning's); trainable/domain: mean parameters trained "
        "per domain; added: parameters added in all",
        f"base model: {names[0]} for {results['args']['steps_first']} steps "
        f"({results['first_seconds']:.0f} s); LoRA rank {results['lora_rank']} "
        "(closest to PEER's trainable parameters per domain)",
        f"PEER, base domain known: logits bit-identical to the base model: "
        f"{results['base_bit_identical']}",
        f"PEER adapter-only checkpoint ({reload['adapter_bytes']:,} bytes) reloaded in a new "
        f"process: perplexities identical: {reload['identical']}",
    ]
    return "\n".join(text)

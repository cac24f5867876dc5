"""Benchmark: PEER experts added to a Hugging Face GPT-2, against PEFT's LoRA and full finetuning.

Runs ``peer-ll lm --base hf-gpt2`` (``peer_ll.cli.hf_lm``) on the three built-in
domains, python-stdlib (the base model's) → pydoc-topics → unicode-names, byte
tokens, with the settings below written out so that the record names them; prints
its table and appends it to ``benchmarks/RESULTS.md`` under its own heading
(``--no-append`` to skip). Every method starts from the same GPT-2 trained here on
python-stdlib and trains the same number of steps per domain; LoRA's rank makes
its trainable parameters per domain those of the PEER experts.

    python benchmarks/hf_adapters.py              # about 10 minutes on 2 CPU cores
    python benchmarks/hf_adapters.py --tiny --steps-first 20 --steps 10 --no-append  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from peer_ll.cli import hf_lm, lm

HEADING = "## Hugging Face GPT-2: PEER experts vs LoRA (benchmarks/hf_adapters.py)"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SETTINGS = [
    "--base",
    "hf-gpt2",
    "--steps-first",
    "800",
    "--steps",
    "200",
    "--block-size",
    "64",
    "--max-bytes",
    "1000000",
    "--eval-blocks",
    "64",
    "--lr-first",
    "3e-3",
    "--lr",
    "6e-3",
    "--grow-keys",
    "16",
    "--threads",
    "1",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    lm.add_arguments(parser)
    parser.add_argument("--no-append", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(SETTINGS + sys.argv[1:])
    args.out = args.out or f"benchmarks/runs/hf-adapters-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    load_before = os.getloadavg()[0]
    code = hf_lm.main(args)
    if not args.no_append:
        append(json.loads((Path(args.out) / "results.json").read_text()), args, load_before)
    return code


def append(results: dict, args: argparse.Namespace, load_before: float) -> None:
    """Add this run's section to RESULTS.md (one section per run, under HEADING)."""
    import peft
    import transformers

    table = (Path(args.out) / "table.txt").read_text().rstrip()
    command = "python benchmarks/hf_adapters.py " + shlex.join(sys.argv[1:])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    shape = (
        hf_lm.TINY
        if args.tiny
        else dict(dim=args.dim, layers=args.layers, block_size=args.block_size)
    )
    text = [
        f"\n### Run of {datetime.date.today()}\n",
        f"Command: `{command.strip()}` (settings: `{' '.join(SETTINGS)}`).",
        f"Machine: {os.cpu_count()} CPU cores, {gpu}, {args.threads} torch threads; load "
        f"average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (shared "
        "machine: tokens/s are only comparable within the run).",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}.",
        f"Base: GPT2LMHeadModel from GPT2Config, byte tokens, {json.dumps(shape)}; PEER "
        f"branches {json.dumps(hf_lm.hm.PEER_SHAPE)}, {args.grow_keys}² experts per MLP and "
        f"domain; LoRA on {', '.join(hf_lm.hm.LORA_TARGETS)}, alpha = rank.",
        "",
        "```",
        table,
        "```",
    ]
    body = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    if HEADING not in body:
        body = body.rstrip() + "\n\n" + HEADING + "\n"
    start = body.index(HEADING) + len(HEADING)
    nxt = body.find("\n## ", start)
    end = len(body) if nxt < 0 else nxt
    body = body[:end].rstrip() + "\n" + "\n".join(text) + "\n" + body[end:]
    RESULTS.write_text(body)


if __name__ == "__main__":
    sys.exit(main())

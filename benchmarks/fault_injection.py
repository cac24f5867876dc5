"""Fault injection: ``peer-ll run`` killed with SIGKILL at random moments, then resumed.

One uninterrupted run sets the reference. A second run of the same settings is killed
with SIGKILL ``--kills`` times, each at a random moment after the process has started
(written its ``run.json``): after a random number (1 to 4) of checkpoint or record
writes or a random 25 % to 60 % of the reference run's training time, whichever comes
first, plus a random delay of 0 to 1.5 s (so kills land mid-experience, mid-stream and
between strategies), and resumed with
``--resume`` after each kill, then once more to the end. The script checks that

- no finished (strategy, seed) record is ever lost: the records present before a kill
  are all present, unchanged, after the resume;
- the final metrics equal the uninterrupted run's exactly: every per-seed accuracy
  matrix, Avalanche's forgetting and BWT, and the parameter counts.

    python benchmarks/fault_injection.py              # 5 kills, records RESULTS.md
    python benchmarks/fault_injection.py --kills 2 --no-record

The figures go to the "Fault injection" section of ``benchmarks/RESULTS.md``
(``peer_ll.cli.results.write_section``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peer_ll.cli.results import environment_line, write_section

HEADING = "## Fault injection (benchmarks/fault_injection.py)"
SETTINGS = ["--stream", "digits-class", "--strategies", "naive,replay,peer-grow", "--seeds", "2",
            "--experiences", "5", "--epochs", "1", "--max-train-per-exp", "80",
            "--max-test-per-exp", "40", "--num-keys", "4", "--hidden", "16",
            "--replay-budget", "40", "--top-t", "8", "--threads", "1"]  # fmt: skip
COMPARED = ("accuracy_matrix", "avalanche", "params_total", "params_active", "routing")


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "peer_ll", "run", *SETTINGS, "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _records(run: Path) -> dict[str, str]:
    folder = run / "records"
    return {p.name: p.read_text() for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _per_seed(run: Path) -> dict[str, list[dict]]:
    results = json.loads((run / "results.json").read_text())
    return {name: [{k: s.get(k) for k in COMPARED} for s in summary["per_seed"]]
            for name, summary in results["strategies"].items()}  # fmt: skip


def _started(proc: subprocess.Popen, run: Path, stamp: float) -> None:
    """Waits until the run has (re)written its ``run.json``: imports and checks are done."""
    marker = run / "run.json"
    while (not marker.exists() or marker.stat().st_mtime <= stamp) and proc.poll() is None:
        time.sleep(0.05)


def _progress(proc: subprocess.Popen, run: Path, events: int, seconds: float) -> None:
    """Waits until ``events`` checkpoints or records have been written, ``seconds`` have
    passed or the run ended, whichever comes first."""
    deadline = time.perf_counter() + seconds

    def stamps() -> dict[str, float]:
        files = [*run.glob("checkpoints/*.pkl"), *run.glob("records/*.json")]
        return {str(p): p.stat().st_mtime for p in files if p.exists()}

    seen, count = stamps(), 0
    while count < events and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.05)
        try:
            now = stamps()
        except FileNotFoundError:  # a checkpoint removed as its run finished
            continue
        count += sum(1 for k, v in now.items() if seen.get(k) != v)
        seen = now


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs (5)")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments (0)")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        proc = subprocess.Popen(_command(tmp / "whole"), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        _started(proc, tmp / "whole", 0.0)
        startup = time.perf_counter() - start
        if proc.wait() != 0:
            raise RuntimeError("the uninterrupted run failed")
        whole_seconds = time.perf_counter() - start
        train_seconds = whole_seconds - startup
        reference = _per_seed(tmp / "whole")
        run, lost, moments, kept = tmp / "killed", 0, [], []
        for i in range(args.kills):
            events, extra_wait = rng.randint(1, 4), rng.uniform(0.0, 1.5)
            extra = ("--resume",) if i else ()
            before = _records(run)
            marker = run / "run.json"
            stamp = marker.stat().st_mtime if marker.exists() else 0.0
            proc = subprocess.Popen(
                _command(run, *extra),
                env=_env(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _started(proc, run, stamp)
            begun = time.perf_counter()
            _progress(proc, run, events, rng.uniform(0.25, 0.6) * train_seconds)
            try:
                proc.wait(timeout=extra_wait)
                finished_early = True
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                finished_early = False
            moment = time.perf_counter() - begun
            after = _records(run)
            lost += sum(after.get(name) != text for name, text in before.items())
            moments.append(round(moment, 1))
            mid = len(list((run / "checkpoints").glob("*.pkl")))
            kept.append(f"{len(after)}+{mid}")
            print(
                f"kill {i + 1}: {moment:.1f} s after start"
                f"{' (run had finished)' if finished_early else ''}, "
                f"{len(after)} finished runs kept, {mid} mid-stream checkpoint(s)"
            )
        before = _records(run)
        subprocess.run(_command(run, "--resume"), env=_env(), check=True, capture_output=True)
        after = _records(run)
        lost += sum(after.get(name) != text for name, text in before.items())
        resumed = _per_seed(run)
        identical = resumed == reference
        leftovers = len(list(run.rglob(".tmp-*"))) + len(list((run / "checkpoints").iterdir()))
    total = sum(len(v) for v in reference.values())
    print(f"uninterrupted: {whole_seconds:.1f} s, {total} (strategy, seed) runs; kills at "
          f"{moments} s; records lost {lost}; resumed metrics identical: {identical}; "
          f"temporary files left {leftovers}")  # fmt: skip
    if not args.no_record:
        text = "\n".join([
            f"`python benchmarks/fault_injection.py --kills {args.kills} --seed {args.seed}`: "
            f"`peer-ll run {' '.join(SETTINGS)}` ({total} strategy × seed runs, "
            f"{whole_seconds:.0f} s uninterrupted, {train_seconds:.0f} s after start-up), "
            f"killed with SIGKILL at {moments} s after each start-up "
            "and resumed with `--resume` after each kill.",
            "",
            "| kills | finished runs + mid-stream checkpoints after each kill | records lost | "
            "resumed metrics identical | temporary files left |",
            "|---|---|---|---|---|",
            f"| {args.kills} | {kept} | {lost} | {'yes' if identical else 'NO'} | {leftovers} |",
            "",
            "Identical means equal per-seed accuracy matrices, Avalanche forgetting and BWT, "
            "parameter counts and routing shares, compared as JSON values (bit for bit).",
            "",
            environment_line(),
        ])  # fmt: skip
        write_section(Path(__file__).with_name("RESULTS.md"), HEADING, text, replace=True)
    return 0 if identical and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

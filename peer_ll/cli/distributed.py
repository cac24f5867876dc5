"""``peer-ll run`` on several processes: torchrun, Avalanche's DistributedHelper, DDP.

Two ways to start it, the same run:

- ``torchrun --nproc_per_node N -m peer_ll.cli run ...`` (torchrun sets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``);
- ``peer-ll run --nproc N ...``, which starts torchrun itself
  (``torch.distributed.run``) on this machine.

Each process then calls ``DistributedHelper.init_distributed`` (gloo on the CPU,
NCCL on CUDA), every strategy gets :class:`peer_ll.strategies.distributed.DistributedPEER`
(DDP re-wrapped per experience, expert tables all-reduced as sparse gradients on gloo
and densified on NCCL), and only rank 0 writes the run folder and prints.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def world_size() -> int:
    """Processes of this run, from torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def init(seed: int, device: str) -> bool:
    """Join the process group torchrun describes; returns whether the run is distributed.

    Args:
        seed: random seed for every generator, the same on every rank.
        device: "cpu" (gloo) or a CUDA device (NCCL; each rank takes ``cuda:LOCAL_RANK``).
    """
    if world_size() <= 1:
        return False
    import torch.distributed as dist
    from avalanche.distributed import DistributedHelper

    if not dist.is_initialized():
        DistributedHelper.init_distributed(seed, use_cuda=str(device).startswith("cuda"))
    logger.info(
        "rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), dist.get_backend()
    )
    return True


def local_device(device: str) -> str:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; other devices are kept."""
    if str(device) == "cuda" and world_size() > 1:
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return device


def prepare(strategy, *, shard_experts: bool = False) -> None:
    """Give ``strategy`` the DDP plugin when the run is distributed (in place).

    Args:
        strategy: an Avalanche strategy.
        shard_experts: also split its PEER layers' tables by columns over the ranks
            (``DistributedPEER(shard_experts=True)``).
    """
    if world_size() <= 1:
        return
    from peer_ll.strategies.distributed import DistributedPEER

    strategy.plugins.append(DistributedPEER(shard_experts=shard_experts))


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``peer-ll run argv`` on ``nproc`` local processes with torchrun; its exit status."""
    from torch.distributed.run import main as torchrun

    args = [
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "peer_ll.cli",
        "run",
        *argv,
    ]
    logger.info("torchrun %s", " ".join(args))
    try:
        torchrun(args)
    except SystemExit as exit_:  # torchrun exits with the workers' status
        return int(exit_.code or 0)
    except Exception as err:  # ChildFailedError: a rank failed; its traceback is printed
        print(f"peer-ll run: error: {err}", file=sys.stderr)
        return 1
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out

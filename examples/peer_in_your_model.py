"""Put a PEER layer into your own model and let its experts grow per task with Avalanche.

A PEER layer is an ``nn.Module`` like any other: build it inside your model and call
it on features ``(..., D)``. ``peer_grow`` then does the rest in one call: it makes
every PEER layer in the model grow a new segment of experts per experience (older
owners frozen), builds the sparse-aware optimizer and returns an Avalanche strategy.

    python examples/peer_in_your_model.py            # a few seconds on a CPU
"""

import argparse

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn

from peer_ll.data import make_stream
from peer_ll.experts import PEER
from peer_ll.strategies import GrowthPolicy, peer_grow


class MyNet(nn.Module):
    """Your model: an encoder, a residual PEER layer and a linear head. (B, 64) -> (B, 10).

    ``owners`` (optional) restricts the PEER layer to those owners' experts; a module
    that takes it says so with ``takes_owners = True``.
    """

    takes_owners = True

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.GELU())
        # The paper's layer with a small pool: 8² = 64 experts, BatchNorm on queries.
        self.peer = PEER(32, num_keys=8, heads=2, topk=4, dim_key=16)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, owners=None) -> torch.Tensor:
        h = self.encoder(x)
        return self.head(h + self.peer(h, owners=owners))


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--experiences", type=int, default=3)
parser.add_argument("--epochs", type=int, default=4)
args = parser.parse_args()
torch.manual_seed(0)

stream = make_stream("digits", kind="class", n_experiences=args.experiences)
model = MyNet()
# One call: growth (one segment per experience, room reserved so optimizer state
# survives), the sparse-aware optimizer and the Avalanche template. Batches of more
# than one sample: BatchNorm queries need batch statistics in training.
strategy = peer_grow(
    model,
    policy=GrowthPolicy(max_experts=64 * args.experiences),
    train_mb_size=32,
    train_epochs=args.epochs,
    eval_mb_size=256,
    evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
)
for experience in stream.train_stream:
    strategy.train(experience)
    results = strategy.eval(stream.test_stream[: experience.current_experience + 1])
    acc = [v for k, v in results.items() if k.startswith("Top1_Acc_Exp/")]
    print(
        f"after experience {experience.current_experience}: "
        f"{model.peer.num_experts} experts, owners {model.peer.segment_owner.tolist()}, "
        f"frozen {int(model.peer.frozen.sum())}, accuracy per experience "
        f"{[round(a, 3) for a in acc]}"
    )

# Retrieval restricted to one owner's experts, e.g. with the task label at test time.
x, y, _ = next(iter(torch.utils.data.DataLoader(stream.test_stream[0].dataset, batch_size=10_000)))
model.eval()
with torch.no_grad():
    every = (model(x).argmax(1) == y).float().mean().item()
    own = (model(x, owners=0).argmax(1) == y).float().mean().item()
print(f"experience 0 accuracy: every expert {every:.3f}, owner 0's experts only {own:.3f}")

"""Methods that teach a Hugging Face causal LM new text domains, for ``peer-ll lm --base hf-gpt2``.

Each method starts from a copy of the base model and learns domains 1..T-1 in
order; after each it is evaluated on every domain through each of its
evaluation modes:

- ``full``: full finetuning (one model, every parameter trains);
- ``lora``: PEFT's LoRA, one adapter per domain on every attention and MLP
  projection; modes: the domain known (its adapter; none for the base
  domain), inferred (the routes' causal posterior mixture, as for PEER), and
  "last adapter on" (no label: the newest adapter);
- ``peer``: :func:`peer_ll.adapters.add_experts`, one owner per domain, with
  rank-16 per-domain deltas on the attention projections
  (``ExpertsConfig.adapter_rank``); modes: the domain known (``owners=j``) and
  inferred (``owners="infer"``);
- ``peer-experts-only``: the same without the attention deltas.

A "route" is a callable ``(B, T) ids -> (B, T, V) logits``.
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F

from peer_ll.adapters import ExpertsConfig, add_experts, posterior_mixture
from peer_ll.cli.lm_train import lr_scale, sample_batches
from peer_ll.optim import make_optimizer

PEER_SHAPE = dict(heads=4, topk=8, dim_key=64)  # small branches for a small model
ADAPTER_RANK = 16  # per-domain low-rank deltas on the attention projections
LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]  # GPT-2: every attention and MLP projection


def train_route(model, route, blocks, *, steps, batch_size, lr, seed, warmup=20) -> float:
    """Train ``model``'s parameters that require grad through ``route``; returns seconds.

    The schedule of ``peer_ll.cli.lm_train.train_lm``: linear warm-up, cosine
    decay to 10 % of ``lr``; :func:`peer_ll.optim.make_optimizer` for every method.
    """
    opt = make_optimizer(model, lr=lr)
    model.train()
    start = time.perf_counter()
    for step, batch in enumerate(
        sample_batches(blocks, batch_size=batch_size, steps=steps, seed=seed)
    ):
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(step, steps, warmup)
        logits = route(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return time.perf_counter() - start


@torch.no_grad()
def perplexity(route, blocks: torch.Tensor, *, batch_size: int = 32) -> float:
    """exp(mean next-token cross-entropy) of ``route`` over ``blocks`` (N, T + 1)."""
    total, count = 0.0, 0
    for batch in blocks.split(batch_size):
        logits = route(batch[:, :-1])
        nll = F.cross_entropy(
            logits.flatten(0, 1).double(), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)


def inferred(routes):
    """The causal posterior mixture of ``routes`` (a list of routes) as one route."""

    def route(x):
        return posterior_mixture(torch.stack([r(x) for r in routes]), x)[0]

    return route


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class FullFinetuning:
    modes = ("full finetuning",)

    def __init__(self, base, settings) -> None:
        self.model = copy.deepcopy(base)
        self.trainable, self.added = [], 0

    def learn(self, t: int, blocks, train) -> float:
        self.model.requires_grad_(True)
        self.trainable.append(trainable(self.model))
        return train(self.model, self.plain)

    def plain(self, x):
        return self.model(input_ids=x).logits

    def routes(self, mode: str, j: int):
        return self.plain


class LoRA:
    def __init__(self, base, settings) -> None:
        from peft import LoraConfig, get_peft_model

        self.rank = settings["lora_rank"]
        self.lora = LoraConfig(
            r=self.rank,
            lora_alpha=self.rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            fan_in_fan_out=True,
        )
        self.model = get_peft_model(copy.deepcopy(base), self.lora, adapter_name="d1")
        self.names = []
        name = f"LoRA r={self.rank}"
        self.modes = (
            f"{name}, domain known",
            f"{name}, domain inferred",
            f"{name}, last adapter on",
        )
        self.trainable, self.added = [], 0

    def learn(self, t: int, blocks, train) -> float:
        name = f"d{t}"
        if t > 1:
            self.model.add_adapter(name, self.lora)
        self.model.set_adapter(name)
        for n, p in self.model.named_parameters():
            p.requires_grad_(f".{name}." in n)
        self.names.append(name)
        self.trainable.append(trainable(self.model))
        self.added = sum(self.trainable)
        return train(self.model, self.route(t))

    def route(self, j: int):
        def run(x):
            if j == 0 or j > len(self.names):
                with self.model.disable_adapter():
                    return self.model(input_ids=x).logits
            self.model.set_adapter(self.names[j - 1])
            return self.model(input_ids=x).logits

        return run

    def routes(self, mode: str, j: int):
        if mode.endswith("domain known"):
            return self.route(j)
        if mode.endswith("domain inferred"):
            return inferred([self.route(o) for o in range(len(self.names) + 1)])
        return self.route(len(self.names))


class PEERExperts:
    adapter_rank = ADAPTER_RANK
    name = f"PEER experts + attention r={ADAPTER_RANK}"

    def __init__(self, base, settings) -> None:
        self.modes = (f"{self.name}, domain known", f"{self.name}, domain inferred")
        self.base, self.model = copy.deepcopy(base), None
        self.num_keys = settings["num_keys"]
        self.trainable, self.added = [], 0

    def learn(self, t: int, blocks, train) -> float:
        if self.model is None:
            config = ExpertsConfig(**PEER_SHAPE, adapter_rank=self.adapter_rank)
            self.model = add_experts(self.base, config, num_keys=self.num_keys, owner=t)
        else:
            add_experts(self.model, num_keys=self.num_keys, owner=t)
        counts = self.model.parameter_counts()
        self.trainable.append(counts["trainable"])
        self.added = counts["added"]
        return train(self.model, self.route(t))

    def route(self, j: int):
        known = j if self.model is not None and j in self.model.owners else 0
        return lambda x: (
            (
                self.model(input_ids=x, owners=known)
                if self.model is not None
                else self.base(input_ids=x)
            ).logits
        )

    def routes(self, mode: str, j: int):
        if mode.endswith("domain known") or self.model is None:
            return self.route(j)
        return lambda x: self.model(input_ids=x, owners="infer").logits


class PEERExpertsOnly(PEERExperts):
    adapter_rank = 0
    name = "PEER experts only"


METHODS = {
    "full": FullFinetuning,
    "lora": LoRA,
    "peer": PEERExperts,
    "peer-experts-only": PEERExpertsOnly,
}

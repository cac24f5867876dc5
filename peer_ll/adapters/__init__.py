"""PEER experts added to an existing torch / Hugging Face model, PEFT-style.

    model = add_experts(gpt2, num_keys=16, owner=1)    # unchanged until it trains
    model.print_trainable_parameters()
    model(input_ids, labels=labels, owners=1)           # domain 1's route
    model(input_ids, owners=0)                          # the base model, bit for bit
    model(input_ids, owners="infer")                    # causal posterior over domains
    model.save_pretrained("experts")                    # the experts only (safetensors)
    model = ExpertsModel.from_pretrained(fresh_gpt2, "experts")

Train with :func:`peer_ll.optim.make_optimizer` (the expert tables have row-sparse
gradients and frozen rows).
"""

from peer_ll.adapters.branch import ExpertBranch, owners_scope, scoped_owners
from peer_ll.adapters.checkpoint import ADAPTER_FILE
from peer_ll.adapters.config import ExpertsConfig
from peer_ll.adapters.model import ExpertsModel, add_experts
from peer_ll.adapters.posterior import posterior_mixture

__all__ = [
    "ADAPTER_FILE",
    "ExpertBranch",
    "ExpertsConfig",
    "ExpertsModel",
    "add_experts",
    "owners_scope",
    "posterior_mixture",
    "scoped_owners",
]

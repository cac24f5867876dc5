"""SparseExpertFinetuning: at most t expert rows change per step, ranked by TF-IDF."""

import pytest
import torch
from avalanche.core import SupervisedPlugin

from peer_ll.strategies import (
    GrowthPolicy,
    SparseExpertFinetuning,
    peer_classifier,
    peer_sparse_finetuning,
)


class RowsChanged(SupervisedPlugin):
    """Counts, per optimizer step, the expert rows and sub-key rows that changed."""

    def __init__(self, layer, sparse):
        super().__init__()
        self.layer, self.sparse, self.rows, self.keys_ok = layer, sparse, [], []

    def before_update(self, strategy, **kwargs):
        self._before = [t.detach().clone() for t in (self.layer.down, self.layer.up)]
        self._keys = self.layer.sub_keys.detach().clone()

    def after_update(self, strategy, **kwargs):
        down, up = self._before
        changed = ((self.layer.down != down).any(1) | (self.layer.up != up).any(1)).nonzero()
        self.rows.append(changed.flatten())
        chosen = self.sparse.last_selected[self.layer]
        assert set(changed.flatten().tolist()) <= set(chosen.tolist())
        left, right = self.layer.pool.key_rows(chosen)
        moved = (self.layer.sub_keys != self._keys).flatten(1).any(1).nonzero().flatten()
        self.keys_ok.append(set(moved.tolist()) <= set(left.tolist()) | set(right.tolist()))


@pytest.mark.parametrize("dense", [False, True])
def test_at_most_t_rows_change_per_step(dense, small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    layer = model.peer_layers[0]
    strategy = peer_sparse_finetuning(
        model, top_t=3, train_mb_size=32, evaluator=None, dense_grads=dense
    )
    sparse = next(p for p in strategy.plugins if isinstance(p, SparseExpertFinetuning))
    probe = RowsChanged(layer, sparse)
    strategy.plugins.insert(strategy.plugins.index(strategy.evaluator), probe)
    for exp in class_stream.train_stream[:2]:
        strategy.train(exp)
    assert len(probe.rows) >= 6
    assert all(len(rows) <= 3 for rows in probe.rows)
    assert sum(len(rows) > 0 for rows in probe.rows) >= 3  # rows do change
    assert all(probe.keys_ok)
    # Rows retrieved on the first experience count in the IDF of the second.
    idf = sparse.idf(layer)
    assert idf.min() < idf.max()


def test_ranking_is_tf_times_idf(small_peer):
    from peer_ll.experts import PEER

    layer = PEER(8, **small_peer)
    plugin = SparseExpertFinetuning(1)
    plugin._docs = 9
    plugin._doc_freq[layer] = torch.zeros(16)
    plugin._doc_freq[layer][2] = 9.0  # row 2 was retrieved in every earlier step
    counts = torch.zeros(16)
    counts[2], counts[5] = 3.0, 2.0  # TF: row 2 beats row 5 ...
    assert plugin._select(layer, counts).tolist() == [5]  # ... but TF·IDF picks row 5
    layer.freeze(0)
    assert plugin._select(layer, counts).tolist() == []  # frozen rows are never chosen


def test_first_experience_ranks_by_tf(small_peer):
    from peer_ll.experts import PEER

    layer = PEER(8, **small_peer)
    plugin = SparseExpertFinetuning(2)
    assert torch.equal(plugin.idf(layer), torch.ones(16))
    counts = torch.tensor([0.0, 4, 1, 0, 7] + [0.0] * 11)
    assert plugin._select(layer, counts).tolist() == [1, 4]


def test_train_others_false_trains_only_expert_rows(small_peer, class_stream):
    model = peer_classifier(64, 10, hidden=16, peer=small_peer, growth=GrowthPolicy(max_experts=48))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy = peer_sparse_finetuning(
        model, top_t=4, train_others=False, train_mb_size=32, evaluator=None
    )
    strategy.train(class_stream.train_stream[0])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {
        "blocks.0.peer.pool.down", "blocks.0.peer.pool.up", "blocks.0.peer.pool.sub_keys"
    }  # fmt: skip


def test_top_t_must_be_positive():
    with pytest.raises(ValueError, match="top_t must be an int >= 1, got 0"):
        SparseExpertFinetuning(0)
    with pytest.raises(TypeError, match="top_t must be an int >= 1, got float 2.0"):
        SparseExpertFinetuning(2.0)

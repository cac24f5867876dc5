"""The PEERLM config the model and strategy tests share (3 blocks, 16 experts a segment).

Importable from any test folder: ``tests/`` is on ``sys.path`` through its conftest.
"""

TINY = dict(dim=32, layers=3, attn_heads=2, block_size=32, peer_num_keys=4, peer_heads=2,
            peer_topk=4, peer_dim_key=8, adapter_rank=4, attention_adapter_rank=4)  # fmt: skip

"""Tiny Hugging Face causal LMs built from configs (no hub)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_tiny import BUILDERS, VOCAB  # noqa: E402 (after the importorskip)


@pytest.fixture(params=sorted(BUILDERS))
def base(request):
    return BUILDERS[request.param]()


@pytest.fixture
def tokens():
    return torch.randint(0, VOCAB, (3, 13), generator=torch.Generator().manual_seed(1))

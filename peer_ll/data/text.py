"""Byte-level text streams: one Avalanche experience per text domain.

Tokens are UTF-8 bytes (ids 0..255) plus two special ids, `BOS_ID` and
`EOS_ID`. A split's token stream is its documents in order, each one preceded
by `BOS_ID` (so `BOS_ID` also marks where the previous document ended). The
stream is cut into blocks of ``block_size + 1`` tokens with stride
``block_size``: block i is ``tokens[i*T : i*T + T + 1]``, so consecutive
blocks share one token and every token after the first is a target exactly
once. The tail that does not fill a block is dropped. Train and test blocks
come from different documents (see `load_domain_splits`).

Axis letters: N blocks, B batch, T ``block_size``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import datasets
import torch
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.generic_scenario import CLScenario
from avalanche.benchmarks.scenarios.task_aware import with_task_labels
from avalanche.benchmarks.utils import AvalancheDataset, ConstantSequence, make_avalanche_dataset
from avalanche.benchmarks.utils.data_attribute import TaskLabels
from torch.utils.data import Dataset

from peer_ll.experts.checks import check_choice, check_int

from .text_domains import BUILTIN_DOMAINS, TextDomain, load_domain_splits

BYTE_VOCAB_SIZE = 256  # one id per byte value
BOS_ID = 256  # begins each document in a block stream
EOS_ID = 257  # free for a model to end generation; never emitted by the streams
TEXT_VOCAB_SIZE = 258  # bytes plus BOS and EOS: the vocabulary a model needs
SPLITS = ("train", "test")


def encode(text: str, *, bos: bool = False, eos: bool = False) -> torch.Tensor:
    """Encodes text as its UTF-8 bytes, optionally framed by BOS and EOS.

    Args:
        text: The text.
        bos: Put `BOS_ID` first.
        eos: Put `EOS_ID` last.

    Returns:
        Token ids, LongTensor of shape (L,), with L = bytes + bos + eos.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    data = text.encode("utf-8")
    # torch.frombuffer rejects an empty buffer.
    raw = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        if data
        else torch.empty(0, dtype=torch.long)
    )
    parts = [torch.tensor([BOS_ID])] if bos else []
    parts += [raw] + ([torch.tensor([EOS_ID])] if eos else [])
    return torch.cat(parts)


def decode(tokens: torch.Tensor | Sequence[int]) -> str:
    """Decodes token ids to text; special ids are dropped.

    Args:
        tokens: Token ids, shape (L,), each in [0, TEXT_VOCAB_SIZE).

    Returns:
        The text; a byte sequence that is not valid UTF-8 (such as a
        character cut at a block edge) becomes U+FFFD.

    Raises:
        ValueError: If an id is outside [0, TEXT_VOCAB_SIZE).
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    bad = ids[(ids < 0) | (ids >= TEXT_VOCAB_SIZE)]
    if bad.numel():
        raise ValueError(f"tokens must be ids in [0, {TEXT_VOCAB_SIZE}), got {bad[:5].tolist()}")
    data = ids[ids < BYTE_VOCAB_SIZE].to(torch.uint8)
    return bytes(data.tolist()).decode("utf-8", errors="replace")


def make_blocks(tokens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cuts a token stream into next-token blocks of ``block_size + 1``.

    Args:
        tokens: Token ids, shape (L,).
        block_size: T, the length of a model's input.

    Returns:
        LongTensor (N, T + 1), N = (L - 1) // T; block i is
        ``tokens[i*T : i*T + T + 1]``. Inputs are ``blocks[:, :-1]`` and
        targets ``blocks[:, 1:]``.

    Raises:
        ValueError: If ``block_size`` < 1 or ``tokens`` is not 1-D.
    """
    check_int("block_size", block_size, minimum=1)
    if tokens.dim() != 1:
        raise ValueError(f"tokens must have shape (L,), got {tuple(tokens.shape)}")
    n = max(0, (tokens.numel() - 1) // block_size)
    if n == 0:
        return torch.empty(0, block_size + 1, dtype=torch.long)
    return tokens[: n * block_size + 1].long().unfold(0, block_size + 1, block_size).clone()


def documents_to_blocks(texts: Sequence[str], block_size: int) -> torch.Tensor:
    """Encodes documents, each after a BOS, and cuts them into blocks.

    Args:
        texts: The documents, in order.
        block_size: T.

    Returns:
        LongTensor (N, T + 1); see `make_blocks`.
    """
    if not texts:
        return make_blocks(torch.empty(0, dtype=torch.long), block_size)
    return make_blocks(torch.cat([encode(t, bos=True) for t in texts]), block_size)


def iterate_blocks(
    blocks: torch.Tensor, *, batch_size: int, shuffle: bool = False, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yields (inputs, targets) batches of blocks, without Avalanche.

    Args:
        blocks: LongTensor (N, T + 1).
        batch_size: B; the last batch may be smaller.
        shuffle: Visit the blocks in a seeded random order.
        seed: Seeds the order when ``shuffle``.

    Yields:
        x, y: LongTensors (B, T); ``y[:, :-1] == x[:, 1:]``.
    """
    check_int("batch_size", batch_size, minimum=1)
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise ValueError(f"blocks must have shape (N, T + 1), T >= 1, got {tuple(blocks.shape)}")
    n = blocks.shape[0]
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(n)
    for start in range(0, n, batch_size):
        batch = blocks[order[start : start + batch_size]]
        yield batch[:, :-1], batch[:, 1:]


class NextTokenBlocks(Dataset):
    """A torch dataset of next-token blocks; item i is (x, y), LongTensors (T,).

    Args:
        blocks: LongTensor (N, T + 1).
    """

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[index]
        return block[:-1], block[1:]


def blocks_to_avalanche(blocks: torch.Tensor, task_label: int) -> AvalancheDataset:
    """Wraps blocks in an AvalancheDataset whose items are (x, y, task_label).

    The dataset carries task labels (``targets_task_labels``) but no class
    ``targets``: plugins that need classes (class-balanced replay, class
    timelines) do not apply to it.

    Args:
        blocks: LongTensor (N, T + 1).
        task_label: The task label of every item.

    Returns:
        The dataset; x and y are LongTensors (T,), task_label an int.
    """
    labels = TaskLabels(ConstantSequence(task_label, blocks.shape[0]))
    return make_avalanche_dataset(NextTokenBlocks(blocks), data_attributes=[labels])


class TextDomainBenchmark(CLScenario):
    """An Avalanche benchmark with one experience per text domain.

    Streams ``train_stream`` and ``test_stream``; experience i holds domain i,
    with task label i and attribute ``domain`` (its name).

    Attributes:
        domain_names: The domains, in stream order.
        documents: Per domain, the ``DatasetDict`` of its train and test
            documents (columns ``"text"``, ``"domain"``, ``"doc_id"``).
        block_size: T.
    """

    def __init__(self, streams, *, domain_names, documents, blocks, block_size):
        super().__init__(streams)
        self.domain_names: tuple[str, ...] = tuple(domain_names)
        self.documents: dict[str, datasets.DatasetDict] = documents
        self.block_size = block_size
        self._blocks = blocks

    def get_split(self, domain: str, split: str = "train") -> torch.Tensor:
        """Returns one domain's blocks, for use without Avalanche.

        Args:
            domain: One of `domain_names`.
            split: ``"train"`` or ``"test"``.

        Returns:
            LongTensor (N, T + 1); inputs ``[:, :-1]``, targets ``[:, 1:]``.
        """
        check_choice("domain", domain, self.domain_names)
        return self._blocks[domain][check_choice("split", split, SPLITS)]


def text_domain_stream(
    domains: Sequence[str | TextDomain] = BUILTIN_DOMAINS,
    *,
    block_size: int = 128,
    test_fraction: float = 0.1,
    max_docs_per_domain: int | None = None,
    max_bytes_per_domain: int | None = 2_000_000,
    seed: int = 0,
) -> TextDomainBenchmark:
    """Builds a stream of text domains for next-token prediction.

    Args:
        domains: Built-in domain names (`BUILTIN_DOMAINS`) or `TextDomain`
            objects, in stream order; names must be distinct.
        block_size: T, the model's input length.
        test_fraction: The share of each domain's documents held out for test.
        max_docs_per_domain: At most this many documents per domain.
        max_bytes_per_domain: At most this many bytes of text per domain
            (default 2 MB; None: all). Test gets ``test_fraction`` of it.
        seed: Seeds the train/test split and the document order.

    Returns:
        A `TextDomainBenchmark`. Items of its experiences' datasets are
        (x, y, task_label), x and y LongTensors (T,) with y the next tokens.

    Raises:
        ValueError: For an unknown or repeated domain, ``block_size`` < 1, or
            a split too small to fill one block.
    """
    check_int("block_size", block_size, minimum=1)
    if isinstance(domains, (str, TextDomain)) or not domains:
        raise ValueError(f"domains must be a non-empty sequence of domains, got {domains!r}")
    names = [d.name if isinstance(d, TextDomain) else d for d in domains]
    if len(set(names)) != len(names):
        raise ValueError(f"domains must have distinct names, got {names}")
    documents, blocks, streams = {}, {}, {s: [] for s in SPLITS}
    for task, (name, domain) in enumerate(zip(names, domains, strict=True)):
        documents[name] = load_domain_splits(
            domain,
            test_fraction=test_fraction,
            max_docs=max_docs_per_domain,
            max_bytes=max_bytes_per_domain,
            seed=seed,
        )
        blocks[name] = {}
        for split in SPLITS:
            blocks[name][split] = documents_to_blocks(documents[name][split]["text"], block_size)
            if blocks[name][split].shape[0] == 0:
                raise ValueError(
                    f"domain {name!r} must fill one block of {block_size + 1} tokens in its "
                    f"{split} split, got fewer; raise max_bytes_per_domain"
                )
            streams[split].append(blocks_to_avalanche(blocks[name][split], task))
    scenario = with_task_labels(benchmark_from_datasets(**streams))
    for stream in scenario.streams.values():
        for exp, name in zip(stream, names, strict=True):
            exp.domain = name
    return TextDomainBenchmark(
        scenario.streams.values(),
        domain_names=names,
        documents=documents,
        blocks=blocks,
        block_size=block_size,
    )

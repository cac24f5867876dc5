"""Task streams on real data, returned as Avalanche benchmarks, and their loaders.

Nothing here imports Avalanche at package import: the stream builders import it
when called.
"""

from peer_ll.data.idx import load_mnist_like, read_idx, write_idx, write_mnist_like
from peer_ll.data.images import (
    IMAGE_DATASETS,
    ImageDataset,
    ImageSplits,
    find_image_dataset,
    load_digits_splits,
    load_images,
)
from peer_ll.data.streams import STREAM_KINDS, make_stream, online, permuted, rotated, split_classes
from peer_ll.data.text import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    TEXT_VOCAB_SIZE,
    TextDomainBenchmark,
    decode,
    encode,
    iterate_blocks,
    make_blocks,
    text_domain_stream,
)
from peer_ll.data.text_domains import (
    BUILTIN_DOMAINS,
    TextDomain,
    builtin_domain,
    load_domain_splits,
    text_domain,
)

__all__ = [
    "BOS_ID", "BUILTIN_DOMAINS", "BYTE_VOCAB_SIZE", "EOS_ID", "IMAGE_DATASETS", "STREAM_KINDS",
    "TEXT_VOCAB_SIZE", "ImageDataset", "ImageSplits", "TextDomain", "TextDomainBenchmark",
    "builtin_domain", "decode", "encode", "find_image_dataset", "iterate_blocks",
    "load_digits_splits", "load_domain_splits", "load_images", "load_mnist_like", "make_blocks",
    "make_stream", "online", "permuted", "read_idx", "rotated", "split_classes", "text_domain",
    "text_domain_stream", "write_idx", "write_mnist_like",
]

"""Task streams on real data, returned as Avalanche benchmarks, and their loaders.

The names below are loaded lazily (PEP 562): ``import peer_ll.data`` is instant, and
Avalanche and HF ``datasets`` are imported only with the module that needs them.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "peer_ll.data.arrays": ("UserSplits", "load_arrays", "user_splits"),
    "peer_ll.data.benchmarks": ("class_count", "split_by_task", "with_class_count"),
    "peer_ll.data.idx": ("load_mnist_like", "read_idx", "write_idx", "write_mnist_like"),
    "peer_ll.data.images": ("IMAGE_DATASETS", "ImageDataset", "ImageSplits",
                            "find_image_dataset", "load_digits_splits", "load_images"),
    "peer_ll.data.streams": ("STREAM_KINDS", "make_stream", "online", "online_of", "permuted",
                             "rotated", "split_classes"),
    "peer_ll.data.text": ("BOS_ID", "BYTE_VOCAB_SIZE", "EOS_ID", "TEXT_VOCAB_SIZE",
                          "TextDomainBenchmark", "decode", "encode", "iterate_blocks",
                          "make_blocks", "text_domain_stream"),
    "peer_ll.data.text_domains": ("BUILTIN_DOMAINS", "TextDomain", "builtin_domain",
                                  "load_domain_splits", "text_domain"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        try:  # a submodule, e.g. peer_ll.data.streams after only "import peer_ll.data"
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

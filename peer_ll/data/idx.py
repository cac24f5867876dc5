"""IDX files, the format of MNIST and Fashion-MNIST: found, read with torchvision, written.

Reading uses torchvision's own reader (``torchvision.datasets.mnist.
read_sn3_pascalvincent_tensor``), the one behind ``torchvision.datasets.MNIST``. This
module adds what that reader leaves out: gzipped files (detected from the content, not
the name), the file lookup of the four MNIST-style files, and errors that name the file.
``write_idx`` and ``write_mnist_like`` write small files, e.g. test fixtures.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

__all__ = [
    "find_mnist_like_files",
    "load_mnist_like",
    "read_idx",
    "write_idx",
    "write_mnist_like",
]

# IDX dtype code -> numpy dtype; the codes torchvision reads (SN3_PASCALVINCENT_TYPEMAP)
_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype("i2"),
    0x0C: np.dtype("i4"),
    0x0D: np.dtype("f4"),
    0x0E: np.dtype("f8"),
}
_CODES = {d: c for c, d in _DTYPES.items()}
_MAX_DIMS = 3  # torchvision's reader takes 1 to 3 dimensions
_GZIP_MAGIC = b"\x1f\x8b"


@contextmanager
def _plain_copy(path: Path) -> Iterator[Path]:
    """``path`` itself, or a temporary gunzipped copy of it when it is gzipped."""
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC
    if not gzipped:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="peer_ll_idx_") as tmp:
        plain = Path(tmp) / path.name.removesuffix(".gz")
        try:
            with gzip.open(path, "rb") as src, plain.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err
        yield plain


def _check_header(path: Path, plain: Path) -> None:
    """Clear errors for what torchvision's reader only asserts: magic, dtype code, ndim."""
    with plain.open("rb") as f:
        head = f.read(4)
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    if head[:2] != b"\0\0" or head[2] not in _DTYPES or not 1 <= head[3] <= _MAX_DIMS:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{head.hex()}; expected 0x0000, then a dtype "
            f"code in {{{', '.join(hex(c) for c in _DTYPES)}}}, then 1 to {_MAX_DIMS} dimensions"
        )


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file, plain or gzipped, with torchvision's reader.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte`` or ``...ubyte.gz``.

    Returns:
        An array of the shape and dtype the header declares, in native byte
        order, e.g. uint8 (60000, 28, 28) for MNIST training images.

    Raises:
        FileNotFoundError: no such file.
        ValueError: bad magic number, unknown dtype code, more than 3 dimensions,
            truncated or oversized data, or a corrupt gzip stream. The message names the file.
    """
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    path = Path(path)
    with _plain_copy(path) as plain:
        _check_header(path, plain)
        try:
            tensor = read_sn3_pascalvincent_tensor(str(plain), strict=True)
        except (AssertionError, IndexError, RuntimeError, ValueError) as err:
            # torchvision asserts on a size mismatch; torch.frombuffer / view raise otherwise
            raise ValueError(
                f"{path}: IDX data does not match its header's shape and dtype "
                f"(truncated or corrupt file: {err or 'size mismatch'})"
            ) from err
    return tensor.numpy()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file; gzipped when ``path`` ends with ``.gz``.

    Args:
        path: the output file.
        array: (1 to 3 dimensions) an array of uint8, int8, int16, int32,
            float32 or float64, the dtypes ``read_idx`` reads back.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        TypeError: another dtype.
        ValueError: 0 or more than 3 dimensions.
    """
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(
            f"array must have an IDX dtype {[d.name for d in _DTYPES.values()]}, got {array.dtype}"
        )
    if not 1 <= array.ndim <= _MAX_DIMS:
        raise ValueError(f"array must have 1 to {_MAX_DIMS} dimensions, got {array.ndim}")
    big_endian = array.astype(_DTYPES[code].newbyteorder(">"), copy=False)
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    payload = header + big_endian.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


# file stems: "<split>-<kind>-idx<d>-ubyte"; some copies use "<split>-<kind>.idx<d>-ubyte"
_STEMS = {
    "train_images": ("train-images", 3),
    "train_labels": ("train-labels", 1),
    "test_images": ("t10k-images", 3),
    "test_labels": ("t10k-labels", 1),
}


def find_mnist_like_files(root: str | Path, name: str | None = None) -> dict[str, Path] | None:
    """Finds the four MNIST-style IDX files under ``root``.

    Looks in ``root``, ``root/raw`` and, when ``name`` is given, in
    ``root/<name>`` and ``root/<name>/raw`` (torchvision's layout, with ``name``
    such as ``"FashionMNIST"``). Accepts ``train-images-idx3-ubyte`` and
    ``train-images.idx3-ubyte``, each plain or ``.gz``.

    Returns:
        ``{"train_images", "train_labels", "test_images", "test_labels"} -> Path``
        for the first folder holding all four, else None.
    """
    root = Path(root).expanduser()
    folders = [root, root / "raw"]
    if name:
        folders += [root / name, root / name / "raw"]
    for folder in folders:
        found = {}
        for key, (stem, d) in _STEMS.items():
            candidates = [
                folder / f"{stem}{sep}idx{d}-ubyte{gz}" for sep in "-." for gz in ("", ".gz")
            ]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                break
            found[key] = hit
        if len(found) == len(_STEMS):
            return found
    return None


def load_mnist_like(
    root: str | Path, name: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads MNIST-style train and test splits from a folder of IDX files.

    Args:
        root: folder with the files (see ``find_mnist_like_files``).
        name: torchvision dataset folder name, e.g. ``"MNIST"`` or ``"FashionMNIST"``.

    Returns:
        ``(train_images, train_labels, test_images, test_labels)``: images are
        uint8 (N, H, W), 28 x 28 for MNIST; labels are int64 (N,).

    Raises:
        FileNotFoundError: if the four files are not there.
        ValueError: if a file is malformed or images and labels disagree.
    """
    files = find_mnist_like_files(root, name)
    if files is None:
        raise FileNotFoundError(
            f"no train/t10k images/labels IDX files in {Path(root)} "
            f"(also looked in raw/{' and ' + name + '/raw/' if name else ''})"
        )
    out = []
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"])
        labels = read_idx(files[f"{split}_labels"])
        if images.ndim != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"{files[f'{split}_images']}: expected uint8 images (N, H, W), "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{files[f'{split}_labels']}: expected {len(images)} labels (N,), "
                f"got shape {labels.shape}"
            )
        out += [images, labels.astype(np.int64)]
    return out[0], out[1], out[2], out[3]


def write_mnist_like(
    folder: str | Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    gz: bool = True,
) -> Path:
    """Writes the four MNIST-style IDX files into ``folder`` (created if needed).

    Images (N, H, W) and labels (N,) must hold integers in [0, 255]; both are
    written as uint8, as in the original files.

    Returns:
        ``folder`` as a ``Path``; ``load_mnist_like(folder)`` reads it back.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for key, (stem, d) in _STEMS.items():
        a = np.asarray(arrays[key])
        if a.ndim != d or a.min(initial=0) < 0 or a.max(initial=0) > 255:
            raise ValueError(f"{key} must be {d}-D with values in [0, 255], got shape {a.shape}")
        write_idx(folder / f"{stem}-idx{d}-ubyte{'.gz' if gz else ''}", a.astype(np.uint8))
    return folder

"""Reader (and writer) for IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is: two zero bytes, a dtype code byte, a byte with the number of
dimensions d, then d big-endian uint32 sizes, then the data in big-endian
order. Files may be gzipped; gzip is detected from the content, not the name.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = [
    "find_mnist_like_files",
    "load_mnist_like",
    "read_idx",
    "write_idx",
    "write_mnist_like",
]

# IDX dtype code -> big-endian numpy dtype
_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_CODES = {np.dtype(d).newbyteorder("="): c for c, d in _DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | Path) -> np.ndarray:
    """Reads one IDX file, plain or gzipped.

    Args:
        path: the file, e.g. ``train-images-idx3-ubyte`` or ``...ubyte.gz``.

    Returns:
        An array of the shape and dtype the header declares, in native byte
        order, e.g. uint8 (60000, 28, 28) for MNIST training images.

    Raises:
        ValueError: bad magic number, unknown dtype code, truncated or
            oversized data, or a corrupt gzip stream. The message names the file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or code not in _DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()}; expected 0x0000 then a dtype "
            f"code in {{{', '.join(hex(c) for c in _DTYPES)}}} and the number of dimensions"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header (expected {header} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_DTYPES[code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: IDX data has {len(raw) - header} bytes, expected {expected} "
            f"for shape {shape} of {dtype.name} (truncated or corrupt file)"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file; gzipped when ``path`` ends with ``.gz``.

    Args:
        path: the output file.
        array: an array of one of the IDX dtypes (uint8, int8, int16, int32,
            float32, float64) with at most 255 dimensions.

    Returns:
        ``path`` as a ``Path``.
    """
    array = np.asarray(array)
    code = _CODES.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"array must have an IDX dtype {list(_DTYPES.values())}; got {array.dtype}")
    be = array.astype(np.dtype(_DTYPES[code]), copy=False)
    payload = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape) + be.tobytes()
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
                f"{files[f'{split}_images']}: expected uint8 images (N, H, W); "
                f"got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"{files[f'{split}_labels']}: expected {len(images)} labels (N,); "
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
            raise ValueError(f"{key} must be {d}-D with values in [0, 255]; got shape {a.shape}")
        write_idx(folder / f"{stem}-idx{d}-ubyte{'.gz' if gz else ''}", a.astype(np.uint8))
    return folder

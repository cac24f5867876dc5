"""``peer-ll data fetch NAME``: make a dataset's files available locally.

peer_ll never downloads data itself. For Fashion-MNIST, ``fetch`` can install
the Debian package ``dataset-fashion-mnist`` with apt-get (as root); otherwise,
and for MNIST, it explains where to put the IDX files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peer_ll.data.images import (
    ENV_VAR,
    IMAGE_DATASETS,
    TORCHVISION_NAMES,
    find_image_dataset,
    image_search_paths,
)
from peer_ll.experts.checks import check_choice

__all__ = ["DEBIAN_PACKAGES", "fetch", "fetch_instructions"]

DEBIAN_PACKAGES = {"fashion-mnist": "dataset-fashion-mnist"}
_FILES = (
    "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same names unzipped)"
)


def fetch_instructions(name: str) -> str:
    """How to make ``name``'s IDX files available, as text for the user."""
    steps = []
    if name in DEBIAN_PACKAGES:
        steps.append(f"install the Debian package: sudo apt-get install {DEBIAN_PACKAGES[name]}")
    steps.append(
        f"put the four IDX files ({_FILES}) in a folder DIR and set {ENV_VAR}=DIR "
        f"(files in DIR/{name} or DIR itself), or pass --root DIR"
    )
    steps.append(
        f"a torchvision copy (ROOT/{TORCHVISION_NAMES[name]}/raw) is found with --root ROOT too"
    )
    lines = "\n".join(f"  {i}. {s}" for i, s in enumerate(steps, 1))
    return f"To get {name}:\n{lines}"


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def fetch(
    name: str,
    *,
    root: str | Path | None = None,
    run: Callable[..., Any] = subprocess.run,
    which: Callable[[str], str | None] = shutil.which,
    is_root: Callable[[], bool] = _is_root,
    echo: Callable[[str], None] = print,
) -> Path | None:
    """Finds a dataset's files, installing the Debian package when it can.

    Steps: digits ship with scikit-learn (nothing to do, returns None). If the
    IDX files are found (see ``peer_ll.data.images``), says where. Else, for a
    dataset with a Debian package, when ``apt-get`` exists and we are root,
    runs ``apt-get install -y PACKAGE`` (after ``apt-get update`` if the first
    try fails). Otherwise raises with instructions. With ``root`` given only
    that folder counts, and nothing is installed.

    Args:
        name: ``"fashion-mnist"``, ``"mnist"`` or ``"digits"``.
        root: an explicit folder to look in (as ``--root``).
        run: runs a command, ``subprocess.run``-like; tests pass a fake.
        which: finds an executable, like ``shutil.which``.
        is_root: tells whether we may install system packages.
        echo: prints a progress line.

    Returns:
        The folder holding the IDX files; None for digits.

    Raises:
        ValueError: unknown ``name``.
        FileNotFoundError: not found and not installable here; the message
            holds the instructions.
        RuntimeError: apt-get failed, or did not install the expected files.
    """
    check_choice("name", name, IMAGE_DATASETS)
    if name == "digits":
        echo("digits ship with scikit-learn (sklearn.datasets.load_digits); nothing to fetch.")
        return None
    folder = find_image_dataset(name, root)
    if folder is not None:
        echo(f"{name}: found at {folder}")
        return folder
    package = DEBIAN_PACKAGES.get(name)
    if package is None or root is not None or which("apt-get") is None or not is_root():
        looked = ", ".join(str(p) for p in image_search_paths(name, root))
        raise FileNotFoundError(
            f"{name} not found (looked in {looked}).\n" + fetch_instructions(name)
        )
    _apt_install(name, package, run=run, echo=echo)
    folder = find_image_dataset(name)
    if folder is None:
        raise RuntimeError(
            f"apt-get installed {package} but {name} is still not found in "
            f"{', '.join(str(p) for p in image_search_paths(name))}"
        )
    echo(f"{name}: installed at {folder}")
    return folder


def _apt_install(
    name: str, package: str, *, run: Callable[..., Any], echo: Callable[[str], None]
) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", package]
    echo(f"running: {' '.join(install)}")
    try:
        run(install, check=True, env=env)
        return
    except subprocess.CalledProcessError:
        echo("install failed; running: apt-get update, then the install again")
    try:
        run(["apt-get", "update"], check=True, env=env)
        run(install, check=True, env=env)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(
            f"apt-get could not install {package} (exit status {err.returncode}).\n"
            + fetch_instructions(name)
        ) from err

"""Argument checks: one error style for the whole package.

Every check raises ``TypeError`` for a value of the wrong type and ``ValueError`` for
a value of the right type that is out of range, with the message
``"{name} must be {expected}, got {actual!r}"``. Each returns the checked value.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

import torch

from peer_ll.kernels.backend import BACKENDS
from peer_ll.kernels.reference import ACTIVATIONS


def _fail(error: type[Exception], name: str, expected: str, actual: object) -> Exception:
    if error is TypeError:  # name the type too: got str 'a'
        return error(f"{name} must be {expected}, got {type(actual).__name__} {actual!r}")
    return error(f"{name} must be {expected}, got {actual!r}")


def check_int(
    name: str, value: object, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Return ``value`` if it is an int (not a bool) in [minimum, maximum].

    Raises:
        TypeError: ``value`` is not an int.
        ValueError: it is out of range.
    """
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(TypeError, name, f"an int{bounds}", value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(ValueError, name, f"an int{bounds}", value)
    return value


def check_float(
    name: str, value: object, *, minimum: float | None = None, maximum: float | None = None
) -> float:
    """Return ``value`` as a float if it is a real number (not a bool) in [minimum, maximum]."""
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _fail(TypeError, name, f"a float{bounds}", value)
    value = float(value)
    if (
        value != value
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        raise _fail(ValueError, name, f"a float{bounds}", value)
    return value


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise _fail(TypeError, name, "a bool", value)
    return value


def check_choice(name: str, value: object, choices: Iterable[object]) -> object:
    """Return ``value`` if it is one of ``choices``; raise ValueError otherwise."""
    choices = tuple(choices)
    if value not in choices:
        raise _fail(ValueError, name, f"one of {choices}", value)
    return value


def check_type(name: str, value: object, kind: type | tuple[type, ...]) -> object:
    """Return ``value`` if it is an instance of ``kind``; raise TypeError otherwise."""
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{name} must be a {names}, got {type(value).__name__}")
    return value


def check_owner(name: str, value: object) -> int:
    """Owners are non-negative ints (task or experience ids); a 1-element int tensor is one."""
    if (
        isinstance(value, torch.Tensor)
        and value.numel() == 1
        and not (value.is_floating_point() or value.dtype == torch.bool)
    ):
        value = int(value.item())
    return check_int(name, value, minimum=0)


def check_input(x: object, dim: int, name: str = "x") -> torch.Tensor:
    """Check a layer input: a floating tensor of shape (..., dim)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (..., {dim}), got {tuple(x.shape)}")
    return x


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum}, {maximum}]"
    if minimum is not None:
        return f" >= {minimum}"
    return "" if maximum is None else f" <= {maximum}"


def memory_limit(device: torch.device | str | None = None) -> int:
    """Bytes that an allocation on ``device`` may take at most.

    For the CPU that is the memory available now (``MemAvailable`` of /proc/meminfo,
    else the physical memory); for CUDA the device's free memory. A larger request
    would fail or push the machine into swap, so it is refused before anything is
    allocated.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # no sysconf: no bound below 1 PiB
        return 1 << 50


def check_allocation(name: str, nbytes: int, device: torch.device | str | None = None) -> int:
    """Raise ValueError if allocating ``nbytes`` on ``device`` cannot fit in its memory."""
    limit = memory_limit(device)
    if nbytes > limit:
        raise ValueError(
            f"{name} must fit in the {limit / 2**30:.1f} GiB of "
            f"{torch.device('cpu' if device is None else device)} memory, got a "
            f"request for {nbytes / 2**30:.1f} GiB"
        )
    return nbytes


#: The PEER layer's choices (paper defaults first); kernels define BACKENDS and ACTIVATIONS.
QUERY_NORMS = ("batch", "layer", None)
GATES = ("softmax", "sigmoid")


def check_layer_args(dim, dim_out, num_keys, heads, topk, dim_key, capacity, owner) -> tuple:
    """Check the PEER constructor's sizes: (dim_out, capacity, key_capacity, owner) resolved.

    Sub-key room: ``capacity`` rows need ``capacity / num_keys`` sub-keys per side as
    num_keys-wide segments, or ``num_keys + ⌈√spare rows⌉`` as square ones: the larger.
    """
    check_int("dim", dim, minimum=1)
    dim_out = dim if dim_out is None else check_int("dim_out", dim_out, minimum=1)
    for name, value in (("num_keys", num_keys), ("heads", heads)):
        check_int(name, value, minimum=1)
    check_int("topk", topk, minimum=1, maximum=num_keys * num_keys)
    check_int("dim_key", dim_key, minimum=2)
    if dim_key % 2:
        raise ValueError(f"dim_key must be even (it splits into two halves), got {dim_key}")
    first = num_keys * num_keys
    capacity = first if capacity is None else check_int("capacity", capacity, minimum=first)
    spare = math.isqrt(capacity - first - 1) + 1 if capacity > first else 0
    key_capacity = max(math.ceil(capacity / num_keys), num_keys + spare)
    return dim_out, capacity, key_capacity, check_owner("owner", owner)


def check_choices(**choices: object) -> None:
    """Check the PEER constructor's choices (query_norm, gate, activation, backend)."""
    allowed = dict(query_norm=QUERY_NORMS, gate=GATES, activation=ACTIVATIONS, backend=BACKENDS)
    for name, value in choices.items():
        check_choice(name, value, allowed[name])

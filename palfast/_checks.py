"""Argument checks shared by every public function (the bottom layer, beside _ops).

Each check names the function and the argument and says what was expected and
what was given: ``"<op>: <name> must be ..., got ..."``. Python's truthiness is
never trusted: ``normalize='no'`` is an error, not ``True``.
"""

from __future__ import annotations

import argparse
import numbers
import sys

import numpy as np
import torch

__all__ = [
    "FLOAT_DTYPES",
    "as_long_vector",
    "check_bool",
    "check_callable",
    "check_choice",
    "check_device",
    "check_id_vector",
    "check_instance",
    "check_int",
    "check_number",
    "check_tensor",
    "count_nonfinite_rows",
    "int_at_least",
]

#: The embedding dtypes every kernel takes (accumulating 16-bit ones in float32).
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_bool(op: str, name: str, value) -> bool:
    """``value`` as a bool; only ``True``/``False`` (Python or NumPy) are accepted."""
    if isinstance(value, bool | np.bool_):  # np.bool_: numpy.bool_ (NumPy 1), numpy.bool (2)
        return bool(value)
    raise TypeError(f"{op}: {name} must be True or False, got {value!r} ({type(value).__name__})")


def check_int(op: str, name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (Python or NumPy, never a bool or a float) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f"{minimum} <= "
        hi = "" if maximum is None else f" <= {maximum}"
        raise ValueError(f"{op}: {name} must satisfy {lo}{name}{hi}, got {value}")
    return value


#: The largest finite float64: x is finite exactly when -_FLOAT_MAX <= x <= _FLOAT_MAX.
_FLOAT_MAX = sys.float_info.max


def _is_finite(value) -> bool:
    """``math.isfinite`` also for ``torch.SymFloat``: under ``torch.compile(dynamic=True)``
    numbers are traced as symbols, which ``math.isfinite`` cannot take (a comparison
    becomes a guard instead). NaN fails both comparisons."""
    return -_FLOAT_MAX <= value <= _FLOAT_MAX


def check_number(
    op: str, name: str, value, minimum: float | None = None, *, strict: bool = False, maximum: float | None = None
) -> float:
    """A finite real number ≥ minimum (> minimum when ``strict``) and ≤ maximum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    low = minimum is not None and (value <= minimum if strict else value < minimum)
    high = maximum is not None and value > maximum
    if not _is_finite(value) or low or high:
        bound = "a finite number"
        if minimum is not None:
            bound += f" {'>' if strict else '>='} {minimum:g}"
        if maximum is not None:
            bound += f"{' and' if minimum is not None else ''} <= {maximum:g}"
        raise ValueError(f"{op}: {name} must be {bound}, got {value}")
    return value


def check_device(op: str, name: str, value) -> torch.device:
    """``value`` (a ``torch.device``, a string such as ``"cuda:0"`` or a device index) as
    a ``torch.device``."""
    if isinstance(value, bool):
        raise TypeError(
            f"{op}: {name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {value!r}"
        )
    try:
        return torch.device(value)
    except (RuntimeError, TypeError, ValueError) as e:
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{op}: {name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {value!r}"
        ) from e


def check_choice(op: str, name: str, value, choices: tuple):
    """One of ``choices`` (compared with ==, so strings only match strings)."""
    if not isinstance(value, str | int) or isinstance(value, bool) or value not in choices:
        raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    return value


_INT64_MAX = 2**63 - 1


def as_long_vector(op: str, name: str, x) -> torch.Tensor:
    """``x`` (a tensor, NumPy array or sequence of integers) as a 1-D int64 tensor,
    refusing values beyond int64 (numpy uint64, Python ints ≥ 2**63) with a message
    instead of wrapping them or failing inside torch."""
    if isinstance(x, np.ndarray) and x.dtype.kind == "u" and x.size and int(x.max()) > _INT64_MAX:
        raise ValueError(f"{op}: {name} must fit in int64, got {int(x.max())}")
    try:
        t = torch.as_tensor(x)
    except (OverflowError, RuntimeError, TypeError, ValueError) as e:
        if "verflow" in str(e):
            raise ValueError(f"{op}: {name} must fit in int64, got {x!r:.80}") from e
        raise TypeError(f"{op}: {name} must be a 1-D tensor of int64 values, got {x!r:.80} ({e})") from e
    if t.dim() != 1:
        raise ValueError(f"{op}: {name} must be a 1-D tensor, got shape {tuple(t.shape)}")
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{op}: {name} must hold integers, got {t.dtype}")
    if t.dtype == torch.uint64 and t.numel() and bool((t.view(torch.int64) < 0).any()):
        raise ValueError(f"{op}: {name} must fit in int64, got a value >= 2**63")
    return t.to(torch.long)


def check_id_vector(op: str, name: str, values, n: int, what: str) -> torch.Tensor:
    """``values`` as an int64 CPU vector of n integer ids >= 0, one per row
    (``what`` names them in errors: "sample id", "class id")."""
    if isinstance(values, torch.Tensor) and values.dim() != 1 or (isinstance(values, np.ndarray) and values.ndim != 1):
        raise ValueError(
            f"{op}: {name} must be a [N] = [{n}] vector of {what}s (one per row), got shape {tuple(values.shape)}"
        )
    t = as_long_vector(op, name, values)
    if t.shape != (n,):
        raise ValueError(
            f"{op}: {name} must be a [N] = [{n}] vector of {what}s (one per row), got shape {tuple(t.shape)}"
        )
    t = t.detach().to(device="cpu")
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {int(t.min())}")
    return t


def check_tensor(
    op: str,
    name: str,
    x,
    *,
    min_rows: int = 0,
    floating: bool = True,
    finite: bool = False,
    dtypes: tuple | None = None,
) -> torch.Tensor:
    """A 2-D tensor ``[N, D]`` with N ≥ min_rows and D ≥ 1 (floating point unless told;
    one of ``dtypes`` when given, e.g. :data:`FLOAT_DTYPES`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise TypeError(
            f"{op}: {name} must be a regular tensor, got a nested tensor; pass "
            f"{name}.to_padded_tensor(0.0) or torch.cat of its components"
        )
    if x.layout != torch.strided:
        raise TypeError(f"{op}: {name} must be a dense (strided) tensor, got {x.layout}; pass {name}.to_dense()")
    if x.dim() != 2:
        raise ValueError(f"{op}: {name} must be a 2-D tensor [N, D], got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = [str(t).removeprefix("torch.") for t in dtypes]
        names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]
        raise TypeError(f"{op}: {name} must be {names}, got {x.dtype}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be floating point, got {x.dtype}")
    if x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(
            f"{op}: {name} must have at least {min_rows} rows and D >= 1 columns, got shape {tuple(x.shape)}"
        )
    if finite:
        bad = count_nonfinite_rows(x)
        if bad:
            raise ValueError(f"{op}: {name} must be finite, got {bad} rows with NaN or Inf")
    return x


#: Bytes of a tensor :func:`count_nonfinite_rows` scans at a time: only one chunk's bool
#: mask exists at once (8 MiB for float32 at 32 MiB), never one of the tensor's size.
FINITE_SCAN_BYTES = 1 << 25
#: CPU dtypes scanned by NumPy's ``isfinite``: with torch 2.x on CPU ``torch.isfinite``
#: ran at about 0.2 GB/s, NumPy's at about 4 GB/s (0.12 s against 1.9 s for a 512 MB
#: float32 memory map, one thread; docs/annotate.md, "Large pools").
_NUMPY_SCANNED = (torch.float16, torch.float32, torch.float64)


def count_nonfinite_rows(x: torch.Tensor, rows: int | None = None) -> int:
    """The number of rows of the 2-D tensor ``x`` holding a NaN or an Inf (0: all finite).

    Scanned ``rows`` rows at a time (default: :data:`FINITE_SCAN_BYTES` of them), so a
    memory-mapped tensor is read once and only one chunk's mask is allocated. CPU
    float16/32/64 chunks go through NumPy (no copy: a view of the chunk), other dtypes
    and devices through ``torch.isfinite`` with one host sync at the end."""
    x = x.detach()
    if x.numel() == 0:
        return 0
    step = rows if rows is not None else max(1, FINITE_SCAN_BYTES // (x.element_size() * x.shape[1]))
    if x.device.type == "cpu" and x.dtype in _NUMPY_SCANNED:
        bad = 0
        for a in range(0, x.shape[0], step):
            chunk = x[a : a + step].numpy()
            if not np.isfinite(chunk).all():
                bad += int((~np.isfinite(chunk)).any(1).sum())
        return bad
    return int(sum((~torch.isfinite(x[a : a + step])).any(1).sum() for a in range(0, x.shape[0], step)))


def check_instance(op: str, name: str, value, cls: type | tuple, what: str):
    """``value`` if it is an instance of ``cls`` (``what`` names the type in the error,
    e.g. "a torch.nn.Module"), else TypeError."""
    if isinstance(value, cls):
        return value
    raise TypeError(f"{op}: {name} must be {what}, got {type(value).__name__}")


def check_callable(op: str, name: str, value, signature: str):
    """``value`` if it is callable (``signature`` shows how it is called), else TypeError."""
    if callable(value):
        return value
    raise TypeError(f"{op}: {name} must be a callable {signature}, got {type(value).__name__}")


def int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (argparse names the option in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    return parse

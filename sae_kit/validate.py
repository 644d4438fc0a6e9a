"""Argument checks shared by the public API: each failure names the argument, the value, and the fix.

Checks run before anything is created on disk, so a bad argument never leaves a half-made folder.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch


def integer(name: str, value, *, min: int | None = None, max: int | None = None, hint: str = "") -> int:
    """`value` as an int. Integral floats (``2e5``) are accepted; other floats, strings and bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a whole number, got {type(value).__name__} {value!r}{hint}")
    if isinstance(value, numbers.Integral):
        v = int(value)
    else:
        if not math.isfinite(value) or not float(value).is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}{hint}")
        v = int(value)
    if min is not None and v < min:
        raise ValueError(f"{name} must be at least {min}, got {v}{hint}")
    if max is not None and v > max:
        raise ValueError(f"{name} must be at most {max}, got {v}{hint}")
    return v


def real(name: str, value, *, min: float | None = None, max: float | None = None, strict_min: bool = False,
         hint: str = "") -> float:
    """`value` as a finite float within bounds (`strict_min`: must exceed `min`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}{hint}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}{hint}")
    if min is not None and (v <= min if strict_min else v < min):
        raise ValueError(f"{name} must be {'greater than' if strict_min else 'at least'} {min:g}, got {v:g}{hint}")
    if max is not None and v > max:
        raise ValueError(f"{name} must be at most {max:g}, got {v:g}{hint}")
    return v


def activations(x, d_in: int, dtype: torch.dtype, what: str = "activations") -> torch.Tensor:
    """Check a batch of activations [batch, d_in] and return it in `dtype`.

    Refuses non-tensors, integer tensors, a wrong shape, and NaN/Inf; converts other float dtypes
    (float64, float16, bfloat16) to `dtype` with a warning, since the SAE's weights are in `dtype`.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor [batch, {d_in}], got {type(x).__name__}; "
                        f"wrap a numpy array with torch.from_numpy(x)")
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(f"expected {what} of shape [batch, {d_in}], got {tuple(x.shape)}; "
                         f"this SAE was built for d_in={d_in}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {x.dtype}; convert with x.float()")
    if x.dtype != dtype:
        warnings.warn(f"{what} are {x.dtype}; converting them to the SAE's {dtype}", UserWarning, stacklevel=3)
        x = x.to(dtype)
    if not all_finite(x):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"{what} hold NaN or Inf in {bad} of {len(x)} rows; the SAE cannot encode them. "
                         f"Check where they came from (a corrupt store, an overflow in float16)")
    return x


def all_finite(x: torch.Tensor) -> bool:
    """Whether a float tensor holds no NaN or ±Inf (an empty one holds none): one pass (min and max
    together, both propagate NaN), where ``torch.isfinite(x).all()`` makes four passes and a mask as
    large as x (~1 ms of a 60 ms training step on 2 CPU cores)."""
    if x.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(x)
    except (RuntimeError, NotImplementedError):  # a device or dtype without aminmax
        return bool(torch.isfinite(x).all())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))

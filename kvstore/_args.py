"""Integer arguments: any integral scalar (``int``, numpy integers, 0-d integer torch tensors), never a bool;
durations: any finite real number of seconds."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch


def integral(value: object) -> Optional[int]:
    """``value`` as an ``int`` when it is an integral scalar (``operator.index``), else None.

    Bools (``True``, ``numpy.bool_``, bool tensors) are refused, and so are tensors that are not 0-d
    integer tensors (``operator.index`` would take any one-element integer tensor)."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            return None
        return int(value.item())
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def seconds(value: object) -> Optional[float]:
    """``value`` as a float when it is a finite real number (``int``, ``float``, numpy scalars), else None
    (bools, strings, NaN and infinities included)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def describe(value: object) -> str:
    """``type value`` for messages, short for tensors and arrays."""
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"

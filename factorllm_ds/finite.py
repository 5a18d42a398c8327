"""NaN and Inf stopped where they enter: in tensors a command reads, and in float flags.

:func:`check_finite` names the tensor and the first bad index; :func:`finite_float` and :func:`parse_finite_float`
refuse nan/inf in flags, which would otherwise pass every ``x > 0`` check after them.
"""

from __future__ import annotations

import argparse
import math

from factorllm_ds.errors import UserError


def check_finite(name: str, tensor, fix: str = "") -> None:
    """Raise :class:`UserError` naming ``name`` when ``tensor`` holds NaN or ±Inf; ``fix`` says what to do."""
    import torch

    if not tensor.is_floating_point() and not tensor.is_complex():
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int((~finite).sum()) - nan
    first = tuple(int(i) for i in (~finite).nonzero()[0].tolist())
    raise UserError(f"{name}: {nan} NaN and {inf} Inf values out of {tensor.numel()} (first at index {first})."
                    + (f" {fix}" if fix else ""))


def finite_float(flag: str, value) -> float:
    """``value`` (str or number) as a float; :class:`UserError` naming ``flag`` if it is not a finite number."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{flag} {value!r}: not a number") from None
    if not math.isfinite(number):
        raise UserError(f"{flag} {value!r}: must be a finite number (not nan or inf)")
    return number


def parse_finite_float(text: str) -> float:
    """argparse ``type=`` for float flags: argparse reports ``argument --lr: ...`` for nan/inf/junk."""
    try:
        return finite_float("", text)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err).strip()) from None

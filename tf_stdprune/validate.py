"""Argument checks shared by the library: one place for what a valid argument is.

Every check returns the value converted to a plain Python number, or raises `ValueError`
with a message that names the argument, says what it must be and shows the value given.
Booleans are refused wherever a number is expected (``True`` is not a bit width).
"""
import math
import numbers

import numpy as np

MAX_BITS = 12  # weight-sharing bits: at most 2^12 shared values per tensor
# The largest float32: a larger q would overflow to inf in the float32 threshold q * sigma.
MAX_QUALITY = 3.4028234663852886e38


class NonFiniteError(FloatingPointError):
    """Training produced NaN or infinite weights or losses (the run diverged)."""


def check_finite(layer, step, tensors):
    """Raises `NonFiniteError` unless every entry of every ``(name, value)`` of ``tensors``
    is finite; the message names ``layer``, the first bad tensor and ``step``.

    The pruning rule's ``|w| >= q * sigma`` is false for NaN, so a mask update on such a
    tensor would prune it whole; the wrappers call this before they change anything.

    Examples:
      >>> check_finite("dense", 7, [("kernel", [1.0, 2.0])])   # passes
      >>> check_finite("dense", 7, [("kernel", [1.0, float("nan")])])
      Traceback (most recent call last):
      NonFiniteError: Layer 'dense', tensor kernel: 1 of 2 values are NaN or infinite at step 7 ...
    """
    for name, value in tensors:
        array = np.asarray(value, dtype=np.float64)
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise NonFiniteError(
                f"Layer {layer!r}, tensor {name}: {bad} of {array.size} values are NaN or "
                f"infinite at step {step}, so it cannot be pruned; its masks, weights and "
                "optimizer slots were left as they were. Training diverged: lower the "
                "learning rate (or q) and restart from the last good checkpoint."
            )


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_quality(q, where):
    """``q`` as a float; raises unless it is a finite number in [0, MAX_QUALITY] (a
    multiple of a std that the float32 threshold ``q * sigma`` can hold)."""
    if not _is_real(q) or not math.isfinite(q) or q < 0 or q > MAX_QUALITY:
        raise ValueError(
            f"{where} must be a finite number >= 0 and <= {MAX_QUALITY:.4g} (the multiple of "
            f"the layer's std below which weights are pruned), got {q!r}."
        )
    return float(q)


def check_int(value, where, minimum, fix=""):
    """``value`` as an int; raises unless it is an integer >= ``minimum``.

    ``fix`` says what the argument means (e.g. ``"the first step that prunes"``).
    """
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        meaning = f" ({fix})" if fix else ""
        raise ValueError(f"{where} must be an integer >= {minimum}{meaning}, got {value!r}.")
    return int(value)


def check_positive(value, where, fix=""):
    """``value`` as a float; raises unless it is a finite number > 0."""
    if not _is_real(value) or not math.isfinite(value) or value <= 0:
        meaning = f" ({fix})" if fix else ""
        raise ValueError(f"{where} must be a finite number > 0{meaning}, got {value!r}.")
    return float(value)


def check_nonnegative(value, where, fix=""):
    """``value`` as a float; raises unless it is a finite number >= 0."""
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        meaning = f" ({fix})" if fix else ""
        raise ValueError(f"{where} must be a finite number >= 0{meaning}, got {value!r}.")
    return float(value)


def check_bits(bits, where, allow_none=True):
    """``bits`` as an int in ``[1, MAX_BITS]`` (``2^bits`` shared values), or None when
    ``allow_none`` (the tensor is left unquantized)."""
    if bits is None and allow_none:
        return None
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) \
            or not 1 <= bits <= MAX_BITS:
        alternative = " (or None: not quantized)" if allow_none else ""
        raise ValueError(f"{where} must be an integer in [1, {MAX_BITS}]{alternative}, "
                         f"got {bits!r} ({type(bits).__name__}).")
    return int(bits)

"""An independent numpy (float64) re-implementation of the std rule, for comparisons."""
import numpy as np


def reference_std(weights, keep):
    """Population std of the finite entries of ``weights`` where ``keep`` is true."""
    weights = np.asarray(weights, np.float64)
    keep = np.asarray(keep, bool) & np.isfinite(weights)
    if not keep.any():
        return 0.0
    return float(np.std(weights[keep]))


def reference_step(weights, mask, q, std_mode, initial_sigma=None):
    """One pruning step: returns ``(new_mask, sigma)`` with ``m_new = m & (|w| >= q*sigma)``."""
    weights = np.asarray(weights, np.float32)
    mask = np.asarray(mask, bool)
    if std_mode == "surviving":
        sigma = reference_std(weights, mask)
    elif std_mode == "initial" and initial_sigma is not None:
        sigma = initial_sigma
    else:
        sigma = reference_std(weights, np.ones_like(mask))
    with np.errstate(invalid="ignore"):
        keep = np.abs(weights.astype(np.float64)) >= q * sigma
    return mask & keep, sigma

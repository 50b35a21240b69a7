"""The standard-deviation pruning rule of Han et al. (2015), as pure TensorFlow functions.

For a weight tensor ``w`` with current mask ``m`` (1 = kept, 0 = pruned) and a quality
parameter ``q`` the rule is::

    threshold = q * sigma
    m_new     = m AND (|w| >= threshold)

so a pruned connection never comes back. ``sigma`` depends on ``std_mode``:

* ``"initial"``   -- ``sigma_0 = std(w)`` over all entries of the tensor at the *first*
  pruning step, stored and reused afterwards (Distiller's SensitivityPruner);
* ``"surviving"`` -- ``std({w_i : m_i = 1})``, the spread of the weights still alive;
* ``"all"``       -- ``std(w)`` over the whole current tensor, pruned zeros included.

``std`` is the population standard deviation ``sqrt(sum_i (w_i - mu)^2 / n)`` taken over
the finite entries only (NaN and +-inf are left out of the statistics). A tensor whose
statistics are all equal has ``sigma = 0``, hence ``threshold = 0`` and nothing is pruned.
``|NaN| >= t`` is false, so a NaN weight is pruned; the mask itself is never NaN.
"""
import types

import tensorflow as tf

STD_MODES = ("initial", "surviving", "all")
UNSET_SIGMA = -1.0  # value of a stored sigma before the first pruning step

# The rule is written once, against NumPy-style names; `ops` says whose functions they are.
# TensorFlow's serve the tf_keras path, `keras3_ops()` the Keras 3 path on any backend.
TF_OPS = types.SimpleNamespace(
    abs=tf.abs, cast=tf.cast, cond=tf.cond, isfinite=tf.math.is_finite,
    logical_and=tf.logical_and, max=tf.reduce_max, maximum=tf.maximum, ones_like=tf.ones_like,
    sqrt=tf.sqrt, square=tf.square, sum=tf.reduce_sum, where=tf.where, zeros_like=tf.zeros_like,
)


def keras3_ops():
    """The rule's functions from Keras 3's ``keras.ops`` (the backend the user chose)."""
    from keras import ops

    names = ("abs", "cast", "cond", "isfinite", "logical_and", "max", "maximum", "ones_like",
             "sqrt", "square", "sum", "where", "zeros_like")
    return types.SimpleNamespace(**{name: getattr(ops, name) for name in names})


def masked_std(weights, mask, ops=TF_OPS):
    """Population std of the finite entries of ``weights`` where ``mask`` is 1.

    ``sigma = s * sqrt(sum_i k_i (w_i/s - mu)^2 / n)``, ``mu = sum_i k_i w_i/s / n``,
    ``k_i = m_i * isfinite(w_i)``, ``n = max(1, sum_i k_i)``, ``s = max_i k_i |w_i|``.
    Dividing by ``s`` first keeps the squares from overflowing float32.
    """
    weights = ops.cast(weights, "float32")
    keep = ops.logical_and(ops.cast(mask, "bool"), ops.isfinite(weights))
    values = ops.where(keep, weights, ops.zeros_like(weights))
    scale = ops.max(ops.abs(values))
    scale = ops.where(scale > 0.0, scale, 1.0)
    values = values / scale
    count = ops.maximum(ops.sum(ops.cast(keep, "float32")), 1.0)
    mean = ops.sum(values) / count
    deviation = ops.where(keep, values - mean, ops.zeros_like(values))
    return scale * ops.sqrt(ops.sum(ops.square(deviation)) / count)


def layer_sigma(weights, mask, std_mode, stored_sigma, ops=TF_OPS):
    """The ``sigma`` of the rule for ``std_mode`` (see the module docstring).

    ``stored_sigma`` is the sigma kept from the first pruning step; it is only read in
    ``"initial"`` mode, and only if it was set (``>= 0``).
    """
    if std_mode == "surviving":
        return masked_std(weights, mask, ops)
    dense_sigma = lambda: masked_std(weights, ops.ones_like(mask), ops)  # noqa: E731
    if std_mode == "all":
        return dense_sigma()
    if std_mode == "initial":
        return ops.cond(stored_sigma >= 0.0, lambda: stored_sigma + 0.0, dense_sigma)
    raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}.")


def prune_mask(weights, mask, threshold, ops=TF_OPS):
    """``m_new = m * [|w| >= threshold]``, in the dtype of ``mask``."""
    keep = ops.abs(ops.cast(weights, "float32")) >= threshold
    return mask * ops.cast(keep, mask.dtype)


def apply_mask(weights, mask, ops=TF_OPS):
    """``w * m``, except that pruned entries are exactly 0.0 even where ``w`` is NaN/inf."""
    return ops.where(ops.cast(mask, "bool"), weights, ops.zeros_like(weights))


def std_rule(weights, mask, quality, std_mode, stored_sigma, ops=TF_OPS):
    """One application of the rule: ``(m_new, threshold, sigma, w * m_new)`` with
    ``threshold = q * sigma`` and ``m_new = m AND (|w| >= threshold)``."""
    weights = ops.cast(weights, "float32")
    sigma = layer_sigma(weights, mask, std_mode, stored_sigma, ops)
    threshold = quality * sigma
    new_mask = prune_mask(weights, mask, threshold, ops)
    return new_mask, threshold, sigma, apply_mask(weights, new_mask, ops)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def std_prune(weights, mask, quality, std_mode, stored_sigma):
    """One application of the rule, compiled with XLA into a few fused passes.

    One trace serves every kernel shape of a rank (``reduce_retracing``), so a model
    with many kernel shapes does not retrace; XLA still compiles each shape once.

    Returns ``(m_new, threshold, sigma, w * m_new)`` with ``threshold = q * sigma``.
    XLA flushes subnormal floats to zero: a subnormal ``q`` acts as ``q = 0``, and a
    subnormal ``q * sigma`` gives ``threshold = 0``.
    """
    return std_rule(weights, mask, quality, std_mode, stored_sigma)

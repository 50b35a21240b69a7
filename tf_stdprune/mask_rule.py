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
statistics are all equal has ``sigma = 0``, hence ``threshold = 0`` and nothing is pruned,
whatever ``q``. ``|NaN| >= t`` is false, so a NaN weight is pruned; the mask itself is never
NaN.

Block sparsity (`std_prune_blocks`) applies the same rule to blocks of a 2-D tensor: with
``P[b] = pool_{i in b} |w_i|`` (AVG: the mean, MAX: the largest, over the block's entries;
edge blocks are partial), a block is kept iff ``P[b] >= q * sigma(P)`` and ``sigma`` is taken
over the pooled magnitudes as above (``"surviving"``: over blocks with a kept entry).

`sparsity_prune` serves tfmot's sparsity schedules by their meaning: it keeps the
``n - round(s * n)`` largest ``|w|`` (ties at the threshold kept), so that a target
sparsity ``s`` is reached.
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

    names = ("abs", "cast", "isfinite", "logical_and", "max", "maximum", "ones_like",
             "sqrt", "square", "sum", "where", "zeros_like")
    # Both branches are cheap reductions: ``where`` evaluates them eagerly, where a
    # backend ``cond`` (JAX's lax.cond) would trace and compile the branches on every call.
    return types.SimpleNamespace(cond=lambda pred, true_fn, false_fn: ops.where(
        pred, true_fn(), false_fn()), **{name: getattr(ops, name) for name in names})


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


def std_threshold(quality, sigma, ops=TF_OPS):
    """``q * sigma``, and 0 when ``sigma == 0`` (so ``inf * 0`` never gives NaN)."""
    return ops.where(sigma > 0.0, quality * sigma, ops.zeros_like(sigma))


def std_rule(weights, mask, quality, std_mode, stored_sigma, ops=TF_OPS):
    """One application of the rule: ``(m_new, threshold, sigma, w * m_new)`` with
    ``threshold = q * sigma`` and ``m_new = m AND (|w| >= threshold)``."""
    weights = ops.cast(weights, "float32")
    sigma = layer_sigma(weights, mask, std_mode, stored_sigma, ops)
    threshold = std_threshold(quality, sigma, ops)
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


def block_magnitudes(weights, block_size, pooling):
    """``P[b] = pool(|w|)`` over ``block_size`` blocks of a 2-D tensor (``"AVG"``/``"MAX"``).

    The tensor is padded with zeros to whole blocks; an edge block's mean is taken over
    its real entries only.
    """
    rows, cols = block_size
    height, width = weights.shape
    pad = [[0, -height % rows], [0, -width % cols]]
    shape = [(height + pad[0][1]) // rows, rows, (width + pad[1][1]) // cols, cols]
    magnitudes = tf.reshape(tf.pad(tf.abs(tf.cast(weights, tf.float32)), pad), shape)
    if pooling == "MAX":
        return tf.reduce_max(magnitudes, axis=[1, 3])
    counts = tf.reshape(tf.pad(tf.ones([height, width]), pad), shape)
    return tf.reduce_sum(magnitudes, axis=[1, 3]) / tf.reduce_sum(counts, axis=[1, 3])


def expand_blocks(block_values, block_size, shape):
    """Repeats each block's value over its entries, cropped to ``shape``."""
    rows, cols = block_size
    expanded = tf.repeat(tf.repeat(block_values, rows, axis=0), cols, axis=1)
    return expanded[: shape[0], : shape[1]]


def std_prune_blocks(weights, mask, quality, std_mode, stored_sigma, block_size, pooling):
    """The rule on pooled block magnitudes (see the module docstring).

    Returns ``(m_new, threshold, sigma, w * m_new)`` like `std_prune`; ``m_new`` is
    ``m`` AND the kept blocks expanded to entries, so a pruned entry never comes back.
    """
    weights = tf.cast(weights, tf.float32)
    pooled = block_magnitudes(weights, block_size, pooling)
    alive = block_magnitudes(mask, block_size, "MAX")  # 1 for a block with a kept entry
    sigma = layer_sigma(pooled, alive, std_mode, stored_sigma)
    threshold = std_threshold(quality, sigma)
    keep = expand_blocks(tf.cast(pooled >= threshold, mask.dtype), block_size, weights.shape)
    new_mask = mask * keep
    return new_mask, threshold, sigma, apply_mask(weights, new_mask)


def sparsity_prune(weights, mask, sparsity):
    """Keeps the ``n - round(sparsity * n)`` largest ``|w|`` (and pruned entries stay pruned).

    Returns ``(m_new, threshold, w * m_new)``; ``threshold`` is the smallest kept ``|w|``.
    """
    weights = tf.cast(weights, tf.float32)
    magnitudes = tf.reshape(tf.abs(apply_mask(weights, mask)), [-1])
    size = tf.size(magnitudes)
    keep = size - tf.cast(tf.round(tf.cast(sparsity, tf.float32) * tf.cast(size, tf.float32)),
                          tf.int32)
    keep = tf.clip_by_value(keep, 1, size)
    threshold = tf.math.top_k(magnitudes, k=keep, sorted=True).values[-1]
    new_mask = prune_mask(weights, mask, threshold)
    return new_mask, threshold, apply_mask(weights, new_mask)

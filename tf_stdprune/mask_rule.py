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

N:M sparsity (`m_by_n_mask`, ``sparsity_m_by_n=(m, n)``, tfmot's meaning: at least ``m``
zeros in every ``n`` consecutive weights) groups a kernel along its *input* dimension, as
TFLite lays kernels out: a Dense kernel ``[in, out]`` is read as ``out`` rows of ``in``
weights, a Conv2D kernel ``[h, w, in, out]`` as ``out * h * w`` rows of ``in`` weights, and
each row is cut into groups of ``n`` consecutive entries (the last one partial when ``n``
does not divide ``in``). Combined with the std rule the order is::

    1. k_nm   = 1 for the n - m largest |w| among the kept entries of each group
                (all kept entries of a partial group up to n - m; ties: the lower index)
    2. m'     = m AND k_nm
    3. sigma  = sigma of std_mode with m' as the mask ("surviving": std over m';
                "all" and "initial": over the whole tensor, as without N:M)
    4. m_new  = m' AND (|w| >= q * sigma)

so every group keeps at most ``n - m`` weights whatever ``q`` (``q = 0`` gives plain N:M),
and the q·sigma step can only remove more.

`sparsity_prune` serves tfmot's sparsity schedules by their meaning: it keeps the
``n - round(s * n)`` largest ``|w|`` (ties at the threshold kept), so that a target
sparsity ``s`` is reached.
"""
import types

import numpy as np
import tensorflow as tf

STD_MODES = ("initial", "surviving", "all")
UNSET_SIGMA = -1.0  # value of a stored sigma before the first pruning step

# The rule is written once, against NumPy-style names; `ops` says whose functions they are.
# TensorFlow's serve the tf_keras path, `keras3_ops()` the Keras 3 path on any backend.
TF_OPS = types.SimpleNamespace(
    abs=tf.abs, cast=tf.cast, cond=tf.cond, isfinite=tf.math.is_finite,
    logical_and=tf.logical_and, max=tf.reduce_max, maximum=tf.maximum, ones_like=tf.ones_like,
    sqrt=tf.sqrt, square=tf.square, sum=tf.reduce_sum, where=tf.where, zeros_like=tf.zeros_like,
    transpose=tf.transpose, reshape=tf.reshape, pad=tf.pad, expand_dims=tf.expand_dims,
    logical_or=tf.logical_or, repeat=tf.repeat,
)


def keras3_ops():
    """The rule's functions from Keras 3's ``keras.ops`` (the backend the user chose)."""
    from keras import ops

    names = ("abs", "cast", "isfinite", "logical_and", "max", "maximum", "ones_like",
             "sqrt", "square", "sum", "where", "zeros_like", "transpose", "reshape", "pad",
             "expand_dims", "logical_or", "repeat")
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


def check_m_by_n(m_by_n, name="sparsity_m_by_n"):
    """``(m, n)`` as a tuple of two ints with ``0 <= m < n``; None stays None.

    Raises ValueError naming ``name`` and the value otherwise.
    """
    if m_by_n is None:
        return None
    if (not isinstance(m_by_n, (tuple, list)) or len(m_by_n) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in m_by_n)
            or not 0 <= m_by_n[0] < m_by_n[1]):
        raise ValueError(
            f"{name} must be (m, n), two integers with 0 <= m < n (at least m zeros in "
            f"every n consecutive weights, e.g. (2, 4)), got {m_by_n!r}.")
    return tuple(m_by_n)


def check_m_by_n_ranks(layer_name, tensors, m_by_n):
    """Raises ValueError unless every tensor has a rank N:M sparsity groups (2 or 4)."""
    if m_by_n is None:
        return
    shapes = [tuple(w.shape) for w in tensors]
    if any(len(shape) not in (2, 4) for shape in shapes):
        raise ValueError(
            f"sparsity_m_by_n={m_by_n} groups the input dimension of Dense and Conv2D "
            f"kernels (rank 2 or 4), but layer {layer_name!r} has tensors of shapes {shapes}: "
            f"pass skip=[{layer_name!r}] (or prune_batchnorm=False for BatchNormalization).")


def m_by_n_groups(shape, n):
    """How a kernel of ``shape`` is grouped for N:M sparsity (module docstring):
    ``(perm, rows, inputs, pad)``: the transpose that puts the input axis last (rank 2:
    ``[out, in]``, rank 4: ``[out, h, w, in]``), the number of rows, the input size and
    the padding that completes the last group. Raises ValueError for other ranks."""
    if len(shape) == 2:
        perm = (1, 0)
    elif len(shape) == 4:
        perm = (3, 0, 1, 2)
    else:
        raise ValueError(
            f"N:M sparsity groups the input dimension of Dense (rank 2) and Conv2D "
            f"(rank 4) kernels; a tensor of shape {tuple(shape)} has none.")
    inputs = int(shape[perm[-1]])
    rows = 1
    for d in shape:
        rows *= int(d)
    return perm, rows // inputs, inputs, -inputs % n


def m_by_n_mask(weights, mask, m_by_n, ops=TF_OPS):
    """``k_nm``: 1 for the ``n - m`` largest ``|w|`` among the kept entries (``mask`` 1) of
    every group of ``n`` consecutive weights along the input dimension, else 0 (module
    docstring; ``(m, n) = m_by_n``), in the shape and dtype of ``mask``.

    An entry's rank in its group is the number of entries that beat it: a larger
    magnitude, or the same magnitude at a lower index; it is kept iff its rank is below
    ``n - m``. Pruned entries and the padding of a partial group count as ``-1``, below
    every kept entry. NaN beats nothing and is beaten by nothing; the std step prunes it.
    """
    m, n = m_by_n
    shape = tuple(weights.shape)
    perm, rows, inputs, pad = m_by_n_groups(shape, n)
    alive = ops.cast(mask, "bool")
    magnitude = ops.where(alive, ops.abs(ops.cast(weights, "float32")), -1.0)
    rows_last = ops.reshape(ops.transpose(magnitude, perm), (rows, inputs))
    padded = ops.pad(rows_last, [[0, 0], [0, pad]], constant_values=-1.0)
    groups = ops.reshape(padded, (rows, (inputs + pad) // n, n))
    mine = ops.expand_dims(groups, -1)      # [..., i, 1]: entry i
    other = ops.expand_dims(groups, -2)     # [..., 1, j]: entry j
    lower_index = np.tril(np.ones((n, n), bool), -1).T  # [i, j]: j < i
    beats = ops.logical_or(other > mine, ops.logical_and(other == mine, lower_index))
    rank = ops.sum(ops.cast(beats, "float32"), axis=-1)
    keep = ops.reshape(ops.cast(rank < float(n - m), mask.dtype), (rows, inputs + pad))
    keep = ops.reshape(keep[:, :inputs], tuple(shape[p] for p in perm))
    return ops.transpose(keep, tuple(int(i) for i in np.argsort(perm))) * mask


def std_rule(weights, mask, quality, std_mode, stored_sigma, ops=TF_OPS, m_by_n=None):
    """One application of the rule: ``(m_new, threshold, sigma, w * m_new)`` with
    ``threshold = q * sigma`` and ``m_new = m AND (|w| >= threshold)``; with ``m_by_n``,
    ``m`` is first replaced by ``m AND k_nm`` (`m_by_n_mask`, order in the module
    docstring)."""
    weights = ops.cast(weights, "float32")
    if m_by_n is not None:
        mask = m_by_n_mask(weights, mask, m_by_n, ops)
    sigma = layer_sigma(weights, mask, std_mode, stored_sigma, ops)
    threshold = std_threshold(quality, sigma, ops)
    new_mask = prune_mask(weights, mask, threshold, ops)
    return new_mask, threshold, sigma, apply_mask(weights, new_mask, ops)


@tf.function(jit_compile=True, autograph=False, reduce_retracing=True)
def compiled_std_rule(weights, mask, quality, std_mode, stored_sigma):
    """`std_rule` compiled with XLA; one trace serves every kernel shape of a rank."""
    return std_rule(weights, mask, quality, std_mode, stored_sigma)


@tf.function(jit_compile=True, autograph=False)
def compiled_m_by_n_rule(weights, mask, quality, std_mode, stored_sigma, m_by_n):
    """`std_rule` with N:M compiled with XLA, traced per shape (the groups need it)."""
    return std_rule(weights, mask, quality, std_mode, stored_sigma, m_by_n=m_by_n)


def std_prune(weights, mask, quality, std_mode, stored_sigma, m_by_n=None):
    """One application of the rule, compiled with XLA into a few fused passes.

    Without ``m_by_n`` one trace serves every kernel shape of a rank
    (``reduce_retracing``), so a model with many kernel shapes does not retrace; XLA
    still compiles each shape once. With ``m_by_n`` (see `std_rule`) each shape is traced.

    Returns ``(m_new, threshold, sigma, w * m_new)`` with ``threshold = q * sigma``.
    XLA flushes subnormal floats to zero: a subnormal ``q`` acts as ``q = 0``, and a
    subnormal ``q * sigma`` gives ``threshold = 0``.
    """
    if m_by_n is None:
        return compiled_std_rule(weights, mask, quality, std_mode, stored_sigma)
    return compiled_m_by_n_rule(weights, mask, quality, std_mode, stored_sigma, tuple(m_by_n))


def block_magnitudes(weights, block_size, pooling, ops=TF_OPS):
    """``P[b] = pool(|w|)`` over ``block_size`` blocks of a 2-D tensor (``"AVG"``/``"MAX"``).

    The tensor is padded with zeros to whole blocks; an edge block's mean is taken over
    its real entries only.
    """
    rows, cols = block_size
    height, width = (int(d) for d in weights.shape)
    pad = [[0, -height % rows], [0, -width % cols]]
    shape = ((height + pad[0][1]) // rows, rows, (width + pad[1][1]) // cols, cols)
    magnitudes = ops.reshape(ops.pad(ops.abs(ops.cast(weights, "float32")), pad), shape)
    if pooling == "MAX":
        return ops.max(magnitudes, axis=(1, 3))
    counts = ops.reshape(ops.pad(np.ones((height, width), np.float32), pad), shape)
    return ops.sum(magnitudes, axis=(1, 3)) / ops.sum(counts, axis=(1, 3))


def expand_blocks(block_values, block_size, shape, ops=TF_OPS):
    """Repeats each block's value over its entries, cropped to ``shape``."""
    rows, cols = block_size
    expanded = ops.repeat(ops.repeat(block_values, rows, axis=0), cols, axis=1)
    return expanded[: shape[0], : shape[1]]


def std_prune_blocks(weights, mask, quality, std_mode, stored_sigma, block_size, pooling,
                     ops=TF_OPS):
    """The rule on pooled block magnitudes (see the module docstring).

    Returns ``(m_new, threshold, sigma, w * m_new)`` like `std_prune`; ``m_new`` is
    ``m`` AND the kept blocks expanded to entries, so a pruned entry never comes back.
    """
    weights = ops.cast(weights, "float32")
    pooled = block_magnitudes(weights, block_size, pooling, ops)
    alive = block_magnitudes(mask, block_size, "MAX", ops)  # 1 for a block with a kept entry
    sigma = layer_sigma(pooled, alive, std_mode, stored_sigma, ops)
    threshold = std_threshold(quality, sigma, ops)
    keep = expand_blocks(ops.cast(pooled >= threshold, mask.dtype), block_size,
                         tuple(weights.shape), ops)
    new_mask = mask * keep
    return new_mask, threshold, sigma, apply_mask(weights, new_mask, ops)


def check_block_arguments(block_size, block_pooling_type, sparsity_m_by_n=None):
    """Validates the structured-sparsity arguments (tfmot's names); returns ``block_size``
    as a tuple. ``sparsity_m_by_n`` (see `check_m_by_n`) and a ``block_size`` other than
    ``(1, 1)`` exclude each other.
    """
    if (not isinstance(block_size, (tuple, list)) or len(block_size) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)):
        raise ValueError(f"block_size must be two integers >= 1 (rows, columns), got {block_size!r}.")
    if block_pooling_type not in ("AVG", "MAX"):
        raise ValueError(f"block_pooling_type must be 'AVG' or 'MAX', got {block_pooling_type!r}.")
    if check_m_by_n(sparsity_m_by_n) is not None and tuple(block_size) != (1, 1):
        raise ValueError(
            f"sparsity_m_by_n={sparsity_m_by_n!r} and block_size={block_size!r} exclude each "
            "other: N:M sparsity chooses single weights; keep block_size=(1, 1) with it.")
    return tuple(block_size)


def check_block_ranks(layer_name, tensors, block_size):
    """Raises ValueError unless every tensor is 2-D when ``block_size`` is not ``(1, 1)``."""
    if tuple(block_size) != (1, 1) and any(len(w.shape) != 2 for w in tensors):
        raise ValueError(
            f"block_size={tuple(block_size)} needs 2-D kernels, but layer {layer_name!r} has "
            f"shapes {[tuple(w.shape) for w in tensors]}: use block_size=(1, 1) for it.")


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

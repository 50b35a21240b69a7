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


def reference_m_by_n_mask(weights, mask, m, n):
    """N:M selection by sorting: in each group of ``n`` consecutive kept entries along the
    input axis (axis 0 of ``[in, out]``, axis 2 of ``[h, w, in, out]``) the ``n - m`` largest
    ``|w|`` are kept, ties to the lower index; pruned entries are never chosen."""
    weights = np.asarray(weights, np.float64)
    mask = np.asarray(mask, bool)
    axis = 0 if weights.ndim == 2 else 2
    w = np.moveaxis(weights, axis, -1).reshape(-1, weights.shape[axis])
    k = np.moveaxis(mask, axis, -1).reshape(w.shape)
    out = np.zeros_like(k)
    for row in range(w.shape[0]):
        for start in range(0, w.shape[1], n):
            alive = [i for i in range(start, min(start + n, w.shape[1])) if k[row, i]]
            alive.sort(key=lambda i: (-abs(w[row, i]), i))
            out[row, alive[: n - m]] = True
    shape = list(np.moveaxis(mask, axis, -1).shape)
    return np.moveaxis(out.reshape(shape), -1, axis)


def reference_m_by_n_step(weights, mask, q, std_mode, m, n, initial_sigma=None):
    """N:M first, then the std rule on what is left (sigma per ``std_mode``)."""
    chosen = reference_m_by_n_mask(weights, mask, m, n)
    return reference_step(weights, chosen, q, std_mode, initial_sigma)


def fit_briefly(model, keras, input_shape, outputs, samples=32, epochs=2):
    """Compiles ``model`` (SGD with momentum, MSE) and fits it on Gaussian data with the
    pruning callback; ``keras`` is the model's Keras module (either world)."""
    import tf_stdprune

    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(samples, *input_shape)), rng.normal(size=(samples, outputs)),
              batch_size=8, epochs=epochs, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()])
    return model


def reference_pooled(weights, block, pooling):
    """Pooled ``|w|`` over ``block`` blocks of a 2-D array, edge blocks partial."""
    rows, cols = block
    out = np.zeros((-(-weights.shape[0] // rows), -(-weights.shape[1] // cols)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            part = np.abs(weights[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols]).astype(np.float64)
            out[i, j] = part.max() if pooling == "MAX" else part.mean()
    return out

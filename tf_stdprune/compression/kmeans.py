"""1-D k-means with linear initialisation: the weight-sharing step of Deep Compression
(Han, Mao and Dally 2016, section 3.2), in NumPy for either Keras."""
import numpy as np

from tf_stdprune.validate import check_bits, check_int

DEFAULT_MAX_ITER = 50


def linear_kmeans(values, clusters, max_iter=DEFAULT_MAX_ITER):
    """1-D k-means (Lloyd's algorithm) with linear initialisation.

    ``c_j = min(x) + j * (max(x) - min(x)) / (K - 1)`` for ``j = 0..K-1``; then repeat
    ``a_i = argmin_j |x_i - c_j|`` (lowest ``j`` on ties) and ``c_j = mean{x_i : a_i = j}``
    (kept if the cluster is empty) until the assignment stops changing or ``max_iter``
    iterations. Returns ``(centroids float32 [K], labels int32 [n])``, centroids ascending.
    Non-finite values (NaN, inf) raise `ValueError`: one of them would make every
    centroid non-finite.
    """
    check_int(clusters, "clusters", 1, "the number of shared values")
    check_int(max_iter, "max_iter", 1, "the most Lloyd iterations")
    x = np.asarray(values, np.float64).ravel()
    bad = np.count_nonzero(~np.isfinite(x))
    if bad:
        raise ValueError(f"linear_kmeans got {bad} non-finite value(s) (NaN or inf) among "
                         f"{x.size}; only finite weights can be clustered.")
    if x.size == 0:
        return np.zeros(clusters, np.float32), np.zeros(0, np.int32)
    # Centroids stay sorted, so cluster j is the run of sorted x between midpoints j-1 and
    # j: one sort, then each iteration is K binary searches and prefix-sum differences.
    ordered = np.sort(x)
    prefix = np.concatenate([[0.0], np.cumsum(ordered)])
    centroids = np.linspace(ordered[0], ordered[-1], clusters)
    bounds = None
    for _ in range(max_iter):
        midpoints = (centroids[1:] + centroids[:-1]) / 2
        new_bounds = np.searchsorted(ordered, midpoints, side="right")  # ties: lower j
        if bounds is not None and np.array_equal(new_bounds, bounds):
            break
        bounds, assigned = new_bounds, midpoints
        edges = np.concatenate([[0], bounds, [x.size]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        centroids = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
    labels = np.searchsorted(assigned, x, side="left")
    return centroids.astype(np.float32), labels.astype(np.int32)


def cluster_tensor(weight, bits, where, max_iter=DEFAULT_MAX_ITER):
    """``(centroids float32 [2^bits], indices int32 like weight)`` of one weight tensor.

    The nonzero weights are clustered by `linear_kmeans`; ``indices`` is 0 at pruned
    (zero) positions and ``1 + cluster`` elsewhere, so ``take([0, c], indices)`` rebuilds
    the shared tensor. Non-finite weights raise `ValueError` naming ``where`` (the layer
    and tensor).
    """
    weight = np.asarray(weight)
    bad = np.count_nonzero(~np.isfinite(weight))
    if bad:
        raise ValueError(
            f"{where}: {bad} of {weight.size} weights are NaN or inf, so they cannot be "
            "clustered. Training has diverged: go back to a checkpoint with finite weights.")
    surviving = weight != 0
    centroids, labels = linear_kmeans(weight[surviving], 2 ** bits, max_iter)
    indices = np.zeros(weight.shape, np.int32)
    indices[surviving] = labels + 1
    return centroids, indices


def bits_chooser(layer_names, bits=None, conv_bits=8, dense_bits=5, bn_bits=8, layer_bits=None):
    """Checks `quantize_weights`'s bit arguments; returns ``choose(name, kind) -> bits``.

    A layer's bits: ``layer_bits[name]`` if given, else ``bits`` if given, else by its
    report kind: ``dense_bits`` for ``"dense"``, ``bn_bits`` for ``"bn"``, ``conv_bits``
    for every other kind. ``None`` means "leave unquantized". ``layer_bits`` naming a layer
    not in ``layer_names`` raises `ValueError`.
    """
    layer_bits = dict(layer_bits or {})
    named = dict(bits=bits, conv_bits=conv_bits, dense_bits=dense_bits, bn_bits=bn_bits)
    named.update({f"layer_bits[{k!r}]": v for k, v in layer_bits.items()})
    for name, value in named.items():
        check_bits(value, name)
    unknown = set(layer_bits) - set(layer_names)
    if unknown:
        raise ValueError(f"layer_bits names layers that are not in the model: {sorted(unknown)}.")
    by_kind = {"dense": dense_bits, "bn": bn_bits}

    def choose(name, kind):
        if name in layer_bits:
            return layer_bits[name]
        return bits if bits is not None else by_kind.get(kind, conv_bits)

    return choose

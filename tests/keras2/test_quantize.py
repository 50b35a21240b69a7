"""Weight sharing: k-means against a brute-force numpy Lloyd's, clustering, fine-tuning."""
import numpy as np
import pytest
import tensorflow as tf

from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.prune import prune_low_std
from tf_stdprune.keras2.quantize import (QuantizeWeights, linear_kmeans, plain_model,
                                  quantize_weights, strip_quantization)

from conftest import tiny_cnn, zero_out


def reference_kmeans(x, clusters, max_iter):
    """Lloyd's algorithm by brute force: argmin over a distance matrix, masked means."""
    x = np.asarray(x, np.float64)
    centroids = np.array([x.min() + j * (x.max() - x.min()) / max(clusters - 1, 1)
                          for j in range(clusters)])
    labels = None
    for _ in range(max_iter):
        new = np.argmin(np.abs(x[:, None] - centroids[None, :]), axis=1)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for j in range(clusters):
            if np.any(labels == j):
                centroids[j] = x[labels == j].mean()
    return centroids.astype(np.float32), labels


@pytest.mark.parametrize("clusters,max_iter", [(1, 5), (2, 20), (8, 50), (32, 50), (16, 2)])
def test_linear_kmeans_matches_brute_force_lloyd(clusters, max_iter):
    rng = np.random.default_rng(clusters)
    x = np.concatenate([rng.normal(-0.4, 0.1, 300), rng.laplace(0.3, 0.05, 500)])
    centroids, labels = linear_kmeans(x, clusters, max_iter)
    expected_centroids, expected_labels = reference_kmeans(x, clusters, max_iter)
    np.testing.assert_allclose(centroids, expected_centroids, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(labels, expected_labels)


def _pruned_quantized(bits):
    model = zero_out(tiny_cnn(), 0.6)
    original = [w.numpy().copy() for w in model.weights]
    return model, original, quantize_weights(model, **bits)


def test_clustering_shares_values_and_keeps_zeros_exactly():
    bits = dict(conv_bits=3, dense_bits=2, bn_bits=1)
    model, original, quantized = _pruned_quantized(bits)
    x = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype("float32")
    wrapped_outputs = quantized.predict(x, verbose=0)
    stripped = strip_quantization(quantized)
    layer_bits = {"conv2d": 3, "dense": 2, "batch_normalization": 1}
    for before, variable in zip(original, stripped.weights):
        after = variable.numpy()
        layer = variable.name.split("/")[0]
        if variable.name.split("/")[1].split(":")[0] not in ("kernel", "gamma"):
            np.testing.assert_array_equal(after, before)  # biases, BN statistics untouched
            continue
        np.testing.assert_array_equal(after == 0, before == 0)
        assert np.all(np.signbit(after[after == 0]) == 0)  # exactly +0.0
        assert len(np.unique(after[after != 0])) <= 2 ** layer_bits[layer]
        centroids, labels = reference_kmeans(before[before != 0], 2 ** layer_bits[layer], 50)
        np.testing.assert_allclose(after[before != 0], centroids[labels], rtol=1e-6)
    np.testing.assert_allclose(stripped.predict(x, verbose=0), wrapped_outputs, atol=1e-6)


def test_centroid_gradient_is_the_sum_of_member_gradients():
    _, _, quantized = _pruned_quantized(dict(bits=3))
    stripped_copy = keras.models.clone_model(strip_quantization(quantized))
    stripped_copy.set_weights(strip_quantization(quantized).get_weights())
    x = np.random.default_rng(2).normal(size=(8, 8, 8, 3)).astype("float32")
    wrappers = [l for l in quantized.layers if isinstance(l, QuantizeWeights)]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(quantized(x, training=False) ** 2)
    centroid_grads = tape.gradient(loss, [w.centroids[0] for w in wrappers])
    plain_layers = {l.name: l for l in stripped_copy.layers}
    kernels = [getattr(plain_layers[w.layer.name], w._weight_attributes[0]) for w in wrappers]
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(stripped_copy(x, training=False) ** 2)
    kernel_grads = tape.gradient(loss, kernels)
    for wrapper, grad, kernel_grad in zip(wrappers, centroid_grads, kernel_grads):
        index = wrapper.indices[0].numpy().ravel()
        expected = np.bincount(index, weights=kernel_grad.numpy().ravel(), minlength=9)[1:]
        np.testing.assert_allclose(tf.convert_to_tensor(grad).numpy(), expected,
                                   rtol=1e-4, atol=1e-6)


def test_fine_tuning_moves_centroids_only():
    _, original, quantized = _pruned_quantized(dict(conv_bits=3, dense_bits=2, bn_bits=2))
    wrappers = [l for l in quantized.layers if isinstance(l, QuantizeWeights)]
    centroids = [w.centroids[0].numpy().copy() for w in wrappers]
    indices = [w.indices[0].numpy().copy() for w in wrappers]
    assert all(not any(v is w.layer.kernel for v in quantized.trainable_weights)
               for w in wrappers if hasattr(w.layer, "kernel"))
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(64, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 64)
    quantized.compile(keras.optimizers.SGD(1e-3),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    quantized.fit(x, y, epochs=2, batch_size=16, verbose=0)
    stripped = strip_quantization(quantized)
    for wrapper, before_c, before_i in zip(wrappers, centroids, indices):
        after_c = wrapper.centroids[0].numpy()
        assert np.abs(after_c - before_c).max() > 1e-6
        np.testing.assert_array_equal(wrapper.indices[0].numpy(), before_i)
        baked = {l.name: l for l in stripped.layers}[wrapper.layer.name]
        kernel = getattr(baked, wrapper._weight_attributes[0]).numpy()
        np.testing.assert_array_equal(kernel == 0, before_i == 0)
        np.testing.assert_array_equal(kernel[before_i > 0], after_c[before_i[before_i > 0] - 1])
    for before, variable in zip(original, stripped.weights):
        if variable.name.endswith(("kernel:0", "gamma:0")):
            np.testing.assert_array_equal(variable.numpy() == 0, before == 0)


def test_bits_per_layer_and_kind():
    model = zero_out(tiny_cnn(), 0.5)
    quantized = quantize_weights(model, dense_bits=4, bn_bits=None, layer_bits={"conv2d": 2})
    bits = {l.layer.name: l.bits for l in quantized.layers if isinstance(l, QuantizeWeights)}
    assert bits == {"conv2d": 2, "dense": 4}
    with pytest.raises(ValueError, match="layer_bits names layers"):
        quantize_weights(model, layer_bits={"nope": 3})
    with pytest.raises(ValueError, match="conv_bits must be an integer"):
        quantize_weights(model, conv_bits=0)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_weights(quantized)
    with pytest.raises(TypeError, match="tf_keras Model"):
        quantize_weights(model.layers[0])


def test_pruning_wrappers_are_stripped_first_and_keras_file_round_trip(tmp_path):
    pruned = prune_low_std(zero_out(tiny_cnn(), 0.5))
    assert not any(isinstance(l, QuantizeWeights) for l in plain_model(pruned).layers)
    quantized = quantize_weights(pruned, bits=3)
    x = np.random.default_rng(4).normal(size=(4, 8, 8, 3)).astype("float32")
    quantized.save(tmp_path / "q.keras")
    restored = keras.models.load_model(tmp_path / "q.keras", compile=False)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), quantized.predict(x, verbose=0))


def test_adam_steps_every_centroid_alike_whatever_its_cluster_size():
    """Why the example fine-tunes centroids with Adam: SGD's step on a centroid is ``lr``
    times the sum of its members' gradients (see above), so it grows with the cluster's
    size; Adam's first step is ``lr * g / (|g| + eps)``: ``lr`` for every centroid."""
    _, _, quantized = _pruned_quantized(dict(bits=3))
    wrapper = max((l for l in quantized.layers if isinstance(l, QuantizeWeights)),
                  key=lambda l: l.indices[0].shape.num_elements())
    index = wrapper.indices[0].numpy()
    survivors = np.flatnonzero(index)
    sizes = np.repeat(np.arange(2, 9), [1, 2, 3, 4, 5, 6, 7])  # clusters 2..8: 1..7 members
    index.flat[survivors] = 1  # cluster 1: all the other survivors
    index.flat[survivors[:sizes.size]] = sizes
    wrapper.indices[0].assign(index)
    members = np.bincount(index.ravel(), minlength=9)[1:]
    assert members[0] >= 50 * members[1] > 0
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(16, 8, 8, 3)).astype("float32"), rng.integers(0, 3, 16)
    centroids = wrapper.centroids[0].numpy().copy()
    quantized.compile(keras.optimizers.Adam(1e-3, epsilon=1e-12),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    quantized.train_on_batch(x, y)
    np.testing.assert_allclose(np.abs(wrapper.centroids[0].numpy() - centroids), 1e-3, rtol=0.02)


def _weights_bytes(model):
    return [w.numpy().tobytes() for w in model.weights]


def test_reading_a_quantized_model_never_changes_its_weights(tmp_path):
    """compress, decompress, strip_quantization, plain_model, serialize, sparsity_report
    and export_sparse_saved_model only read a quantized model: every weight, inner kernels included, stays bit for bit."""
    from tf_stdprune.compression.compressed_file import compress, decompress, serialize
    from tf_stdprune.keras2.export import export_sparse_saved_model
    from tf_stdprune.report import sparsity_report

    model, _, quantized = _pruned_quantized(dict(bits=2))
    before, original = _weights_bytes(quantized), _weights_bytes(model)
    expected = strip_quantization(quantized).get_weights()
    assert _weights_bytes(quantized) == before
    restored = decompress(compress(quantized, tmp_path / "model.tfspz"))
    assert _weights_bytes(quantized) == before
    plain_model(quantized)
    serialize(quantized)
    export_sparse_saved_model(quantized, tmp_path / "sparse")
    sparsity_report(quantized)
    assert _weights_bytes(quantized) == before and _weights_bytes(model) == original
    kernels = [w for w in quantized.weights if w.name.endswith("kernel:0")]
    assert all(len(np.unique(k.numpy())) > 2 ** 2 + 1 for k in kernels)  # not the shared values
    for a, b in zip(expected, restored.get_weights()):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_linear_kmeans_refuses_non_finite_values(bad):
    with pytest.raises(ValueError, match="1 non-finite value"):
        linear_kmeans([1.0, bad, 3.0, 4.0], 2)
    centroids, _ = linear_kmeans([1.0, 3.0, 4.0], 2)
    assert np.all(np.isfinite(centroids))


def test_non_finite_weights_are_refused_naming_the_layer_and_tensor(tmp_path):
    from tf_stdprune.compression.compressed_file import compress

    model = zero_out(tiny_cnn(), 0.5)
    kernel = model.layers[-1].kernel.numpy()
    kernel[0, 0] = np.inf
    kernel[1, 0] = np.nan
    model.layers[-1].kernel.assign(kernel)
    with pytest.raises(ValueError, match=r"'dense', tensor 'kernel': 2 of 192 weights are NaN"):
        quantize_weights(model, bits=3)
    with pytest.raises(ValueError, match=r"'dense', tensor 'dense/kernel:0': 2 of 192"):
        compress(model, tmp_path / "model.tfspz")
    assert not (tmp_path / "model.tfspz").exists()


@pytest.mark.parametrize("kwargs, argument", [
    (dict(bits=True), "bits"), (dict(bits=4.0), "bits"), (dict(conv_bits="8"), "conv_bits"),
    (dict(dense_bits=np.int64(13)), "dense_bits"), (dict(bn_bits=False), "bn_bits"),
    (dict(layer_bits={"conv2d": True}), r"layer_bits\['conv2d'\]"),
])
def test_bits_must_be_an_integer_not_a_bool_float_or_string(kwargs, argument):
    model = zero_out(tiny_cnn(), 0.5)
    with pytest.raises(ValueError, match=rf"^{argument} must be an integer in \[1, 12\]"):
        quantize_weights(model, **kwargs)
    with pytest.raises(ValueError, match="bits must be an integer"):
        QuantizeWeights(model.layers[0], True)
    assert quantize_weights(model, bits=np.int32(12), dense_bits=None).layers[0].bits == 12

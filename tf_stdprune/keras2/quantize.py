"""Trained quantization with weight sharing (Deep Compression, Han et al. 2016, section 3).

Per prunable tensor (see `wrapper.prunable_attributes`: kernels and BN gammas) the
surviving weights ``x_i != 0`` are clustered into ``K = 2^b`` shared values by 1-D k-means
with linear initialisation (`linear_kmeans`). The layer then computes with

    w = gather([0, c_1, ..., c_K], idx),   idx_i = 0 for pruned weights, 1 + cluster else,

so pruned weights are exactly 0 and receive no update, the assignment ``idx`` is fixed,
and the gradient of centroid ``c_k`` is the sum of its members' gradients,
``dL/dc_k = sum_{i: idx_i = k} dL/dw_i`` (the gradient of ``gather``). Fine-tuning is
plain ``model.fit`` on the quantized model; only centroids, biases and BN beta train::

    quantized = quantize_weights(stripped_model)              # 8 bits conv, 5 bits dense
    quantized.compile(keras.optimizers.Adam(1e-5), loss, metrics)
    quantized.fit(x, y, epochs=3)                             # centroid fine-tuning
    final = strip_quantization(quantized)                     # plain model, shared values

A centroid's gradient sums over its members (one to thousands of weights), so with SGD
its step grows with its cluster's size; Adam normalises each centroid's step by its own
gradient statistics, and a small rate (1e-5) keeps the clustered accuracy (measured on
the quick preset: SGD 1e-4 lost 0.8-3 points, Adam 1e-5 none). Kernel regularizers act
on the inner (unused) kernels and so do not affect the centroids.

Why not ``tfmot.clustering.keras.cluster_weights(..., preserve_sparsity=True)`` (0.8.1):
it initialises the centroids (linear) but runs no k-means; it re-assigns every weight to
its nearest centroid in every training call and trains the original weights through a
straight-through gradient, so the assignment is not fixed; it spends one of the 2^b
clusters on the zero centroid; its indices are int64; and it does not cluster
BatchNormalization at all (its registry lists no clusterable BN weights). We would have
had to add k-means, frozen indices and BN support, i.e. most of this module.
"""
import inspect

import numpy as np
import tensorflow as tf

from tf_stdprune.keras2.engine import PruneLowMagnitude, check_keras2, keras
from tf_stdprune.keras2.prune import all_layers, strip_pruning
from tf_stdprune.registry import get_tensor, layer_kind
from tf_stdprune.compression.kmeans import (  # noqa: F401  (linear_kmeans: public here too)
    DEFAULT_MAX_ITER, bits_chooser, cluster_tensor, linear_kmeans)
from tf_stdprune.report import leaf_layers, prunable_layers  # noqa: F401  (prunable_layers: public here too)
from tf_stdprune.validate import check_bits
from tf_stdprune.keras2.wrapper import prunable_attributes, substituted



@keras.utils.register_keras_serializable(package="tf_stdprune")
class QuantizeWeights(keras.layers.Wrapper):
    """Computes a layer with shared weights ``gather([0, c_1..c_K], idx)`` (module docstring).

    Args:
      layer: a built tf_keras layer with prunable tensors (its current weights are the
        ones `cluster` clusters).
      bits: ``b``; every prunable tensor of the layer gets ``K = 2^b`` centroids.
    """

    def __init__(self, layer, bits, **kwargs):
        check_keras2(layer, "The layer passed to QuantizeWeights")
        if bits is None:
            raise ValueError("QuantizeWeights needs bits; leave the layer unwrapped instead.")
        check_bits(bits, "bits", allow_none=False)
        self._weight_attributes = prunable_attributes(layer, prune_batchnorm=True)
        if self._weight_attributes == []:
            raise ValueError(f"Layer {layer.name!r} ({type(layer).__name__}) has no kernel "
                             "or BN gamma to quantize.")
        kwargs.setdefault("name", f"quantize_{layer.name}")
        super().__init__(layer, **kwargs)
        if not hasattr(self, "_batch_input_shape") and hasattr(layer, "_batch_input_shape"):
            self._batch_input_shape = layer._batch_input_shape
        self.bits = int(bits)
        self.centroids, self.indices = [], []

    def build(self, input_shape=None):
        super().build(input_shape)
        if self._weight_attributes is None:
            self._weight_attributes = prunable_attributes(self.layer, prune_batchnorm=True)
        for attribute in self._weight_attributes:
            shape = get_tensor(self.layer, attribute).shape
            self.centroids.append(self.add_weight(
                f"{attribute}_centroids", shape=[2 ** self.bits], initializer="zeros",
                dtype=tf.float32, trainable=True, experimental_autocast=False))
            self.indices.append(self.add_weight(
                f"{attribute}_indices", shape=shape, initializer="zeros", dtype=tf.int32,
                trainable=False))

    def _replaced(self):
        """References of the inner tensors that the shared weights replace."""
        return {get_tensor(self.layer, a).ref() for a in self._weight_attributes or []}

    @property
    def trainable_weights(self):
        replaced = self._replaced()
        return [w for w in super().trainable_weights if w.ref() not in replaced]

    @property
    def non_trainable_weights(self):
        replaced = self._replaced()
        moved = [w for w in super().trainable_weights if w.ref() in replaced]
        return super().non_trainable_weights + moved

    def cluster(self, max_iter=DEFAULT_MAX_ITER):
        """Sets centroids and indices by `linear_kmeans` of the inner layer's nonzeros."""
        for attribute, centroids, indices in zip(self._weight_attributes, self.centroids,
                                                 self.indices):
            values, index = cluster_tensor(
                get_tensor(self.layer, attribute), self.bits,
                f"Layer {self.layer.name!r}, tensor {attribute!r}", max_iter)
            centroids.assign(values)
            indices.assign(index)

    def shared_weights(self):
        """``w = gather([0, c_1, ..., c_K], idx)`` per tensor, float32."""
        zero = tf.zeros([1], tf.float32)
        return [tf.gather(tf.concat([zero, tf.convert_to_tensor(c)], 0), i)
                for c, i in zip(self.centroids, self.indices)]

    def effective_tensors(self):
        """``{attribute path: numpy array}``: the tensors the layer computes with (the
        shared values), in place of the inner layer's own (replaced) tensors."""
        return {a: np.asarray(w) for a, w in zip(self._weight_attributes, self.shared_weights())}

    def call(self, inputs, training=None, **kwargs):
        with substituted(self.layer, self._weight_attributes, self.shared_weights()):
            if "training" in inspect.signature(self.layer.call).parameters:
                return self.layer.call(inputs, training=training, **kwargs)
            return self.layer.call(inputs, **kwargs)

    def get_config(self):
        return dict(super().get_config(), bits=self.bits)

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["layer"] = keras.layers.deserialize(config["layer"])
        return cls(**config)


def _clone(model, clone_function):
    """`clone_model` of ``model`` and of every nested model, reusing the layer objects."""
    def clone(layer):
        if isinstance(layer, keras.Model):
            return _clone(layer, clone_function)
        return clone_function(layer)
    return keras.models.clone_model(model, input_tensors=None, clone_function=clone)


def quantize_weights(model, bits=None, conv_bits=8, dense_bits=5, bn_bits=8,
                     layer_bits=None, max_iter=DEFAULT_MAX_ITER):
    """Wraps every layer with prunable tensors in `QuantizeWeights` and clusters it.

    Bits of a layer: ``layer_bits[name]`` if given, else ``bits`` if given, else by kind:
    ``conv_bits`` (convolutions, and custom prunable layers), ``dense_bits``, ``bn_bits``
    (BN gamma: 8 by default; gammas are ~0.01 % of VGG19's weights, so fewer bits would
    save nothing). ``None`` leaves that kind unquantized. Pruning wrappers are stripped
    first. Returns a new model sharing the layer objects of ``model``; fine-tune it with
    ``fit`` and bake it with `strip_quantization` (see the module docstring).
    """
    check_keras2(model, "The model passed to quantize_weights")
    if not isinstance(model, keras.Model):
        raise TypeError(f"quantize_weights takes a tf_keras Model, got {type(model).__name__}.")
    if any(isinstance(l, QuantizeWeights) for l in all_layers(model)):
        raise ValueError("The model is already quantized; call strip_quantization(model) "
                         "first to quantize it again.")
    if any(isinstance(l, PruneLowMagnitude) for l in all_layers(model)):
        model = strip_pruning(model)
    choose = bits_chooser([l.name for l in all_layers(model)], bits, conv_bits, dense_bits,
                          bn_bits, layer_bits)

    def wrap(layer):
        if not prunable_attributes(layer, prune_batchnorm=True):
            return layer
        chosen = choose(layer.name, layer_kind(layer))
        return layer if chosen is None else QuantizeWeights(layer, chosen)

    quantized = _clone(model, wrap)
    for layer in all_layers(quantized):
        if isinstance(layer, QuantizeWeights):
            layer.cluster(max_iter)
    return quantized


def _baked(wrapper):
    """A new layer like ``wrapper.layer`` whose tensors hold the shared values, plus the
    weights to give it once built: the quantized model's own layers are left unchanged."""
    inner = wrapper.layer
    replaced = {get_tensor(inner, a).ref(): v for a, v in wrapper.effective_tensors().items()}
    values = [replaced[w.ref()].astype(w.dtype.as_numpy_dtype) if w.ref() in replaced
              else np.array(w) for w in inner.weights]
    fresh = inner.__class__.from_config(inner.get_config())
    if not hasattr(fresh, "_batch_input_shape") and hasattr(wrapper, "_batch_input_shape"):
        fresh._batch_input_shape = wrapper._batch_input_shape
    return fresh, values


def strip_quantization(model):
    """A plain model whose kernels/gammas hold the shared values ``gather([0, c], idx)``.

    Every quantized layer is replaced by a new layer of the same configuration holding
    the shared values; other layers are reused (as tfmot's `strip_pruning` does).
    ``model`` itself is never changed.
    """
    baked = []

    def strip(layer):
        if not isinstance(layer, QuantizeWeights):
            return layer
        baked.append(_baked(layer))
        return baked[-1][0]

    plain = _clone(model, strip)
    for layer, values in baked:
        if not layer.built:
            raise ValueError(f"Layer {layer.name!r} was not built by cloning the model; "
                             "build the quantized model (call it once) before stripping.")
        layer.set_weights(values)
    return plain


def plain_model(model):
    """``model`` without pruning or quantization wrappers (stripped only if it has any)."""
    check_keras2(model, "The model")
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a tf_keras Model, got {type(model).__name__}.")
    if any(isinstance(l, PruneLowMagnitude) for l in all_layers(model)):
        model = strip_pruning(model)
    if any(isinstance(l, QuantizeWeights) for l in all_layers(model)):
        model = strip_quantization(model)
    return model

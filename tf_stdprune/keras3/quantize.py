"""Weight sharing for Keras 3 models (Deep Compression, Han, Mao and Dally 2016, section 3),
the same contract as `tf_stdprune.keras2.quantize` for tf_keras, written with ``keras.ops``.

Per prunable tensor the nonzero weights are clustered into ``K = 2^b`` shared values by
`kmeans.linear_kmeans`; the layer then computes with ``w = take([0, c_1..c_K], idx)``: the
assignment ``idx`` is fixed, pruned weights stay exactly 0, and the gradient of centroid
``c_k`` is the sum of its members' gradients. Only centroids (and the layer's other
trainable tensors, such as biases) train; `strip_quantization` bakes the shared values
into a plain model without changing the quantized one.
"""
import keras
from keras import ops

from tf_stdprune import registry
from tf_stdprune.keras3 import nested
from tf_stdprune.keras3.prune import all_layers, is_flat, strip_pruning, wrappers
from tf_stdprune.keras3.wrapper import SubstitutingWrapper
from tf_stdprune.compression.kmeans import DEFAULT_MAX_ITER, bits_chooser, cluster_tensor
from tf_stdprune.validate import check_bits


class SharedValues:
    """Per quantized tensor of ``layer`` (attribute paths ``paths``): ``K = 2^bits``
    trainable centroids and the fixed int32 assignment ``idx``; the layer computes with
    ``take([0, c_1..c_K], idx)``. Shared by the `QuantizeWeights` wrapper and by weight
    sharing attached in place (`NestedQuantization`)."""

    def add_shared_variables(self, owner, layer):
        """Creates centroids and indices as ``owner``'s weights and makes ``layer``'s own
        quantized tensors non-trainable (the centroids train in their place)."""
        self.centroids, self.indices = [], []
        for path in self.paths:
            name = path.replace(".", "_").lstrip("_")
            shape = registry.get_tensor(layer, path).shape
            self.centroids.append(owner.add_weight(name=f"{name}_centroids",
                                                   shape=(2 ** self.bits,), initializer="zeros"))
            self.indices.append(owner.add_weight(name=f"{name}_indices", shape=shape,
                                                 initializer="zeros", dtype="int32",
                                                 trainable=False))
            # The layer computes with the shared values: its own tensor gets no gradient.
            registry.get_tensor(layer, path).trainable = False

    def cluster(self, max_iter=DEFAULT_MAX_ITER):
        """Sets centroids and indices by `linear_kmeans` of the inner layer's nonzeros."""
        for path, centroids, indices in zip(self.paths, self.centroids, self.indices):
            values, index = cluster_tensor(
                registry.get_tensor(self.layer, path), self.bits,
                f"Layer {self.layer.name!r}, tensor {path!r}", max_iter)
            centroids.assign(values)
            indices.assign(index)

    def shared_weights(self):
        """``take([0, c_1..c_K], idx)`` per tensor."""
        return [ops.take(ops.concatenate([ops.zeros((1,)), c]), i)
                for c, i in zip(self.centroids, self.indices)]

    def effective_tensors(self):
        """``{attribute path: numpy array}`` of the tensors the layer computes with."""
        return {p: ops.convert_to_numpy(w) for p, w in zip(self.paths, self.shared_weights())}

    def substitutes(self):
        return self.shared_weights()

    @property
    def state_variables(self):
        """The centroids and indices (never counted as the model's parameters)."""
        return [*self.centroids, *self.indices]


@keras.saving.register_keras_serializable(package="tf_stdprune")
class QuantizeWeights(SharedValues, SubstitutingWrapper):
    """Computes a built Keras 3 layer with shared weights ``take([0, c], idx)`` (called as
    the bare layer would be: `tf_stdprune.keras3.wrapper.SubstitutingWrapper`).

    Args:
      layer: a built layer that `registry` names; its current weights are clustered by
        `cluster`. Its quantized tensors are made non-trainable (the centroids train in
        their place); `quantize_weights` hands in a copy, so the user's layer keeps its own.
      bits: ``b``: every prunable tensor of the layer gets ``K = 2^b`` centroids.
    """

    def __init__(self, layer, bits, **kwargs):
        check_bits(bits, "bits")
        if bits is None:
            raise ValueError("QuantizeWeights needs bits; leave the layer unwrapped instead.")
        self.paths = registry.prunable_attributes(layer)
        if not self.paths:
            raise ValueError(f"Layer {layer.name!r} ({type(layer).__name__}) has no tensor "
                             "to quantize.")
        kwargs.setdefault("name", f"quantize_{layer.name}")
        super().__init__(layer, **kwargs)
        self.bits = int(bits)

    def build(self, input_shape=None):
        super().build(input_shape)
        self.add_shared_variables(self, self.layer)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits}


class NestedQuantization(SharedValues):
    """Weight sharing attached in place to a built layer at any depth of a model (as
    `tf_stdprune.keras3.nested.NestedPruning` attaches pruning): its centroids and
    indices become the layer's own weights and the layer computes with the shared values.

    Args:
      layer: a built layer of a model copy that `registry` names.
      path: the layer's path in the model.
      bits: ``b``: ``K = 2^b`` centroids per tensor.
    """

    def __init__(self, layer, path, bits):
        self.layer, self.name, self.bits = layer, path, int(bits)
        self.paths = registry.prunable_attributes(layer)
        nested.attach(layer, registry.QUANTIZATION_STATE, self,
                      lambda: self.add_shared_variables(layer, layer))


def quantize_weights(model, bits=None, conv_bits=8, dense_bits=5, bn_bits=8,
                     layer_bits=None, max_iter=DEFAULT_MAX_ITER):
    """Wraps every prunable layer of a Keras 3 model in `QuantizeWeights` and clusters it.

    Bits per layer as `tf_stdprune.keras2.quantize.quantize_weights`: ``layer_bits[name]``, else
    ``bits``, else by kind (``conv_bits``, ``dense_bits``, ``bn_bits``); ``None`` leaves it
    unquantized. Pruning wrappers are stripped first. Each wrapped layer is a copy, so
    ``model`` is not changed. A model that is not a flat Sequential or functional one (a
    KerasHub task, a subclassed model) comes back as a copy of its own class with weight
    sharing attached in place at every depth (`quantize_in_place`).

    Examples:
      >>> quantized = quantize_weights(stripped)          # 8 bits conv, 5 bits dense
      >>> quantized.compile(keras.optimizers.Adam(1e-5), loss)
      >>> quantized.fit(x, y, epochs=2)                   # centroid fine-tuning
      >>> final = strip_quantization(quantized)
    """
    if is_quantized(model):
        raise ValueError("The model is already quantized; call strip_quantization(model) "
                         "first to quantize it again.")
    if not is_flat(model):
        return quantize_in_place(model, bits, conv_bits, dense_bits, bn_bits, layer_bits,
                                 max_iter)
    if wrappers(model):
        model = strip_pruning(model)
    choose = bits_chooser([l.name for l in all_layers(model)], bits, conv_bits, dense_bits,
                          bn_bits, layer_bits)

    def wrap(layer):
        if isinstance(layer, keras.Model) or not registry.prunable_attributes(layer):
            return layer
        chosen = choose(layer.name, registry.layer_kind(layer))
        return layer if chosen is None else QuantizeWeights(_copy(layer), chosen)

    quantized = keras.models.clone_model(model, clone_function=wrap, recursive=True)
    for layer in all_layers(quantized):
        if isinstance(layer, QuantizeWeights):
            layer.cluster(max_iter)
    return quantized


def quantize_in_place(model, bits=None, conv_bits=8, dense_bits=5, bn_bits=8,
                      layer_bits=None, max_iter=DEFAULT_MAX_ITER):
    """`quantize_weights` for a model that is not a flat Sequential or functional one
    (KerasHub backbones and tasks, subclassed models, custom layers of Dense sublayers):
    on a copy of the same class (pruning stripped first), every layer that `registry`
    names, at any depth, gets a `NestedQuantization`; ``layer_bits`` takes layer names or
    paths (``"transformer_layer_0/self_attention"``). A layer reached by two paths (tied
    weights) is quantized once."""
    copy = strip_pruning(model) if wrappers(model) else nested.copy_model(model)
    tree = list(nested.layer_tree(copy))
    choose = bits_chooser([name for path, layer in tree for name in (path, layer.name)],
                          bits, conv_bits, dense_bits, bn_bits, layer_bits)
    covered = []
    for path, layer in tree:
        if any(path.startswith(p + "/") for p in covered) or \
                not registry.prunable_attributes(layer):
            continue
        covered.append(path)
        name = path if path in (layer_bits or {}) else layer.name
        chosen = choose(name, registry.layer_kind(layer))
        if chosen is not None:
            NestedQuantization(layer, path, chosen).cluster(max_iter)
    return copy


def is_quantized(model):
    """True if ``model`` holds `QuantizeWeights` wrappers or weight sharing in place."""
    return any(isinstance(l, QuantizeWeights) for l in all_layers(model)) or \
        bool(nested.states(model, registry.QUANTIZATION_STATE))


def _copy(layer):
    """A built copy of ``layer`` holding its current weights."""
    copy = layer.__class__.from_config(layer.get_config())
    copy.build_from_config(layer.get_build_config())
    copy.set_weights(layer.get_weights())
    return copy


def strip_quantization(model):
    """A plain Keras 3 model whose prunable tensors hold the shared values; ``model`` (and
    the layers it shares with its source) are never changed. A model quantized in place
    (`quantize_in_place`) gives a new model of the same class and config."""
    if nested.states(model, registry.QUANTIZATION_STATE):
        return nested.strip(model)
    baked = []

    def strip(layer):
        if not isinstance(layer, QuantizeWeights):
            return layer
        inner = layer.layer
        shared = {id(registry.get_tensor(inner, p)): v
                  for p, v in layer.effective_tensors().items()}
        values = [shared.get(id(w), ops.convert_to_numpy(w)).astype(w.dtype)
                  for w in inner.weights]
        baked.append((inner.__class__.from_config(inner.get_config()), values))
        return baked[-1][0]

    plain = keras.models.clone_model(model, clone_function=strip, recursive=True)
    for layer, values in baked:
        layer.set_weights(values)
    return plain


def plain_model(model):
    """``model`` without pruning or quantization wrappers (stripped only if it has any)."""
    if wrappers(model):
        model = strip_pruning(model)
    if is_quantized(model):
        model = strip_quantization(model)
    return model

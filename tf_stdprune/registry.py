"""The one table of what is pruned: layer class -> prunable tensors -> report kind.

Both Keras worlds read it: tf_keras (the tfmot path) and Keras 3. A layer is looked up
by walking its class's method resolution order and taking the first class that Keras
itself defines (module ``keras.*`` or ``tf_keras.*``) and that the table names, so a
subclass of a supported layer is pruned like its parent, and a user class that merely
shares a name with a Keras layer is not matched.

A tensor is named by an attribute path relative to the layer: ``"kernel"``, or
``"cell.recurrent_kernel"`` for a tensor held by a sub-layer (recurrent cells,
MultiHeadAttention's projections), with list items named by their index
(``"cell.cells.0.kernel"`` for the first cell of an RNN over stacked cells). A generic
``RNN`` layer's paths follow from its cell(s): each known cell's kernel and recurrent
kernel. `resolve` turns a path into ``(owner, attribute)``;
for an attribute that Keras 3 exposes as a read-only property over a stored variable
(``Dense.kernel`` over ``Dense._kernel``) it names the stored one, which is what a
wrapper substitutes ``w * m`` into.

Against tfmot's own registry the table prunes every tensor tfmot prunes (Dense, Conv,
transposed Conv, Embedding, LocallyConnected, the recurrent layers and cells,
MultiHeadAttention's projections) and, by design, more: depthwise kernels (of depthwise
and separable convolutions), EinsumDense and, optionally, BatchNormalization's ``gamma``,
as the reference experiment counts every weight. ConvLSTM layers are refused, as tfmot refuses them.

Report kinds: ``"conv"``, ``"dense"``, ``"bn"``, ``"embedding"``, ``"rnn"``,
``"attention"``; ``"other"`` for layers with nothing to prune.
"""
import collections

# The attributes under which Keras 3 layers pruned or quantized in place carry their state
# (`tf_stdprune.keras3.nested`); each state lists its own variables in ``state_variables``,
# which are never counted as the model's parameters.
PRUNING_STATE = "tf_stdprune_pruning"
QUANTIZATION_STATE = "tf_stdprune_quantization"

Entry = collections.namedtuple("Entry", ["attributes", "kind"])

_KERNEL = ("kernel",)
_RECURRENT = ("cell.kernel", "cell.recurrent_kernel")
_ATTENTION = tuple(f"_{part}_dense.kernel" for part in ("query", "key", "value", "output"))

TABLE = {
    "Dense": Entry(_KERNEL, "dense"),
    "EinsumDense": Entry(_KERNEL, "dense"),
    "LocallyConnected1D": Entry(_KERNEL, "dense"),
    "LocallyConnected2D": Entry(_KERNEL, "dense"),
    "Conv1D": Entry(_KERNEL, "conv"),
    "Conv2D": Entry(_KERNEL, "conv"),
    "Conv3D": Entry(_KERNEL, "conv"),
    "Conv1DTranspose": Entry(_KERNEL, "conv"),
    "Conv2DTranspose": Entry(_KERNEL, "conv"),
    "Conv3DTranspose": Entry(_KERNEL, "conv"),
    "DepthwiseConv1D": Entry(("depthwise_kernel",), "conv"),
    "DepthwiseConv2D": Entry(("depthwise_kernel",), "conv"),
    "SeparableConv1D": Entry(("depthwise_kernel", "pointwise_kernel"), "conv"),
    "SeparableConv2D": Entry(("depthwise_kernel", "pointwise_kernel"), "conv"),
    "Embedding": Entry(("embeddings",), "embedding"),
    "SimpleRNN": Entry(_RECURRENT, "rnn"),
    "LSTM": Entry(_RECURRENT, "rnn"),
    "GRU": Entry(_RECURRENT, "rnn"),
    "SimpleRNNCell": Entry(("kernel", "recurrent_kernel"), "rnn"),
    "LSTMCell": Entry(("kernel", "recurrent_kernel"), "rnn"),
    "GRUCell": Entry(("kernel", "recurrent_kernel"), "rnn"),
    "RNN": Entry(None, "rnn"),  # paths from its cell(s), see `prunable_attributes`
    "MultiHeadAttention": Entry(_ATTENTION, "attention"),
    "BatchNormalization": Entry(("gamma",), "bn"),
    "SyncBatchNormalization": Entry(("gamma",), "bn"),
}

# Layers with trainable weights that are deliberately never pruned, and need no error.
NOT_PRUNED = frozenset({
    "LayerNormalization", "GroupNormalization", "UnitNormalization", "PReLU",
    "Normalization", "RMSNormalization",
    # KerasHub's learned position tables: every row is read at every step, and they are
    # small next to the token embedding; kept dense on purpose.
    "PositionEmbedding",
})

# Layers tfmot refuses to prune; so do we, with the same exception type.
REFUSED = frozenset({"ConvLSTM1D", "ConvLSTM2D", "ConvLSTM3D"})

BATCHNORM_KIND = "bn"

# Where the two Keras name the same tensor differently: Keras 3's DepthwiseConv stores its
# depthwise kernel as ``kernel``.
ALIASES = {"depthwise_kernel": "kernel"}


def is_keras_class(cls):
    """True for a class that tf_keras, Keras 3 or KerasHub defines."""
    root = cls.__module__.split(".")[0]
    return root in ("keras", "tf_keras", "keras_hub")


def keras_class_name(layer):
    """The name of the first Keras-defined class in ``type(layer)``'s MRO, or None."""
    for cls in type(layer).__mro__:
        if is_keras_class(cls) and (cls.__name__ in TABLE or cls.__name__ in REFUSED
                                    or cls.__name__ in NOT_PRUNED):
            return cls.__name__
    return None


def lookup(layer):
    """The table's `Entry` for ``layer``, or None if the table does not name it."""
    return TABLE.get(keras_class_name(layer))


def layer_kind(layer):
    """The report's kind column for ``layer``: ``"conv"``, ``"dense"``, ``"bn"``, ...,
    ``"other"`` when the table does not name it."""
    entry = lookup(layer)
    return entry.kind if entry else "other"


class RegistryWeights:
    """``layer.get_prunable_weights()`` for a layer that the table knows.

    Set on every wrapped built-in layer, so that code written for tfmot's `PrunableLayer`
    protocol (``wrapper.layer.get_prunable_weights()``) sees the tensors that are pruned.
    """

    def __init__(self, layer, paths):
        self._layer, self.paths = layer, list(paths)

    def __call__(self):
        return [get_tensor(self._layer, p) for p in self.paths]


def declared_attributes(layer):
    """Attribute names of the tensors a layer's own ``get_prunable_weights()`` returns
    (tfmot's `PrunableLayer` protocol); None before the layer is built."""
    if not layer.built:
        return None
    weights = layer.get_prunable_weights()
    names = [n for w in weights for n, v in vars(layer).items() if v is w]
    if len(names) != len(weights):
        raise ValueError(
            f"{layer.name}: every tensor returned by get_prunable_weights() must also be "
            "an attribute of the layer (e.g. self.kernel) so the wrapper can mask it."
        )
    return names


def prunable_attributes(layer, prune_batchnorm=True):
    """Attribute paths of ``layer``'s prunable tensors (see the module docstring).

    A layer that implements ``get_prunable_weights`` itself (tfmot's `PrunableLayer`
    protocol; not the `RegistryWeights` a wrapper sets) is honoured:
    `declared_attributes`, None until it is built. Otherwise the
    table decides; ``[]`` for a layer it does not name, and for BatchNormalization
    without ``scale`` or when ``prune_batchnorm`` is false.
    """
    own = getattr(layer, "get_prunable_weights", None)
    if own is not None and not isinstance(own, RegistryWeights):
        return declared_attributes(layer)
    entry = lookup(layer)
    if entry is None:
        return []
    if entry.attributes is None:
        return _rnn_cell_paths(layer)
    if entry.kind == BATCHNORM_KIND and not (prune_batchnorm and getattr(layer, "scale", True)):
        return []
    if getattr(layer, "tie_weights", True) is False and hasattr(layer, "reverse_embeddings"):
        return [*entry.attributes, "reverse_embeddings"]  # an untied ReversibleEmbedding
    return list(entry.attributes)


def _rnn_cell_paths(layer):
    """Paths of a generic RNN's cell tensors; ``[]`` if a cell is not in the table."""
    cell = layer.cell
    cells = [("cell", cell)]
    if hasattr(cell, "cells"):  # StackedRNNCells
        cells = [(f"cell.cells.{i}", c) for i, c in enumerate(cell.cells)]
    paths = []
    for prefix, item in cells:
        entry = lookup(item)
        if entry is None or entry.kind != "rnn" or entry.attributes is None:
            return []
        paths += [f"{prefix}.{a}" for a in entry.attributes]
    return paths


def resolve(layer, path):
    """``(owner, attribute)`` of an attribute path: the object that holds the tensor and
    the name under which it is stored (a Keras 3 property's backing attribute)."""
    owner = layer
    *parents, attribute = path.split(".")
    for name in parents:
        owner = owner[int(name)] if name.isdigit() else getattr(owner, name)
    if not hasattr(owner, attribute) and hasattr(owner, ALIASES.get(attribute, attribute)):
        attribute = ALIASES[attribute]
    prop = getattr(type(owner), attribute, None)
    if isinstance(prop, property) and hasattr(owner, "_" + attribute):
        attribute = "_" + attribute
    return owner, attribute


def get_tensor(layer, path):
    """The variable an attribute path names (its stored variable, not a property's view)."""
    owner, attribute = resolve(layer, path)
    return getattr(owner, attribute)


def unknown_kernels(layer):
    """Trainable weights of rank >= 2 of a layer the table does not name (nor excludes).

    A non-empty answer means the layer would silently stay dense: callers raise.
    """
    name = keras_class_name(layer)
    if name in NOT_PRUNED or (name in TABLE and prunable_attributes(layer) != []):
        return []
    if name in TABLE and TABLE[name].kind == BATCHNORM_KIND:
        return []
    return [w for w in getattr(layer, "trainable_weights", []) if len(w.shape) >= 2]


def refused(layer):
    """True for a layer that is never pruned and must be refused (``REFUSED``)."""
    return keras_class_name(layer) in REFUSED

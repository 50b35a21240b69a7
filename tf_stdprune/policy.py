"""`PruneForLatencyOnXNNPack`: prune only what XNNPACK's sparse inference speeds up.

XNNPACK (the CPU engine of TFLite/LiteRT) runs a stretch of a convolutional network in
channels-first layout and multiplies its 1x1 convolutions by sparse kernels (Elsen, Dukhan,
Gale and Simonyan 2020, "Fast Sparse ConvNets") when the stretch starts with a 3x3
stride-2 convolution of a 3-channel image and ends with a global average pooling, and
every layer in between is one XNNPACK can run that way. Only the 1x1 convolutions there
gain from zeros, so this policy lets the std rule prune the ``Conv2D`` layers of kernel
size 1x1 and no other layer, and refuses a model whose graph XNNPACK could not run
sparsely, naming the first layer in the way.

The checks (the same as tfmot's policy of that name, for either Keras):

* the model is a built Sequential or functional model;
* every input reaches, before anything else that stops it, a ``Conv2D`` with a
  ``3x3x3`` kernel, strides 2 and ``"valid"`` padding fed by a ``ZeroPadding2D`` of 1 on
  each side, or with ``"same"`` padding (the same computation on inputs of even size);
* every output is reached from a ``GlobalAveragePooling2D``;
* every layer between them is of a kind XNNPACK runs channels-first: 1x1 ``Conv2D`` of
  stride 1 and no dilation or groups; 3x3 or 5x5 ``DepthwiseConv2D`` (multiplier 1, no
  dilation) of stride 1 with ``"same"`` padding, or of stride 1 or 2 with ``"valid"``
  padding after a ``ZeroPadding2D``; ``BatchNormalization`` over the last axis;
  ``Add``, ``Multiply``, ``ZeroPadding2D``, ``ReLU`` (ReLU6 included), ``LeakyReLU``,
  ``ELU``, ``Dropout``; ``Activation`` of relu, relu6, leaky_relu, elu or sigmoid;
  bilinear ``UpSampling2D``; pruning wrappers count as the layer they wrap.

The ``"same"``-padded first convolution is accepted beside tfmot's explicit padding:
TFLite passes both to XNNPACK as the same padded convolution. XNNPACK only takes the
sparse path for kernels with at least about two thirds zeros.
"""
from tf_stdprune.registry import keras_class_name

ACTIVATIONS = frozenset({"relu", "relu6", "leaky_relu", "elu", "sigmoid"})
ALWAYS_SUPPORTED = frozenset({"Add", "Multiply", "ZeroPadding2D", "ReLU", "LeakyReLU", "ELU",
                              "Dropout", "Identity", "Subtract"})
WRAPPERS = frozenset({"PruneLowStd", "PruneLowMagnitude"})


def class_name(layer):
    """The Keras class ``layer`` is an instance of (its first Keras base), else its own."""
    return keras_class_name(layer) or type(layer).__name__


def producers(layer):
    """The layers whose outputs ``layer`` consumes (either Keras's graph nodes)."""
    found = []
    for node in layer._inbound_nodes:
        if hasattr(node, "operation"):  # Keras 3
            found += [parent.operation for parent in node.parent_nodes]
        else:  # tf_keras
            inbound = node.inbound_layers
            found += list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]
    return list(dict.fromkeys(found))


def consumers(layer):
    """The layers that consume ``layer``'s outputs; a Sequential counts as its first layer."""
    found = []
    for node in layer._outbound_nodes:
        consumer = node.operation if hasattr(node, "operation") else node.outbound_layer
        while class_name(consumer) == "Sequential":
            consumer = consumer.layers[0]
        found.append(consumer)
    return list(dict.fromkeys(found))


def search(sources, stop, step):
    """The layers where ``stop`` holds, walking from ``sources`` along ``step``; empty if
    some path ends (no further layer) before reaching one."""
    queue, seen, found = list(sources), set(map(id, sources)), []
    while queue:
        layer = queue.pop()
        if stop(layer):
            found.append(layer)
            continue
        following = step(layer)
        if not following:
            return []
        for item in following:
            if id(item) not in seen:
                seen.add(id(item))
                queue.append(item)
    return found


def pads_by(layer, amount):
    """True if ``layer``'s only producer is a ZeroPadding2D of ``amount`` on every side."""
    before = producers(layer)
    return (len(before) == 1 and class_name(before[0]) == "ZeroPadding2D"
            and tuple(map(tuple, before[0].padding)) == ((amount, amount), (amount, amount)))


def pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def is_start(layer):
    """The first convolution of a sparse stretch (module docstring)."""
    if class_name(layer) != "Conv2D" or getattr(layer, "kernel", None) is None:
        return False
    padding = layer.padding.lower()
    return (tuple(layer.kernel.shape[:3]) == (3, 3, 3) and pair(layer.strides) == (2, 2)
            and (padding == "same" or (padding == "valid" and pads_by(layer, 1))))


def is_end(layer):
    return class_name(layer) == "GlobalAveragePooling2D"


def runs_channels_first(layer):
    """Whether XNNPACK runs ``layer`` inside a sparse stretch (module docstring)."""
    name = class_name(layer)
    if name in WRAPPERS:
        return runs_channels_first(layer.layer)
    if name in ALWAYS_SUPPORTED:
        return True
    if name == "Conv2D":
        return (pair(layer.kernel_size) == (1, 1) and pair(layer.strides) == (1, 1)
                and pair(layer.dilation_rate) == (1, 1) and getattr(layer, "groups", 1) == 1)
    if name == "DepthwiseConv2D":
        size, strides, padding = pair(layer.kernel_size), pair(layer.strides), layer.padding.lower()
        if (size not in ((3, 3), (5, 5)) or layer.depth_multiplier != 1
                or pair(layer.dilation_rate) != (1, 1)):
            return False
        if padding == "same":
            return strides == (1, 1)
        return strides in ((1, 1), (2, 2)) and pads_by(layer, size[0] // 2)
    if name == "BatchNormalization":
        axis = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        return list(axis) in ([3], [-1])
    if name == "UpSampling2D":
        return layer.interpolation == "bilinear"
    if name == "Activation":
        return getattr(layer.activation, "__name__", "") in ACTIVATIONS
    return False


class PruneForLatencyOnXNNPack:
    """A pruning policy for `tf_stdprune.prune_low_std` (either Keras): the std rule on
    1x1 ``Conv2D`` layers only, in a model that XNNPACK can run sparsely (module
    docstring). Export with ``tf_stdprune.export_tflite(model, path, sparse=True)``.

    Examples:
      >>> pruned = tf_stdprune.prune_low_std(
      ...     model, pruning_schedule=schedule,
      ...     pruning_policy=tf_stdprune.PruneForLatencyOnXNNPack())
    """

    def allow_pruning(self, layer):
        """True for a ``Conv2D`` (or subclass) of kernel size 1x1."""
        return class_name(layer) == "Conv2D" and pair(layer.kernel_size) == (1, 1)

    def ensure_model_supports_pruning(self, model):
        """Raises ValueError naming what stops XNNPACK's sparse inference in ``model``."""
        name = class_name(model)
        if name not in ("Sequential", "Functional") and not getattr(
                model, "_is_graph_network", False):
            raise ValueError(
                f"PruneForLatencyOnXNNPack needs a Sequential or functional model; "
                f"{model.name!r} is a subclassed {type(model).__name__}.")
        if not model.built:
            raise ValueError(f"PruneForLatencyOnXNNPack needs a built model; build "
                             f"{model.name!r} first (give it a keras.Input).")
        entries = [tensor._keras_history[0] for tensor in model.inputs]
        starts = search(entries, is_start, consumers)
        if not starts:
            raise ValueError(
                f"PruneForLatencyOnXNNPack: model {model.name!r} does not begin (on every "
                "input) with a 3x3 Conv2D of stride 2 over 3 channels, 'same' padded or "
                "'valid' after ZeroPadding2D(1), where XNNPACK's sparse inference starts.")
        exits = [tensor._keras_history[0] for tensor in model.outputs]
        ends = search(exits, is_end, producers)
        if not ends:
            raise ValueError(
                f"PruneForLatencyOnXNNPack: model {model.name!r} has an output that no "
                "GlobalAveragePooling2D leads to, where XNNPACK's sparse inference ends.")
        end_ids = set(map(id, ends))

        def checked(layer):
            if id(layer) in end_ids:
                return True
            if not runs_channels_first(layer):
                raise ValueError(
                    f"PruneForLatencyOnXNNPack: layer {layer.name!r} ({class_name(layer)}) "
                    "cannot run in XNNPACK's sparse inference; replace it (see "
                    "tf_stdprune.policy for the supported layers) or prune without the policy.")
            return False

        search([c for start in starts for c in consumers(start)], checked, consumers)

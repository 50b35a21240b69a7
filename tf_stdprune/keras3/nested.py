"""Pruning attached in place to the layers of any Keras 3 model, at any depth.

`prune_low_std` wraps the layers of a flat Sequential or functional model in `PruneLowStd`
(a new graph around the same layers). Every other model — a functional subclass (every
KerasHub Backbone and Task), a subclassed model with a hand-written ``call``, a custom
layer made of Dense sublayers, at any depth — is pruned here instead, on a copy:

1. The copy: ``deserialize_keras_object(serialize_keras_object(model))`` rebuilds the same
   class from its config (KerasHub classes and any class registered with
   ``keras.saving.register_keras_serializable``), then ``set_weights`` copies the values.
   The user's model is never touched.
2. The walk: every layer of the copy's layer tree, depth first through each layer's
   sublayers (``Layer._flatten_layers(include_self=False, recursive=False)``, the tree
   Keras itself tracks), with its path ``parent/child/...`` of layer names. A layer that
   `registry` names (Dense, EinsumDense, Conv*, Embedding and so KerasHub's
   ``ReversibleEmbedding``, the recurrent layers, ``MultiHeadAttention`` and so KerasHub's
   ``CachedMultiHeadAttention``, ...) is pruned as a whole and not entered. Any other
   layer is entered; if it holds trainable tensors of rank >= 2 of its own (not in a
   sublayer) it raises ``ValueError`` naming its path and ``skip=``.
3. The attachment, as Keras 3's own ``Dense.enable_lora`` and ``quantize`` change a layer
   in place (`attach`): a `NestedPruning` state is set on the layer (attribute
   ``tf_stdprune_pruning``), its masks, thresholds and sigmas are added to the layer as
   non-trainable weights (the layer's variable tracker is unlocked for this, as
   ``enable_lora`` does), and the layer's ``call`` is replaced, on this instance only, by
   one that computes with ``w * m`` in place of each pruned tensor (`wrapper.substituted`)
   and then runs the class's own ``call``.
   The graph, the class and the config of every layer stay as they were, so KerasHub's
   functional graphs and hand-written ``call`` methods run unchanged, tied weights (a
   ``ReversibleEmbedding`` used for the input and, reversed, for the logits) are one
   tensor with one mask, and a layer reached by two paths is pruned once.

The masks are model variables (``model.non_trainable_variables``), so JAX's stateless
training sees their current values, `UpdatePruningStep` changes them between steps, and
the run directory's checkpoints hold them. `strip_pruning` rebuilds the same class from
the same config and sets every weight (``w * m`` for pruned tensors): the result is the
model the user would have built, with exact zeros. A pruned model's own ``.keras`` file
does not hold the masks: save `strip_pruning`'s result, or use the run directory.

Weight sharing uses the same attachment (`tf_stdprune.keras3.quantize.quantize_in_place`:
centroids and indices become the layer's weights, its own kernel stops training), so
`quantize_weights`, `strip_quantization`, `compress` / `decompress` (the file stores the
class's config: KerasHub must be imported to decompress a KerasHub model) and the sparse
SavedModel export (which reads a copy rebuilt the same way, and serves the model's own
input structure, e.g. ``token_ids`` and ``padding_mask``) work on these models too.

Under ``keras.distribution`` each mask is created with its tensor's layout; a tensor
created before the distribution was set has none, and pruning it raises ``ValueError``
naming the layer and the fix (`tf_stdprune.keras3.wrapper.variable_layout`). The copy
made here is created under the active distribution, so this concerns flat models, whose
layers are shared with the user's model.

Keras and KerasHub internals this relies on: ``Layer._flatten_layers`` (the layer tree),
``Layer._tracker`` (unlocked to add weights after build, as ``Dense.enable_lora`` does),
``layer.call`` looked up on the instance before the class (so an instance attribute
replaces it), tensors read through the attributes `registry` names at call time (a
KerasHub ``ReversibleEmbedding`` reads ``embeddings`` for both directions), and
``serialize_keras_object`` / ``deserialize_keras_object`` rebuilding every KerasHub class.

Dropout inside transformer blocks (KerasHub's attention and feedforward dropouts, set by
a constructor argument and kept in the config) is left at its rate: dropout rescaling
(`procedure.dropout`) changes only ``keras.layers.Dropout`` layers whose input comes from a
pruned layer in a functional graph.
"""
import warnings

import keras

from tf_stdprune import mask_rule, registry
from tf_stdprune.keras3.wrapper import DEFAULT_STD_MODE, MaskedTensors, substituted, \
    default_schedule
from tf_stdprune.validate import check_quality

class NestedPruning(MaskedTensors):
    """The pruning state of one layer pruned in place (module docstring): the same
    interface as `PruneLowStd` (``update_masks``, ``apply_masks``, ``masks``, ``paths``,
    ``pruning_schedule``, ...) for the callbacks, the procedure and the exports.

    Args:
      layer: a built Keras 3 layer that `registry` names.
      path: the layer's path in the model (``backbone/transformer_layer_0/...``).
    """

    def __init__(self, layer, path, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                 layer_quality=1.0, prune_batchnorm=True, sparsity_m_by_n=None,
                 block_size=(1, 1), block_pooling_type="AVG"):
        self.layer, self.name = layer, path
        self.paths = registry.prunable_attributes(layer, prune_batchnorm)
        self.sparsity_m_by_n, self.block_size = sparsity_m_by_n, tuple(block_size)
        self.block_pooling_type = block_pooling_type
        mask_rule.check_m_by_n_ranks(path, self.pruned_weights, sparsity_m_by_n)
        mask_rule.check_block_ranks(path, self.pruned_weights, self.block_size)
        self.pruning_schedule = pruning_schedule or default_schedule()
        self.std_mode = std_mode
        self.layer_quality = check_quality(layer_quality, f"layer_quality of {path!r}")
        self.prune_batchnorm = bool(prune_batchnorm)
        attach(layer, registry.PRUNING_STATE, self,
               lambda: self.add_pruning_variables(layer, layer))

    @property
    def built(self):
        return self.layer.built

    @property
    def state_variables(self):
        """The variables this state added to its layer (never the model's parameters)."""
        return self.pruning_variables


def attach(layer, attribute, state, add_variables):
    """Attaches ``state`` to ``layer`` in place, as ``Dense.enable_lora`` changes a layer:
    ``add_variables()`` runs with the layer's variable tracker unlocked, the layer's
    ``call`` (this instance's only) computes with ``state.substitutes()`` in place of the
    tensors at ``state.paths``, and ``layer.<attribute>`` holds ``state``."""
    tracker = getattr(layer, "_tracker", None)
    if tracker is not None:
        tracker.unlock()
    try:
        add_variables()
    finally:
        if tracker is not None:
            tracker.lock()
    original_call = layer.call

    def call(*args, **kwargs):
        with substituted(layer, state.paths, state.substitutes()):
            return original_call(*args, **kwargs)

    object.__setattr__(layer, "call", call)
    object.__setattr__(layer, attribute, state)


def sublayers(layer):
    """The layers ``layer`` tracks directly (Keras's own layer tree)."""
    return list(layer._flatten_layers(include_self=False, recursive=False))


def layer_tree(model):
    """``(path, layer)`` for every layer under ``model``, depth first; a layer reached by
    two paths comes once, under the first."""
    seen = set()

    def walk(layer, prefix):
        for child in sublayers(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}/{child.name}" if prefix else child.name
            yield path, child
            yield from walk(child, path)

    yield from walk(model, "")


def states(model, attribute=registry.PRUNING_STATE):
    """The states attached anywhere in ``model`` under ``attribute``: `NestedPruning`
    (the default) or, with ``registry.QUANTIZATION_STATE``, weight sharing
    (`tf_stdprune.keras3.quantize.NestedQuantization`)."""
    return [getattr(layer, attribute) for layer in model._flatten_layers(include_self=False)
            if hasattr(layer, attribute)]


def own_kernels(layer):
    """Trainable tensors of rank >= 2 that ``layer`` holds itself (not in a sublayer)."""
    inner = {id(w) for child in sublayers(layer) for w in child.weights}
    return [w for w in layer.trainable_weights if id(w) not in inner and len(w.shape) >= 2]


def rebuilt(model):
    """``model``'s class rebuilt from its config (the user compiles the result)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*compile.* was not called")
        return keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))


def copy_model(model):
    """A new model of the same class and config with the same weights (module docstring)."""
    try:
        copy = rebuilt(model)
    except Exception as error:  # Keras raises several types for an unrebuildable class
        raise ValueError(
            f"prune_low_std prunes a copy of {model.name!r} ({type(model).__name__}), made "
            f"from its config, and the copy failed: {error}. Give the class (and each custom "
            "layer) a get_config() that its __init__ accepts and register it with "
            "@keras.saving.register_keras_serializable().") from error
    copy.set_weights(model.get_weights())
    return copy


def matches(path, names):
    """True if ``names`` holds the layer's name, its path, or the path of a parent."""
    parts = path.split("/")
    return parts[-1] in names or any("/".join(parts[:i]) in names
                                     for i in range(1, len(parts) + 1))


def prune_in_place(model, layer_quality, skip, allow=None, **settings):
    """Attaches `NestedPruning` to every prunable layer of ``model`` (already a copy),
    at any depth; ``skip`` and ``layer_quality`` take layer names or paths (a path also
    covers the layers under it); ``allow(layer)``, if given (a pruning policy's
    ``allow_pruning``), must accept a layer for it to be pruned. Returns the states."""
    tree = list(layer_tree(model))
    known = {part for path, _ in tree for part in (path, path.split("/")[-1])}
    unknown = (set(layer_quality) | set(skip)) - known
    if unknown:
        alike = sorted({path for path, _ in tree for name in unknown
                        if path.split("/")[-1] == name.split("/")[-1]})
        hint = (f" Paths of layers of those names: {alike} (a layer held by two parents "
                "goes by its first path)." if alike else "")
        raise ValueError(f"layer_quality/skip name layers that are not in the model: "
                         f"{sorted(unknown)}. Use layer names or paths such as "
                         f"{tree[0][0] if tree else 'name'!r} (see tf_stdprune.sparsity_report)."
                         + hint)
    attached, covered = [], []
    for path, layer in tree:
        if matches(path, skip) or any(path.startswith(p + "/") for p in covered):
            continue
        if registry.refused(layer):
            raise ValueError(f"{path} ({type(layer).__name__}) cannot be pruned (as in "
                             f"tfmot); pass skip=[{path!r}] to leave it dense.")
        if registry.prunable_attributes(layer, settings["prune_batchnorm"]):
            if not layer.built:
                raise ValueError(
                    f"{path} ({type(layer).__name__}) is not built: the model never called "
                    "it, so it has no weights to prune. Call the model once (model(x) or "
                    f"model.build(input_shape)) before pruning, or pass skip=[{path!r}].")
            covered.append(path)
            if allow is not None and not allow(layer):
                continue
            quality = next((layer_quality[k] for k in (path, layer.name) if k in layer_quality),
                           1.0)
            attached.append(NestedPruning(layer, path, layer_quality=quality, **settings))
        elif registry.lookup(layer) is None and own_kernels(layer) and \
                registry.keras_class_name(layer) not in registry.NOT_PRUNED:
            shapes = [tuple(w.shape) for w in own_kernels(layer)]
            raise ValueError(
                f"Layer {path} ({type(layer).__name__}) holds trainable tensors of shapes "
                f"{shapes} that tf_stdprune does not know how to prune. Pass "
                f"skip=[{path!r}] to leave it (and the layers under it) dense on purpose.")
    return attached


def strip(model):
    """The same class and config without the state attached in place, every weight set:
    pruned tensors as ``w * m`` (exact zeros), quantized tensors as the shared values they
    compute with. ``model``'s own variables change only by ``w = w * m``, which it
    computes with already."""
    pruning = states(model)
    quantization = states(model, registry.QUANTIZATION_STATE)
    for state in pruning:
        state.apply_masks()
    shared = {id(registry.get_tensor(state.layer, path)): value for state in quantization
              for path, value in state.effective_tensors().items()}
    excluded = {id(v) for state in pruning + quantization for v in state.state_variables}
    values = []
    for variable in model.weights:
        if id(variable) not in excluded:
            value = keras.ops.convert_to_numpy(variable)
            values.append(shared[id(variable)].astype(value.dtype) if id(variable) in shared
                          else value)
    stripped = rebuilt(model)
    stripped.set_weights(values)
    return stripped

"""`prune_low_std` and `strip_pruning`: a drop-in for tfmot's `prune_low_magnitude`."""
from absl import logging

from tf_stdprune import mask_rule
from tf_stdprune.keras2.engine import PruneLowMagnitude, check_keras2, keras, tfmot
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.keras2.wrapper import (
    DEFAULT_STD_MODE,
    PruneLowStd,
    check_block_arguments,
    check_flag,
    check_prunable,
    check_schedule,
    prunable_attributes,
)


def prune_scope():
    """A scope in which models holding `PruneLowStd` and/or tfmot's `PruneLowMagnitude`
    layers, and their schedules, can be deserialized (``.h5``, ``.keras``, SavedModel)."""
    return keras.utils.custom_object_scope({
        "PruneLowStd": PruneLowStd,
        "PruneLowMagnitude": PruneLowMagnitude,
        "StdPruningSchedule": StdPruningSchedule,
        "ConstantSparsity": tfmot.sparsity.keras.ConstantSparsity,
        "PolynomialDecay": tfmot.sparsity.keras.PolynomialDecay,
    })


def prune_low_std(to_prune, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                  layer_quality=None, prune_batchnorm=True, block_size=(1, 1),
                  block_pooling_type="AVG", pruning_policy=None, sparsity_m_by_n=None,
                  skip=(), **kwargs):
    """Wraps every prunable layer of ``to_prune`` in `PruneLowStd`.

    A weight ``w`` of a layer ``l`` is pruned at a pruning step of quality ``q`` when
    ``|w| < q * layer_quality.get(l, 1) * sigma_l`` (see `mask_rule` for ``sigma``).

    Args:
      to_prune: a tf_keras layer, a list of layers, or a Sequential / functional model
        (nested models, residual connections and shared layers included).
      pruning_schedule: a `StdPruningSchedule` (default ``q = 1.0`` every 100 steps), or a
        tfmot sparsity schedule, honoured as a target sparsity (see `PruneLowStd`).
      std_mode: ``"initial"`` (default: measured best, see README), ``"surviving"``, ``"all"``.
      layer_quality: ``{layer_name: factor}`` multiplying ``q`` per layer.
      prune_batchnorm: also prune BatchNormalization ``gamma`` (the reference experiment counts them).
      block_size, block_pooling_type: structured pruning of 2-D kernels: a block is kept
        iff ``pool(|w|) >= q * sigma(pool(|w|))`` (`mask_rule.std_prune_blocks`). Blocks
        are ``(rows, columns)`` of the ``[in, out]`` kernel: TFLite's block-sparse
        FullyConnected kernel (1x4 blocks of its ``[out, in]`` weights) runs
        ``block_size=(4, 1)`` after ``export_tflite(..., sparse=True)``.
      pruning_policy: `tf_stdprune.PruneForLatencyOnXNNPack()` or any tfmot
        `PruningPolicy` (models only): the layers it refuses stay dense, and the model is
        checked by its ``ensure_model_supports_pruning``.
      sparsity_m_by_n: ``(m, n)``, e.g. ``(2, 4)``: at least ``m`` zeros in every ``n``
        consecutive weights along the input dimension of Dense and Conv2D kernels, chosen
        by magnitude before the std rule prunes more (order and sigma: `mask_rule`);
        layers with other tensors need ``skip`` (BatchNormalization: ``prune_batchnorm=False``).
      skip: names of layers to keep dense, e.g. layers with kernels the registry does not
        know (which otherwise raise ValueError).
      **kwargs: layer arguments passed to `PruneLowStd` when ``to_prune`` is a single
        layer; for a model or a list any of them raises TypeError.

    Returns:
      The same kind of object with its prunable layers wrapped; layers without prunable
      tensors are kept as they are. A model with none is returned unchanged (warning).
      Layers already wrapped are kept as they are if their settings equal the requested
      ones; otherwise ValueError (strip the model first to prune it anew).

    Examples:
      >>> pruned = prune_low_std(model, StdPruningSchedule([0.5, 1.0], 1000))
      >>> pruned.fit(x, y, epochs=2, callbacks=[UpdatePruningStep()])
    """
    is_model = _check_target(to_prune, pruning_policy, kwargs)
    settings = dict(pruning_schedule=check_schedule(pruning_schedule), std_mode=std_mode,
                    prune_batchnorm=check_flag(prune_batchnorm, "prune_batchnorm"),
                    block_size=check_block_arguments(block_size, block_pooling_type,
                                                     sparsity_m_by_n),
                    block_pooling_type=block_pooling_type,
                    sparsity_m_by_n=mask_rule.check_m_by_n(sparsity_m_by_n))
    layer_quality, skip = _check_names(layer_quality, skip, to_prune)
    wrap = _wrapper_factory(settings, layer_quality, skip, pruning_policy)
    if isinstance(to_prune, list):
        return [wrap(layer) for layer in to_prune]
    if is_model:
        return _prune_model(to_prune, wrap, pruning_policy)
    if isinstance(to_prune, keras.layers.Layer):
        return PruneLowStd(to_prune, layer_quality=layer_quality.get(to_prune.name, 1.0),
                           **settings, **kwargs)
    raise ValueError(
        "prune_low_std can only prune a tf_keras Sequential or functional model, a "
        f"layer or a list of layers; got an object of type {type(to_prune).__name__}."
    )


def _check_target(to_prune, pruning_policy, kwargs):
    """Refuses a Keras 3 object, layer arguments for a model or list, and a policy for
    anything but a model; returns whether ``to_prune`` is a model."""
    check_keras2(to_prune, "The object passed to prune_low_std")
    is_model = isinstance(to_prune, keras.Model)
    if kwargs and (is_model or isinstance(to_prune, list)):
        raise TypeError(
            f"prune_low_std got unexpected keyword argument(s) {sorted(kwargs)} for a "
            f"{type(to_prune).__name__}; see help(prune_low_std) for the accepted ones."
        )
    if pruning_policy is not None and not is_model:
        raise TypeError("pruning_policy applies to models only; pass the layers it allows "
                        "to prune_low_std instead.")
    return is_model


def _check_names(layer_quality, skip, to_prune):
    """Validates ``layer_quality`` (a dict or None) and ``skip`` (layer names)."""
    if layer_quality is None:
        layer_quality = {}
    if not isinstance(layer_quality, dict):
        raise TypeError("layer_quality must be a dict {layer_name: factor} or None, got "
                        f"{layer_quality!r} ({type(layer_quality).__name__}).")
    if isinstance(skip, str) or not all(isinstance(n, str) for n in skip):
        raise TypeError(f"skip must be a list of layer names, got {skip!r}.")
    if isinstance(to_prune, keras.Model):
        names = {l.name for l in all_layers(to_prune)}
        names |= {l.layer.name for l in all_layers(to_prune) if isinstance(l, PruneLowMagnitude)}
        for argument, given in (("layer_quality", layer_quality), ("skip", skip)):
            unknown = set(given) - names
            if unknown:
                raise ValueError(
                    f"{argument} names layers that are not in the model: {sorted(unknown)}. "
                    "Use the names printed by model.summary()."
                )
    return dict(layer_quality), frozenset(skip)


def _wrapper_factory(settings, layer_quality, skip, pruning_policy):
    """The function that wraps one layer of a model or list (or leaves it as it is)."""

    def wrap(layer):
        if isinstance(layer, PruneLowMagnitude):
            _check_same_settings(layer, settings, layer_quality)
            return layer
        if layer.name in skip:
            return layer
        if pruning_policy is not None and not pruning_policy.allow_pruning(layer):
            return layer
        check_prunable(layer)
        if prunable_attributes(layer, settings["prune_batchnorm"]) == []:
            return layer
        return PruneLowStd(layer, layer_quality=layer_quality.get(layer.name, 1.0), **settings)

    return wrap


def _check_same_settings(wrapper, settings, layer_quality):
    """Raises ValueError if an already wrapped layer was wrapped with other settings."""
    if not isinstance(wrapper, PruneLowStd):
        return  # tfmot's own wrapper: kept, as tfmot keeps it
    ours = dict(pruning_schedule=wrapper.pruning_schedule.get_config(), std_mode=wrapper.std_mode,
                prune_batchnorm=wrapper.prune_batchnorm, block_size=tuple(wrapper.block_size),
                block_pooling_type=wrapper.block_pooling_type, layer_quality=wrapper.layer_quality,
                sparsity_m_by_n=wrapper.sparsity_m_by_n)
    asked = dict(settings, pruning_schedule=settings["pruning_schedule"].get_config(),
                 layer_quality=float(layer_quality.get(wrapper.layer.name, 1.0)))
    differ = sorted(k for k in ours if ours[k] != asked[k])
    if differ:
        raise ValueError(
            f"Layer {wrapper.layer.name!r} is already pruned with other settings ({differ}: "
            f"{[ours[k] for k in differ]}, asked {[asked[k] for k in differ]}). To prune "
            "anew with the new settings, call tf_stdprune.strip_pruning(model) first."
        )


def _prune_model(model, wrap, pruning_policy):
    if pruning_policy is not None:
        pruning_policy.ensure_model_supports_pruning(model)

    def clone(inner):
        if not (isinstance(inner, keras.Sequential) or inner._is_graph_network):
            raise ValueError("Subclassed models are not supported: prune_low_std takes "
                             "Sequential and functional models (nested ones included).")
        return keras.models.clone_model(
            inner, input_tensors=None,
            clone_function=lambda l: clone(l) if isinstance(l, keras.Model) else wrap(l),
        )

    pruned = clone(model)
    if not any(isinstance(l, PruneLowMagnitude) for l in all_layers(pruned)):
        logging.warning("prune_low_std: %s has no prunable layer; returned unchanged.", model.name)
        return model
    return pruned


def strip_pruning(model):
    """A copy of ``model`` whose pruning wrappers are replaced by the layers they wrap.

    Every `PruneLowStd` and every tfmot `PruneLowMagnitude` is removed, at any depth of
    nested Sequential and functional models. Before a wrapper is removed its tensors are
    set to ``w * m`` once more, so the returned model holds exactly the pruned weights
    (the wrapped layer objects and their variables are reused, not copied). Layers that
    were never wrapped are kept as they are.

    Raises:
      ValueError: if ``model`` is not a tf_keras model, or is a subclassed model.

    Examples:
      >>> final = strip_pruning(pruned)
      >>> final.save("final.keras")  # loads without prune_scope
    """
    check_keras2(model, "The model passed to strip_pruning")
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"strip_pruning takes a tf_keras model, got {type(model).__name__}: wrap a single "
            "layer's result as wrapper.layer instead."
        )

    def unwrap(layer):
        if isinstance(layer, keras.Model):
            return strip(layer)
        if not isinstance(layer, PruneLowMagnitude):
            return layer
        if layer.built:
            layer.pruning_obj.weight_mask_op()
        inner = layer.layer
        if not hasattr(inner, "_batch_input_shape") and hasattr(layer, "_batch_input_shape"):
            inner._batch_input_shape = layer._batch_input_shape  # builds a Sequential's first layer
        return inner

    def strip(inner):
        if not (isinstance(inner, keras.Sequential) or inner._is_graph_network):
            raise ValueError("strip_pruning takes Sequential and functional models; "
                             f"{inner.name!r} is a subclassed model.")
        return keras.models.clone_model(inner, input_tensors=None, clone_function=unwrap)

    return strip(model)


def all_layers(model):
    """Every layer of ``model``, nested models' layers included, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)

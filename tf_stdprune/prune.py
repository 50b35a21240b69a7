"""`prune_low_std`: the entry point, a drop-in for tfmot's `prune_low_magnitude`."""
from absl import logging

from tf_stdprune._keras import PruneLowMagnitude, check_keras2, keras, tfmot
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.wrapper import DEFAULT_STD_MODE, PruneLowStd, prunable_attributes

strip_pruning = tfmot.sparsity.keras.strip_pruning


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
                  layer_quality=None, prune_batchnorm=True, **kwargs):
    """Wraps every prunable layer of ``to_prune`` in `PruneLowStd`.

    A weight ``w`` of a layer ``l`` is pruned at a pruning step of quality ``q`` when
    ``|w| < q * layer_quality.get(l, 1) * sigma_l`` (see `mask_rule` for ``sigma``).

    Args:
      to_prune: a tf_keras layer, a list of layers, or a Sequential / functional model
        (nested models, residual connections and shared layers included).
      pruning_schedule: a `StdPruningSchedule`; default ``q = 1.0`` every 100 steps.
      std_mode: ``"initial"`` (default: measured best, see README), ``"surviving"``, ``"all"``.
      layer_quality: ``{layer_name: factor}`` multiplying ``q`` per layer.
      prune_batchnorm: also prune BatchNormalization ``gamma`` (the seed counts them).
      **kwargs: passed to `PruneLowStd` when ``to_prune`` is a single layer.

    Returns:
      The same kind of object with its prunable layers wrapped; layers without prunable
      tensors are kept as they are. A model with none is returned unchanged (warning).
    """
    check_keras2(to_prune, "The object passed to prune_low_std")
    layer_quality = dict(layer_quality or {})
    params = dict(pruning_schedule=pruning_schedule, std_mode=std_mode,
                  prune_batchnorm=prune_batchnorm)

    def wrap(layer):
        if isinstance(layer, PruneLowMagnitude) or not _is_prunable(layer, prune_batchnorm):
            return layer
        return PruneLowStd(layer, quality_multiplier=layer_quality.get(layer.name, 1.0), **params)

    def clone(model):
        if not (isinstance(model, keras.Sequential) or model._is_graph_network):
            raise ValueError("Subclassed models are not supported currently.")
        return keras.models.clone_model(
            model, input_tensors=None,
            clone_function=lambda l: clone(l) if isinstance(l, keras.Model) else wrap(l),
        )

    if isinstance(to_prune, list):
        return [wrap(layer) for layer in to_prune]
    if isinstance(to_prune, keras.Model):
        unknown = set(layer_quality) - {l.name for l in all_layers(to_prune)}
        if unknown:
            raise ValueError(
                f"layer_quality names layers that are not in the model: {sorted(unknown)}. "
                "Use the names printed by model.summary()."
            )
        pruned = clone(to_prune)
        if not any(isinstance(l, PruneLowStd) for l in all_layers(pruned)):
            logging.warning("prune_low_std: %s has no prunable layer; returned unchanged.",
                            to_prune.name)
            return to_prune
        return pruned
    if isinstance(to_prune, keras.layers.Layer):
        return PruneLowStd(to_prune, quality_multiplier=layer_quality.get(to_prune.name, 1.0),
                           **params, **kwargs)
    raise ValueError(
        "prune_low_std can only prune a tf_keras Sequential or functional model, a "
        f"layer or a list of layers; got an object of type {type(to_prune).__name__}."
    )


def _is_prunable(layer, prune_batchnorm):
    return prunable_attributes(layer, prune_batchnorm) != []


def all_layers(model):
    """Every layer of ``model``, nested models' layers included, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)

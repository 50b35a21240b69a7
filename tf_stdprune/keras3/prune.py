"""`prune_low_std`, `strip_pruning` and `UpdatePruningStep` for Keras 3 models.

Pruning happens between training steps: `UpdatePruningStep` counts optimizer steps and,
before each batch at whose step a wrapper's schedule prunes, calls
`PruneLowStd.update_masks` with that step's ``q``. Steps are numbered as on the tf_keras
path and in tfmot: the k-th training call is step ``k`` (``optimizer.iterations + 1``
while it runs), so with
``StdPruningSchedule(qualities, steps_per_iteration=E * steps_per_epoch)`` pruning falls
on the first batch of every ``E``-th epoch, as on the tf_keras path. With
``steps_per_execution = k`` Keras runs ``k`` steps between two callback calls; pruning
steps must then be multiples of ``k`` (checked at the start of training).

On the JAX backend ``fit`` keeps the training state outside the model's variables during
an epoch; the callback writes it back (``model.jax_state_sync()``) before it changes
masks, weights and slots, and Keras reads the variables again for the next step.
"""
import inspect

from absl import logging
import keras

from tf_stdprune import mask_rule, registry
from tf_stdprune.keras3 import nested
from tf_stdprune.procedure.dropout import restore_dropout
from tf_stdprune.keras3.wrapper import DEFAULT_STD_MODE, PruneLowStd, SubstitutingWrapper
from tf_stdprune.validate import check_quality


def all_layers(model):
    """Every layer of ``model``, nested models' layers included, depth first."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def wrappers(model):
    """The pruned layers of a Keras 3 model: its `PruneLowStd` wrappers (nested models
    included) and the `nested.NestedPruning` states attached at any depth."""
    return [layer for layer in all_layers(model) if isinstance(layer, PruneLowStd)] + \
        nested.states(model)


def is_flat(model):
    """True for a Sequential or functional model (of the classes Keras itself defines)
    whose layers, and those of its nested flat models, hold no prunable layer inside a
    layer of another kind: `PruneLowStd` wrappers reach all of it. Any other model is
    pruned in place on a copy (`nested`)."""
    if type(model) not in (keras.Sequential, keras.Model) and \
            type(model).__name__ not in ("Functional", "Sequential"):
        return False
    for layer in model.layers:
        if isinstance(layer, SubstitutingWrapper):
            continue  # a pruning or quantization wrapper: a leaf
        if isinstance(layer, keras.Model):
            if not is_flat(layer):
                return False
        elif not registry.prunable_attributes(layer) and any(
                registry.prunable_attributes(inner) or nested.own_kernels(inner)
                for _, inner in nested.layer_tree(layer)):
            return False
    return True


def _unknown_layer_error(layer):
    return ValueError(
        f"Layer {layer.name!r} ({type(layer).__name__}) holds trainable kernels that "
        "tf_stdprune does not know how to prune. Pass skip=[{!r}] to leave it dense on "
        "purpose, or replace it by layers that tf_stdprune prunes (Dense, Conv*, Embedding, "
        "LSTM, MultiHeadAttention, ...).".format(layer.name)
    )


def prune_low_std(to_prune, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                  layer_quality=None, prune_batchnorm=True, skip=(), sparsity_m_by_n=None,
                  pruning_policy=None, block_size=(1, 1), block_pooling_type="AVG"):
    """Wraps every prunable layer of a Keras 3 model (or one layer) in `PruneLowStd`.

    A weight ``w`` of layer ``l`` is pruned at a pruning step of quality ``q`` when
    ``|w| < q * layer_quality.get(l, 1) * sigma_l`` (see `mask_rule`).

    Args:
      to_prune: a Keras 3 layer, a list of layers, or any Keras 3 model: Sequential,
        functional, functional subclasses (KerasHub Backbones and Tasks), subclassed
        models, with prunable layers at any depth (inside custom layers and nested
        models; see `tf_stdprune.keras3.nested`).
      pruning_schedule: a `StdPruningSchedule`; default ``q = 1.0`` every 100 steps.
      std_mode: ``"initial"``, ``"surviving"`` or ``"all"``.
      layer_quality: ``{layer name or path: factor}`` multiplying ``q`` per layer.
      prune_batchnorm: also prune BatchNormalization ``gamma``.
      skip: names or paths (``"backbone/transformer_layer_0"``) of layers to leave dense
        on purpose; a path also covers the layers under it.
      sparsity_m_by_n: ``(m, n)``, e.g. ``(2, 4)``: at least ``m`` zeros in every ``n``
        consecutive weights along the input dimension of Dense and Conv2D kernels, before
        the std rule (`mask_rule`); other tensors need ``skip`` / ``prune_batchnorm=False``.
      pruning_policy: e.g. `tf_stdprune.PruneForLatencyOnXNNPack()` (models only): only the
        layers it allows are wrapped, after its ``ensure_model_supports_pruning(model)``.
      block_size, block_pooling_type: whole blocks of 2-D kernels kept or pruned by their
        pooled ``|w|`` (``(rows, columns)`` of the ``[in, out]`` kernel; TFLite's
        block-sparse FullyConnected runs ``(4, 1)``), as on the tf_keras path.

    Returns:
      For a flat Sequential or functional model, a new model of the same kind whose
      prunable layers are wrapped (the layers themselves, and so their weights, are
      shared with ``to_prune``); for any other model a copy of the same class and config
      with pruning attached in place (``to_prune`` is not changed); for a layer, the
      wrapped layer. A layer with trainable kernels that `registry` does not know raises
      ``ValueError`` unless it is named in ``skip``: nothing is left dense silently.

    Examples:
      >>> schedule = StdPruningSchedule([0.5, 1.0], steps_per_iteration=3 * steps)
      >>> pruned = prune_low_std(model, pruning_schedule=schedule)
      >>> pruned.fit(x, y, epochs=6, callbacks=[UpdatePruningStep()])
    """
    layer_quality = dict(layer_quality or {})
    for name, factor in layer_quality.items():
        check_quality(factor, f"layer_quality[{name!r}]")
    skip = set(skip)
    settings = dict(pruning_schedule=pruning_schedule, std_mode=std_mode,
                    prune_batchnorm=prune_batchnorm,
                    sparsity_m_by_n=mask_rule.check_m_by_n(sparsity_m_by_n),
                    block_size=mask_rule.check_block_arguments(block_size, block_pooling_type,
                                                               sparsity_m_by_n),
                    block_pooling_type=block_pooling_type)
    if pruning_policy is not None and not isinstance(to_prune, keras.Model):
        raise TypeError("pruning_policy applies to models only; pass the layers it allows "
                        "to prune_low_std instead.")

    def wrap(layer):
        if isinstance(layer, keras.Model):
            return layer
        if layer.name in skip or isinstance(layer, PruneLowStd):
            return layer
        if pruning_policy is not None and not pruning_policy.allow_pruning(layer):
            return layer
        if registry.prunable_attributes(layer, prune_batchnorm):
            return PruneLowStd(layer, layer_quality=layer_quality.get(layer.name, 1.0),
                               **settings)
        if registry.unknown_kernels(layer):
            raise _unknown_layer_error(layer)
        return layer

    if isinstance(to_prune, (list, tuple)):
        return [wrap(layer) for layer in to_prune]
    if not isinstance(to_prune, keras.Model):
        return wrap(to_prune)
    if nested.states(to_prune):
        raise ValueError(f"{to_prune.name!r} is already pruned; strip_pruning(model) first "
                         "to prune it again.")
    if not is_flat(to_prune):
        if pruning_policy is not None:
            pruning_policy.ensure_model_supports_pruning(to_prune)
        allow = pruning_policy.allow_pruning if pruning_policy is not None else None
        pruned = nested.copy_model(to_prune)
        if not nested.prune_in_place(pruned, layer_quality, skip, allow, **settings):
            logging.warning("prune_low_std: %s has no prunable layer.", to_prune.name)
        return pruned
    names = {layer.name for layer in all_layers(to_prune)}
    unknown = (set(layer_quality) | skip) - names
    if unknown:
        raise ValueError(f"layer_quality/skip name layers that are not in the model: "
                         f"{sorted(unknown)}. Use the names printed by model.summary().")
    if pruning_policy is not None:
        pruning_policy.ensure_model_supports_pruning(to_prune)
    pruned = keras.models.clone_model(to_prune, clone_function=wrap, recursive=True)
    if not wrappers(pruned):
        logging.warning("prune_low_std: %s has no prunable layer.", to_prune.name)
    return pruned


def strip_pruning(model):
    """A model without pruning wrappers: each `PruneLowStd` is replaced by its layer.

    The layers (and weights) are shared with ``model``; each pruned tensor is set to
    ``w * m`` first, so the result holds exact zeros, and Dropout rates rescaled during
    pruning get their original rate back (`dropout.restore_dropout`). Works on nested
    models.
    """
    restore_dropout(model)
    if isinstance(model, PruneLowStd):
        model.apply_masks()
        return model.layer
    if nested.states(model):
        return nested.strip(model)
    for wrapper in wrappers(model):
        wrapper.apply_masks()

    def unwrap(layer):
        return layer.layer if isinstance(layer, PruneLowStd) else layer

    functional = {} if isinstance(model, keras.Sequential) else dict(
        call_function=call_taking_only_its_arguments)  # Keras takes it for functional models
    return keras.models.clone_model(model, clone_function=unwrap, recursive=True, **functional)


def call_taking_only_its_arguments(layer, *args, **kwargs):
    """``layer(*args, **kwargs)`` without the keyword arguments its ``call`` does not take:
    a wrapper's graph node records ``mask``, which e.g. a bare Dense does not accept."""
    parameters = inspect.signature(layer.call).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in parameters}
    return layer(*args, **kwargs)


def prune_due(pruning_wrappers, step, optimizer=None):
    """Prunes each wrapper whose schedule prunes at ``step`` and that has not pruned at
    that step yet: its masks shrink with the step's ``q`` (`PruneLowStd.update_masks`),
    its optimizer slots are masked, and the step is recorded on it (``pruned_step``), so
    that a mask update made before the step's batch (`tf_stdprune.keras3.iterative.IterativePruning`
    prunes at an iteration's start) is not repeated by `UpdatePruningStep`. Returns the
    last ``q`` used, or None if none pruned. A due wrapper with NaN or infinite weights
    raises `tf_stdprune.NonFiniteError` before any wrapper changes.
    """
    quality = None
    due = [w for w in pruning_wrappers if w.pruning_schedule.should_prune(step)
           and getattr(w, "pruned_step", None) != step]
    for wrapper in due:  # every due wrapper checked before any changes
        wrapper.check_finite(step)
    for wrapper in due:
        schedule = wrapper.pruning_schedule
        quality = float(schedule.quality(schedule.iteration(step)))
        wrapper.update_masks(quality, optimizer, step)
        wrapper.pruned_step = step
    return quality


def check_fresh_optimizer(pruning_wrappers, taken):
    """Raises ValueError when the optimizer took ``taken > 0`` steps before any of
    ``pruning_wrappers`` was trained or pruned (an optimizer reused from an earlier fit):
    the pruning step is ``optimizer.iterations + 1``, so the schedule would be shifted."""
    if taken == 0 or not pruning_wrappers:
        return
    if any(getattr(w, "steps_counted", False) for w in pruning_wrappers):
        return
    if any(float(keras.ops.convert_to_numpy(s)) != mask_rule.UNSET_SIGMA
           for w in pruning_wrappers for s in w.sigmas):
        return  # pruned before (a restored run, a loaded model): its steps go on
    first = pruning_wrappers[0].pruning_schedule.first_step
    raise ValueError(
        f"The optimizer already took {taken} steps (optimizer.iterations, e.g. in an earlier "
        f"fit) before this model was pruned; the pruning step is optimizer.iterations + 1, so "
        f"the schedule's pruning at step {first} would be skipped or shifted. Compile the "
        "pruned model with a fresh optimizer (an optimizer reused from an earlier fit keeps its "
        "count), or resume a run with tf_stdprune.restore_run."
    )


class UpdatePruningStep(keras.callbacks.Callback):
    """Prunes every `PruneLowStd` of the model at the steps its schedule names.

    At the start of training every tensor is re-masked and the optimizer's slots are
    multiplied by the masks (whatever happened to the weights before ``fit``). Before each
    batch whose step is a pruning step of a wrapper's schedule, that wrapper's masks shrink
    (`PruneLowStd.update_masks`) and its slots are masked. Costs nothing on other batches.

    A due wrapper with NaN or infinite weights raises `tf_stdprune.NonFiniteError` before
    any wrapper changes; an optimizer that took steps before the model was ever pruned
    raises ValueError at the start of training (`check_fresh_optimizer`).
    """

    def on_train_begin(self, logs=None):
        self._wrappers = wrappers(self.model)
        unbuilt = [w.name for w in self._wrappers if not w.built]
        if unbuilt:
            raise ValueError(
                f"The pruned model is not built yet ({unbuilt[0]} has no weights), so it "
                "cannot be pruned at the first step: give the model a keras.Input(shape), or "
                "call model.build(input_shape) before fit."
            )
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._taken = int(keras.ops.convert_to_numpy(optimizer.iterations))
        check_fresh_optimizer(self._wrappers, self._taken)
        self._per_call = int(getattr(self.model, "steps_per_execution", 1) or 1)
        for wrapper in self._wrappers:
            wrapper.apply_masks(optimizer)
            wrapper.pruned_step = None  # a new fit may count its steps anew
            wrapper.steps_counted = True  # its optimizer's steps are its pruning steps now
            schedule = wrapper.pruning_schedule
            if self._per_call > 1 and (schedule.steps_per_iteration % self._per_call
                                       or (schedule.first_step - 1) % self._per_call):
                raise ValueError(
                    f"{wrapper.name}: with steps_per_execution={self._per_call} pruning can "
                    "only happen at steps 1, k + 1, 2k + 1, ... (k = steps_per_execution); make "
                    "the schedule's steps_per_iteration a multiple of k and begin_step one more "
                    "than a multiple of k."
                )

    def on_train_batch_begin(self, batch, logs=None):
        step = self._taken + 1  # tfmot's numbering: the k-th training call is step k
        if not any(w.pruning_schedule.should_prune(step) for w in self._wrappers):
            return
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        prune_due(self._wrappers, step, self.model.optimizer)

    def on_train_batch_end(self, batch, logs=None):
        self._taken += self._per_call

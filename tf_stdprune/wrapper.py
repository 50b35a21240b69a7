"""`PruneLowStd`: a tfmot pruning wrapper whose kernels AND gradients are masked.

For every prunable tensor ``w`` of the wrapped layer the wrapper keeps a mask ``m``, the
last ``threshold`` and ``sigma`` (see `mask_rule`). The layer computes with ``w * m``
instead of ``w``, and the gradient that reaches the optimizer is

    dL/dw = (dL/d(w*m)) * m,

exactly 0 at pruned positions. When the schedule fires (inside the training call, as
tfmot does) the masks shrink and newly pruned weights are set to exactly 0.0;
`UpdatePruningStep` then zeroes the optimizer slots (momentum, Adam m/v) at the pruned
positions. From there on gradient, L2 term, momentum and decoupled weight decay are all 0
at pruned positions, so stored pruned weights stay exactly 0.0 with no per-step re-masking.

While that holds the product ``w * m`` equals the stored ``w``, so the forward pass skips
it: a boolean ``weights_masked`` is set by `mask_optimizer_slots` (which establishes it:
``w = w * m``, ``s = s * m``) and cleared whenever the masks change. With it set, one
elementwise pass over the weights per step remains (the gradient's ``* m``), as in tfmot
(its ``w = w * m`` assignment). Ours multiplies the gradient, a temporary TensorFlow may
overwrite in place; tfmot's allocates a new buffer for every weight at every step, which
at full width costs page faults and makes its step 4-5 % slower than ours at batch 8 and
16 (README). Without our callback (tfmot's `UpdatePruningStep`, a custom loop that never
calls `mask_optimizer_slots`) it stays cleared after the first pruning and every step
multiplies.
Assigning a kernel directly (``kernel.assign(dense)``) breaks it: call
``wrapper.pruning_obj.weight_mask_op()`` afterwards (tfmot's `UpdatePruningStep` does at
each epoch's end, ours also at ``on_train_begin``).

It subclasses tfmot's `PruneLowMagnitude` and keeps its protocol (``pruning_step``,
``pruning_vars`` of ``(weight, mask, threshold)``, ``pruning_obj.weight_mask_op()`` and
``conditional_mask_update()``), so tfmot's `UpdatePruningStep`, `PruningSummaries`,
`strip_pruning` and `collect_prunable_layers` work on it unchanged.
"""
import contextlib
import inspect

import tensorflow as tf

from tf_stdprune import mask_rule, registry
from tf_stdprune._keras import PruneLowMagnitude, check_keras2, keras, tfmot
from tf_stdprune.schedule import StdPruningSchedule, _check_quality

# Measured with benchmarks/std_mode.py: at the same q, "initial" gives the most sparsity
# for the least accuracy loss; "surviving" compounds from step to step (collapses at the
# seed's q range) and "all" prunes less and no better. See the README.
DEFAULT_STD_MODE = "initial"
# The schedule is plain Python: make it a tfmot schedule and a tf_keras serializable here.
tfmot.sparsity.keras.PruningSchedule.register(StdPruningSchedule)
keras.utils.register_keras_serializable(package="tf_stdprune")(StdPruningSchedule)

_STEP_ERROR = (
    "PruneLowStd needs the UpdatePruningStep callback during training: add "
    "tf_stdprune.UpdatePruningStep() to model.fit's callbacks (or call its "
    "on_train_begin/on_train_batch_end in a custom loop)."
)


def prunable_attributes(layer, prune_batchnorm=True):
    """Attribute paths of the tensors of ``layer`` that are pruned (`registry`); a tfmot
    `PrunableLayer` is honoured once built (``None`` before)."""
    if isinstance(layer, tfmot.sparsity.keras.PrunableLayer) and not layer.built:
        return None
    return registry.prunable_attributes(layer, prune_batchnorm)


@contextlib.contextmanager
def substituted(layer, attributes, tensors):
    """Sets ``layer.<attribute> = tensor`` (bypassing Keras tracking), restores on exit.

    Each tensor is cast to the dtype the layer reads that attribute in: its compute dtype
    for an autocast variable (mixed precision kernels), else the variable's own dtype
    (e.g. BatchNormalization's float32 gamma).
    """
    places = [registry.resolve(layer, a) for a in attributes]
    originals = [getattr(owner, a) for owner, a in places]
    for (owner, attribute), tensor, original in zip(places, tensors, originals):
        dtype = owner.compute_dtype if hasattr(original, "true_dtype") else original.dtype
        object.__setattr__(owner, attribute, tf.cast(tensor, dtype))
    try:
        yield
    finally:
        for (owner, attribute), original in zip(places, originals):
            object.__setattr__(owner, attribute, original)


def _masked(weight, mask, weights_masked):
    """The tensor the layer computes with: ``w * m`` in the compute dtype of ``w``.

    While ``weights_masked`` is true the stored ``w`` already equals ``w * m`` and is
    returned as it is. Either way the gradient is ``g * m`` for ``w``, none for the mask.
    """
    kernel = tf.convert_to_tensor(weight)
    return _multiply_by_mask(kernel, tf.cast(mask, kernel.dtype), weights_masked)


@tf.custom_gradient
def _multiply_by_mask(kernel, mask, weights_masked):
    product = tf.cond(weights_masked, lambda: tf.identity(kernel), lambda: kernel * mask)
    return product, lambda grad: (grad * mask, None, None)


def _float32_value(variable):
    """The stored value of a (possibly AutoCast) variable, never the float16 cast."""
    return tf.convert_to_tensor(getattr(variable, "_variable", variable))


def _cross_replica(fn):
    """Runs ``fn(strategy)`` once, in cross-replica context, as tfmot's pruning does.

    Values computed there come from one read of each (mirrored) variable, so every
    replica receives the same mask, threshold and sigma.
    """
    context = tf.distribute.get_replica_context()
    if context is None:
        return fn(tf.distribute.get_strategy())
    return context.merge_call(fn)


def _assign_everywhere(strategy, pairs):
    """Assigns each ``(variable, value)`` of ``pairs`` on every replica."""
    return tf.group(
        [strategy.extended.update(v, lambda v, x: v.assign(x), args=(x,)) for v, x in pairs]
    )


class StdPruning:
    """The mask updates of one `PruneLowStd` (tfmot's ``pruning_obj`` protocol)."""

    def __init__(self, wrapper):
        self._wrapper = wrapper

    def new_values(self, quality):
        """``(variable, value)`` pairs of one application of the rule with quality ``q``.

        ``q_layer = q * quality_multiplier``; per tensor ``threshold = q_layer * sigma``,
        ``m_new = m AND (|w| >= threshold)``, ``w_new = w * m_new``.
        """
        wrapper = self._wrapper
        quality = quality * wrapper.quality_multiplier
        pairs = []
        for (weight, mask, threshold), sigma in zip(wrapper.pruning_vars, wrapper.sigmas):
            new_mask, new_threshold, new_sigma, new_weight = mask_rule.std_prune(
                _float32_value(weight), tf.convert_to_tensor(mask), quality, wrapper.std_mode,
                tf.convert_to_tensor(sigma))
            pairs += [(mask, new_mask), (threshold, new_threshold), (sigma, new_sigma),
                      (weight, tf.cast(new_weight, getattr(weight, "true_dtype", weight.dtype)))]
        return pairs

    def _updates(self, quality):
        wrapper = self._wrapper
        return self.new_values(quality) + [(wrapper.pruned_at_step, wrapper.pruning_step.value()),
                                           (wrapper.weights_masked, tf.constant(False))]

    def update_masks(self, quality):
        """Applies the rule once with quality ``q`` now (any step, any context).

        The current ``pruning_step`` is recorded as pruned, so the schedule does not prune
        a second time at this step inside the training call.
        """
        quality = tf.cast(quality, tf.float32)
        return _cross_replica(lambda s: _assign_everywhere(s, self._updates(quality)))

    def conditional_mask_update(self):
        """Applies the rule if the schedule prunes at the current, not yet pruned, step."""

        def maybe_update(strategy):
            wrapper = self._wrapper
            step = wrapper.pruning_step
            should_prune = tf.logical_and(wrapper.pruning_schedule(step)[0],
                                          tf.not_equal(wrapper.pruned_at_step, step))

            def update():  # q is computed here, so its ops only run at pruning steps
                quality = wrapper.pruning_schedule(step)[1]
                return _assign_everywhere(strategy, self._updates(quality))

            return tf.cond(should_prune, update, tf.no_op)

        return _cross_replica(maybe_update)

    def weight_mask_op(self):
        """``w = w * m`` for every pruned tensor."""
        return _cross_replica(lambda s: _assign_everywhere(s, self.masked_weights()))

    def masked_weights(self):
        """``(w, w * m)`` pairs of the wrapped layer."""
        return [(w, mask_rule.apply_mask(_float32_value(w), m))
                for w, m, _ in self._wrapper.pruning_vars]


@keras.utils.register_keras_serializable(package="tf_stdprune")
class PruneLowStd(PruneLowMagnitude):
    """Wraps a layer so that weights with ``|w| < q * sigma`` are pruned during training.

    Args:
      layer: a tf_keras layer with prunable tensors (see `prunable_attributes`).
      pruning_schedule: a `StdPruningSchedule` (default: ``q = 1.0`` every 100 steps).
      std_mode: ``"initial"``, ``"surviving"`` or ``"all"`` (see `mask_rule`).
      quality_multiplier: this layer's factor on ``q`` (layer-wise sensitivity).
      prune_batchnorm: whether a BatchNormalization layer's ``gamma`` is pruned.

    ``pruning_step`` counts training calls, as in tfmot: a layer shared by two branches
    is called, and advances, twice per training step.
    """

    def __init__(self, layer, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                 quality_multiplier=1.0, prune_batchnorm=True, **kwargs):
        check_keras2(layer, "The layer passed to PruneLowStd")
        if isinstance(layer, keras.Model):
            raise TypeError(
                "PruneLowStd wraps a single layer; to prune a whole model call "
                "tf_stdprune.prune_low_std(model)."
            )
        if isinstance(layer, PruneLowMagnitude):
            raise ValueError(
                f"Layer {layer.name!r} is already wrapped for pruning; use it as it is or "
                "wrap its inner layer (wrapper.layer)."
            )
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(
                f"PruneLowStd wraps a tf_keras layer, got {type(layer).__name__}: pass a layer "
                "such as tf_keras.layers.Dense(...), or a model to tf_stdprune.prune_low_std."
            )
        if std_mode not in mask_rule.STD_MODES:
            raise ValueError(f"std_mode must be one of {mask_rule.STD_MODES}, got {std_mode!r}.")
        _check_quality(quality_multiplier, f"quality_multiplier of layer {layer.name!r}")
        if pruning_schedule is None:
            pruning_schedule = StdPruningSchedule([1.0], steps_per_iteration=100)
        if not isinstance(pruning_schedule, tfmot.sparsity.keras.PruningSchedule):
            raise TypeError(
                "pruning_schedule must be a tfmot PruningSchedule such as "
                f"tf_stdprune.StdPruningSchedule, got {type(pruning_schedule).__name__}."
            )
        self._weight_attributes = prunable_attributes(layer, prune_batchnorm)
        if self._weight_attributes == []:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no prunable weights; "
                "prune_low_std(model) skips such layers, PruneLowStd cannot wrap them."
            )
        kwargs.setdefault("name", f"prune_low_std_{layer.name}")
        keras.layers.Wrapper.__init__(self, layer, **kwargs)
        self._track_trackable(layer, name="layer")
        if not hasattr(self, "_batch_input_shape") and hasattr(layer, "_batch_input_shape"):
            self._batch_input_shape = layer._batch_input_shape
        self.pruning_schedule = pruning_schedule
        self.std_mode = std_mode
        self.quality_multiplier = float(quality_multiplier)
        self.prune_batchnorm = prune_batchnorm
        self.block_size, self.block_pooling_type, self.sparsity_m_by_n = (1, 1), "AVG", None
        self.pruning_vars, self.sigmas, self.pruning_obj = [], [], None

    def build(self, input_shape):
        keras.layers.Wrapper.build(self, input_shape)
        if self._weight_attributes is None:
            self._weight_attributes = prunable_attributes(self.layer, self.prune_batchnorm)
        self.prunable_weights = [registry.get_tensor(self.layer, a) for a in self._weight_attributes]
        for path, weight in zip(self._weight_attributes, self.prunable_weights):
            shape, attribute = weight.shape, path.replace(".", "_")
            mask = self._state(f"{attribute}_mask", shape, "ones", tf.float32)
            threshold = self._state(f"{attribute}_threshold", [], "zeros", tf.float32)
            sigma = self._state(f"{attribute}_sigma", [], mask_rule.UNSET_SIGMA, tf.float32)
            self.pruning_vars.append((weight, mask, threshold))
            self.sigmas.append(sigma)
        self.pruning_step = self._state("pruning_step", [], -1, tf.int64)
        self.pruned_at_step = self._state("pruned_at_step", [], -1, tf.int64)
        # True while stored w == w * m and optimizer slots are 0 where m == 0 (all-ones masks)
        self.weights_masked = self._state("weights_masked", [], True, tf.bool)
        self.pruning_obj = StdPruning(self)

    def _state(self, name, shape, initial, dtype):
        """A non-trainable variable, kept identical on every replica."""
        initializer = (keras.initializers.Constant(initial) if isinstance(initial, (int, float))
                       else keras.initializers.get(initial))
        return self.add_weight(
            name, shape=shape, initializer=initializer, dtype=dtype, trainable=False,
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA, experimental_autocast=False,
        )

    @tf.autograph.experimental.do_not_convert  # plain TF ops: converting only costs tracing time
    def _training_update(self):
        # A message-only Assert is one op; assert_greater_equal adds a cond per layer.
        check = tf.debugging.Assert(self.pruning_step >= 0, [_STEP_ERROR])
        with tf.control_dependencies([check]):
            update = self.pruning_obj.conditional_mask_update()
        with tf.control_dependencies([update]):
            return self.pruning_step.assign_add(1)

    def call(self, inputs, training=None, **kwargs):
        if training is None:
            training = keras.backend.learning_phase()
        self.add_update(
            tf.__internal__.smart_cond.smart_cond(training, self._training_update, tf.no_op)
        )
        masked = [_masked(weight, mask, self.weights_masked) for weight, mask, _ in self.pruning_vars]
        with substituted(self.layer, self._weight_attributes, masked):
            if "training" in inspect.signature(self.layer.call).parameters:
                return self.layer.call(inputs, training=training, **kwargs)
            return self.layer.call(inputs, **kwargs)

    def mask_optimizer_slots(self, optimizer):
        """Sets ``w = w * m`` and ``s = s * m`` for every optimizer slot ``s`` of ``w``.

        From then on the optimizer leaves pruned weights at 0, so ``weights_masked`` is set.
        """

        def updates():
            slots = [(slot, slot * tf.cast(mask, slot.dtype))
                     for weight, mask, _ in self.pruning_vars
                     for slot in optimizer_slots(optimizer, weight)]
            return slots + self.pruning_obj.masked_weights() + [
                (self.weights_masked, tf.constant(True))]

        return _cross_replica(lambda strategy: _assign_everywhere(strategy, updates()))

    def get_config(self):
        config = keras.layers.Wrapper.get_config(self)
        config.update({
            "pruning_schedule": self.pruning_schedule.get_config(),
            "std_mode": self.std_mode,
            "quality_multiplier": self.quality_multiplier,
            "prune_batchnorm": self.prune_batchnorm,
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["pruning_schedule"] = deserialize_schedule(config["pruning_schedule"])
        config["layer"] = keras.layers.deserialize(config["layer"])
        return cls(**config)


def deserialize_schedule(config):
    """A pruning schedule from its ``get_config()`` (``{"class_name", "config"}``, as tfmot's)."""
    return keras.utils.deserialize_keras_object(
        config,
        custom_objects={
            "StdPruningSchedule": StdPruningSchedule,
            "ConstantSparsity": tfmot.sparsity.keras.ConstantSparsity,
            "PolynomialDecay": tfmot.sparsity.keras.PolynomialDecay,
        },
    )


def optimizer_slots(optimizer, variable):
    """The optimizer's state variables shaped like ``variable`` (momentum, Adam m and v).

    Legacy optimizers expose them through ``get_slot``; tf_keras's current optimizers
    name them ``"<slot>/<variable's shared name>"``.
    """
    if hasattr(optimizer, "get_slot_names"):
        return [optimizer.get_slot(variable, name) for name in optimizer.get_slot_names()
                if _has_slot(optimizer, variable, name)]
    inner = getattr(variable, "_variable", variable)
    suffix = "/" + inner._shared_name
    return [v for v in optimizer.variables
            if v.shape == variable.shape and v._shared_name.endswith(suffix)]


def _has_slot(optimizer, variable, name):
    try:
        optimizer.get_slot(variable, name)
        return True
    except KeyError:
        return False

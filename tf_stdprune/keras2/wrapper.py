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
overwrite in place, where tfmot's allocates a new buffer for every weight at every step
(benchmarks/overhead.py compares the two). Without our callback (tfmot's `UpdatePruningStep`, a custom loop that never
calls `mask_optimizer_slots`) it stays cleared after the first pruning and every step
multiplies.
Assigning a kernel directly (``kernel.assign(dense)``) breaks it: call
``wrapper.pruning_obj.weight_mask_op()`` afterwards (tfmot's `UpdatePruningStep` does at
each epoch's end, ours also at ``on_train_begin``).

It subclasses tfmot's `PruneLowMagnitude` and keeps its protocol (``pruning_step``,
``pruning_vars`` of ``(weight, mask, threshold)``, ``pruning_obj.weight_mask_op()`` and
``conditional_mask_update()``, ``layer.get_prunable_weights()``), so tfmot's
`UpdatePruningStep`, `PruningSummaries`, `strip_pruning` and `collect_prunable_layers` work
on it unchanged. The schedule is asked at tfmot's step numbers (the k-th training call is
step k), so a tfmot schedule fires at the same calls under both wrappers.

A mask update on a tensor whose weights or sigma are NaN or infinite assigns nothing
(the rule would prune a NaN weight, ``|NaN| >= t`` being false): called eagerly it raises
`tf_stdprune.NonFiniteError`; inside ``fit``, a ``tf.function`` or XLA, where raising is
not possible, `UpdatePruningStep` raises it after the batch, seeing the due update missing.
Each layer decides in its own training call, so finite layers prune as usual.

Where it differs from tfmot by design: stored weights are exactly sparse after every
batch, so any checkpoint is; subclasses of supported layers are pruned like their parent
class; BatchNormalization ``gamma`` and depthwise kernels are pruned too; a layer with
kernels that nobody knows how to prune raises instead of staying dense.
"""
import contextlib
import inspect

import tensorflow as tf

from tf_stdprune import mask_rule, registry
from tf_stdprune.registry import RegistryWeights, prunable_attributes  # noqa: F401 (public here too)
from tf_stdprune.keras2.engine import PruneLowMagnitude, check_keras2, keras, tfmot
from tf_stdprune.mask_rule import check_block_arguments  # noqa: F401 (public here too)
from tf_stdprune.schedule import StdPruningSchedule, check_quality
from tf_stdprune.validate import check_finite

# Measured with benchmarks/std_mode.py: at the same q, "initial" gives the most sparsity
# for the least accuracy loss; "surviving" compounds from step to step (collapses at the
# reference experiment's q range) and "all" prunes less and no better. See the README.
DEFAULT_STD_MODE = "initial"
# The schedule is plain Python: make it a tfmot schedule and a tf_keras serializable here.
tfmot.sparsity.keras.PruningSchedule.register(StdPruningSchedule)
keras.utils.register_keras_serializable(package="tf_stdprune")(StdPruningSchedule)

_STEP_ERROR = (
    "PruneLowStd needs the UpdatePruningStep callback during training: add "
    "tf_stdprune.UpdatePruningStep() to model.fit's callbacks (or call its "
    "on_train_begin/on_train_batch_end in a custom loop)."
)


def check_prunable(layer):
    """Raises ValueError for a layer that pruning would otherwise leave dense silently.

    That is a layer tfmot refuses too (ConvLSTM), and a layer holding trainable kernels
    that the registry does not know and that does not define ``get_prunable_weights``.
    """
    own = getattr(layer, "get_prunable_weights", None)
    if own is not None and not isinstance(own, RegistryWeights):
        return
    if registry.refused(layer):
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) is not supported for pruning (nor "
            f"by tfmot): pass skip=[{layer.name!r}] to prune_low_std to keep it dense."
        )
    unknown = registry.unknown_kernels(layer)
    if unknown:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) holds trainable kernels that "
            f"tf_stdprune does not know how to prune ({[w.name for w in unknown]}). Either "
            "make it a tfmot PrunableLayer (define get_prunable_weights() returning the "
            "kernels to prune), or keep it dense with prune_low_std(..., skip=["
            f"{layer.name!r}])."
        )


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

        ``q_layer = q * layer_quality``; per tensor ``threshold = q_layer * sigma``,
        ``m_new = m AND (|w| >= threshold)`` (on pooled blocks with ``block_size``),
        ``w_new = w * m_new``. Under a tfmot sparsity schedule ``quality`` is its target
        sparsity instead, reached by `mask_rule.sparsity_prune`.
        """
        wrapper = self._wrapper
        pairs = []
        for (weight, mask, threshold), sigma in zip(wrapper.pruning_vars, wrapper.sigmas):
            # stop_gradient: an eager GradientTape (run_eagerly=True) must not record the rule
            new_mask, new_threshold, new_sigma, new_weight = self._rule(
                tf.stop_gradient(_float32_value(weight)), tf.convert_to_tensor(mask), quality,
                tf.convert_to_tensor(sigma))
            pairs += [(mask, new_mask), (threshold, new_threshold), (sigma, new_sigma),
                      (weight, tf.cast(new_weight, getattr(weight, "true_dtype", weight.dtype)))]
        return pairs

    def _rule(self, weight, mask, quality, sigma):
        wrapper = self._wrapper
        if not isinstance(wrapper.pruning_schedule, StdPruningSchedule):
            if wrapper.sparsity_m_by_n is not None:
                mask = mask_rule.m_by_n_mask(weight, mask, wrapper.sparsity_m_by_n)
            new_mask, threshold, new_weight = mask_rule.sparsity_prune(weight, mask, quality)
            return new_mask, threshold, sigma, new_weight
        quality = quality * wrapper.layer_quality
        if wrapper.sparsity_m_by_n is not None:
            return mask_rule.std_prune(weight, mask, quality, wrapper.std_mode, sigma,
                                       wrapper.sparsity_m_by_n)
        if tuple(wrapper.block_size) != (1, 1):
            return mask_rule.std_prune_blocks(weight, mask, quality, wrapper.std_mode, sigma,
                                              tuple(wrapper.block_size), wrapper.block_pooling_type)
        return mask_rule.std_prune(weight, mask, quality, wrapper.std_mode, sigma)

    def _updates(self, quality, step):
        wrapper = self._wrapper
        quality = tf.cast(quality, tf.float32)
        check = tf.debugging.Assert(tf.math.is_finite(quality), [
            f"{wrapper.name}: the pruning schedule returned a non-finite q (or sparsity):",
            quality, "; a quality callable must return finite numbers >= 0."])
        with tf.control_dependencies([check]):
            quality = tf.identity(quality)
        return self.new_values(quality) + [(wrapper.pruned_at_step, step),
                                           (wrapper.weights_masked, tf.constant(False))]

    def update_masks(self, quality):
        """Applies the rule once with quality ``q`` now (any step, any context).

        The step of the next training call (``pruning_step + 1``) is recorded as pruned,
        so the schedule does not prune a second time at that step inside the call.
        """
        step = lambda: self._wrapper.pruning_step.value() + 1  # noqa: E731
        return _cross_replica(lambda s: self._assign_if_finite(s, quality, step()))

    def _assign_if_finite(self, strategy, quality, step):
        """Assigns one application of the rule unless a weight, a stored or a new sigma is
        NaN or infinite. Eagerly that raises `NonFiniteError` (naming layer, tensor, step);
        in a graph (fit, tf.function, XLA, any strategy) nothing is assigned, and
        `UpdatePruningStep` raises after the batch, finding the masks unchanged."""
        wrapper = self._wrapper
        pairs = self._updates(quality, step)
        sigma_ids = {id(sigma) for sigma in wrapper.sigmas}
        new_sigmas = [value for variable, value in pairs if id(variable) in sigma_ids]
        if tf.executing_eagerly():
            wrapper.check_finite(int(step))
            check_finite(wrapper.name, int(step), [
                (f"{path} (sigma)", sigma.numpy())
                for path, sigma in zip(wrapper.weight_paths, new_sigmas)])
            return _assign_everywhere(strategy, pairs)
        checked = [_float32_value(w) for w, _, _ in wrapper.pruning_vars] + new_sigmas + [
            tf.convert_to_tensor(sigma) for sigma in wrapper.sigmas]
        finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(x)) for x in checked]))
        return tf.cond(finite, lambda: _assign_everywhere(strategy, pairs), tf.no_op)

    def conditional_mask_update(self):
        """Applies the rule if the schedule prunes at the current, not yet pruned, step."""

        def maybe_update(strategy):
            wrapper = self._wrapper
            step = wrapper.pruning_step.value()
            should_prune = tf.logical_and(wrapper.pruning_schedule(step)[0],
                                          tf.not_equal(wrapper.pruned_at_step, step))

            def update():  # q is computed here, so its ops only run at pruning steps
                quality = wrapper.pruning_schedule(step)[1]
                return self._assign_if_finite(strategy, quality, step)

            return tf.cond(should_prune, update, tf.no_op)

        return _cross_replica(maybe_update)

    def weight_mask_op(self):
        """``w = w * m`` for every pruned tensor."""
        return _cross_replica(lambda s: _assign_everywhere(s, self.masked_weights()))

    def masked_weights(self):
        """``(w, w * m)`` pairs of the wrapped layer."""
        return [(w, mask_rule.apply_mask(_float32_value(w), m))
                for w, m, _ in self._wrapper.pruning_vars]


def check_flag(value, name):
    """Returns ``value`` if it is a bool; raises TypeError otherwise (``'no'`` is not False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return value


def check_schedule(schedule):
    """Returns ``schedule`` (default ``q = 1.0`` every 100 steps) if it is a pruning schedule.

    A tfmot schedule (``ConstantSparsity``, ``PolynomialDecay``) is honoured by its meaning,
    a target sparsity: see `mask_rule.sparsity_prune`.
    """
    if schedule is None:
        return StdPruningSchedule([1.0], steps_per_iteration=100)
    if not isinstance(schedule, tfmot.sparsity.keras.PruningSchedule):
        raise TypeError(
            "pruning_schedule must be a tf_stdprune.StdPruningSchedule (or a tfmot sparsity "
            f"schedule, honoured as a target sparsity), got {type(schedule).__name__}."
        )
    return schedule


def check_wrappable(layer):
    """Raises unless ``layer`` is a single tf_keras layer that is not yet wrapped."""
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


def build_attention_projections(layer):
    """Builds a MultiHeadAttention's projection layers if they are not built yet.

    tf_keras creates them from the shapes of its first call (or of its saved config) but
    builds their kernels only when they are called; a layer restored from a file has not
    been. One call on zeros of those shapes (1 for unknown sizes) builds them.
    """
    if registry.layer_kind(layer) != "attention":
        return
    if not getattr(layer, "_built_from_signature", False):
        raise ValueError(
            f"MultiHeadAttention {layer.name!r} has not been called yet, so its projections do "
            "not exist: call it once on its inputs (as a model does) before wrapping it."
        )
    if all(registry.resolve(layer, p)[0].built for p in registry.TABLE["MultiHeadAttention"].attributes):
        return
    with tf.init_scope():
        query, value, key = [tf.zeros([d or 1 for d in shape]) for shape in (
            layer._query_shape, layer._value_shape, layer._key_shape)]
        layer(query, value, key=key)


@keras.utils.register_keras_serializable(package="tf_stdprune")
class PruneLowStd(PruneLowMagnitude):
    """Wraps a layer so that weights with ``|w| < q * sigma`` are pruned during training.

    Args:
      layer: a tf_keras layer with prunable tensors (see `prunable_attributes`).
      pruning_schedule: a `StdPruningSchedule` (default: ``q = 1.0`` every 100 steps), or a
        tfmot sparsity schedule, honoured by its meaning (each tensor pruned to the target
        sparsity by magnitude) at exactly the steps tfmot's wrapper would prune.
      std_mode: ``"initial"``, ``"surviving"`` or ``"all"`` (see `mask_rule`).
      layer_quality: this layer's factor on ``q`` (layer-wise sensitivity).
      prune_batchnorm: whether a BatchNormalization layer's ``gamma`` is pruned.
      block_size: ``(rows, columns)``; other than ``(1, 1)`` the rule prunes whole blocks of
        a 2-D kernel on pooled magnitudes (`mask_rule.std_prune_blocks`).
      block_pooling_type: ``"AVG"`` or ``"MAX"``, the pooling of ``|w|`` over a block.
      sparsity_m_by_n: ``(m, n)``: at least ``m`` zeros in every ``n`` consecutive weights
        along the input dimension (Dense and Conv2D kernels), chosen before the std rule
        (order in `mask_rule`); None (default) for none.
      **kwargs: tf_keras layer arguments (``name``, ...); an unknown one raises TypeError.

    ``pruning_step`` counts training calls, as in tfmot: a layer shared by two branches
    is called, and advances, twice per training step. The schedule sees tfmot's step
    numbers (see `StdPruningSchedule`).
    """

    def __init__(self, layer, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                 layer_quality=1.0, prune_batchnorm=True, block_size=(1, 1),
                 block_pooling_type="AVG", sparsity_m_by_n=None, **kwargs):
        check_wrappable(layer)
        if std_mode not in mask_rule.STD_MODES:
            raise ValueError(f"std_mode must be one of {mask_rule.STD_MODES}, got {std_mode!r}.")
        check_quality(layer_quality, f"layer_quality of layer {layer.name!r}")
        check_flag(prune_batchnorm, "prune_batchnorm")
        block_size = mask_rule.check_block_arguments(block_size, block_pooling_type,
                                                  sparsity_m_by_n)
        pruning_schedule = check_schedule(pruning_schedule)
        check_prunable(layer)
        self._weight_attributes = prunable_attributes(layer, prune_batchnorm)
        if self._weight_attributes == []:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no prunable weights; "
                "prune_low_std(model) skips such layers, PruneLowStd cannot wrap them."
            )
        kwargs.setdefault("name", f"prune_low_std_{layer.name}")
        # tfmot's own __init__ accepts only the layers of its registry (exact classes) and
        # patches them; ours takes the registry's layers and subclasses, so it is skipped.
        keras.layers.Wrapper.__init__(self, layer, **kwargs)
        self._set_tfmot_attributes(layer, pruning_schedule, block_size, block_pooling_type)
        self.sparsity_m_by_n = mask_rule.check_m_by_n(sparsity_m_by_n)
        self.std_mode = std_mode
        self.layer_quality = float(layer_quality)
        self.prune_batchnorm = prune_batchnorm

    def _set_tfmot_attributes(self, layer, pruning_schedule, block_size, block_pooling_type):
        """The attributes tfmot's `PruneLowMagnitude` methods, callbacks and `strip_pruning`
        read, set here because its ``__init__`` is not run."""
        self._track_trackable(layer, name="layer")
        if not hasattr(self, "_batch_input_shape") and hasattr(layer, "_batch_input_shape"):
            self._batch_input_shape = layer._batch_input_shape
        self.pruning_schedule = pruning_schedule
        self.block_size, self.block_pooling_type = block_size, block_pooling_type
        self.sparsity_m_by_n = None
        self.pruning_vars, self.sigmas, self.pruning_obj = [], [], None

    @property
    def quality_multiplier(self):
        """The former name of `layer_quality`."""
        return self.layer_quality

    def build(self, input_shape):
        keras.layers.Wrapper.build(self, input_shape)
        build_attention_projections(self.layer)
        check_prunable(self.layer)  # a layer built only now: its kernels exist now
        if self._weight_attributes is None:
            self._weight_attributes = prunable_attributes(self.layer, self.prune_batchnorm)
        if not self._weight_attributes:
            raise ValueError(f"Layer {self.layer.name!r}: get_prunable_weights() returned nothing.")
        self.prunable_weights = [registry.get_tensor(self.layer, a) for a in self._weight_attributes]
        mask_rule.check_block_ranks(self.layer.name, self.prunable_weights, self.block_size)
        mask_rule.check_m_by_n_ranks(self.layer.name, self.prunable_weights,
                                      self.sparsity_m_by_n)
        if getattr(self.layer, "get_prunable_weights", None) is None:
            object.__setattr__(self.layer, "get_prunable_weights",
                               RegistryWeights(self.layer, self._weight_attributes))
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
        # tfmot's numbering: the step advances first, the schedule then sees the new value
        check = tf.debugging.Assert(self.pruning_step >= 0, [_STEP_ERROR])
        with tf.control_dependencies([check]):
            advance = self.pruning_step.assign_add(1)
        with tf.control_dependencies([advance]):
            return self.pruning_obj.conditional_mask_update()

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

    @property
    def weight_paths(self):
        """The attribute paths of the pruned tensors (see `registry`), in `pruning_vars` order."""
        return list(self._weight_attributes)

    def check_finite(self, step=None):
        """Raises `NonFiniteError` if a pruned tensor or its stored sigma holds NaN or
        infinity (``step``: the step named in the message); reads the variables eagerly."""
        check_finite(self.name, step, [
            (name, _float32_value(variable).numpy())
            for path, (weight, _, _), sigma in zip(self.weight_paths, self.pruning_vars, self.sigmas)
            for name, variable in ((path, weight), (f"{path} (stored sigma)", sigma))])

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
            "layer_quality": self.layer_quality,
            "prune_batchnorm": self.prune_batchnorm,
            "block_size": list(self.block_size),
            "block_pooling_type": self.block_pooling_type,
            "sparsity_m_by_n": None if self.sparsity_m_by_n is None else list(self.sparsity_m_by_n),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if "quality_multiplier" in config:  # the former name, in models saved before
            config["layer_quality"] = config.pop("quality_multiplier")
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

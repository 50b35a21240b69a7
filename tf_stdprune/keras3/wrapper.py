"""`PruneLowStd` for Keras 3: the q·σ rule on every backend, written with ``keras.ops``.

For every prunable tensor ``w`` of the wrapped layer (see `registry`) the wrapper keeps a
mask ``m`` (1 = kept), the last ``threshold`` and ``sigma`` as non-trainable variables.
The layer computes with ``w * m``, so the gradient that reaches the optimizer is

    dL/dw = (dL/d(w*m)) * m,

exactly 0 at pruned positions, on every backend and in any training loop, and before
any gradient clipping (``clipnorm``/``global_clipnorm`` see the masked gradient).

Masks change only in `update_masks`, which the `UpdatePruningStep` callback calls
between two training steps when the schedule prunes; it applies `mask_rule.std_rule`
(``m_new = m AND |w| >= q * layer_quality * sigma``), sets ``w = w * m_new`` and
multiplies every optimizer slot of ``w`` (momentum, Adam's m and v, ...) by ``m_new``.
From then on gradient, L2 term, momentum and decoupled weight decay are 0 at pruned
positions, so stored pruned weights stay exactly 0.0 through every step: a checkpoint or
a ``.keras`` file is exactly sparse at any batch.

The wrapped layer is called as Keras would call it bare (`SubstitutingWrapper`, shared
with `tf_stdprune.keras3.quantize.QuantizeWeights`): it gets the ``training`` mode and the input's
mask, so a wrapped BatchNormalization trains on batch statistics and its moving
statistics follow them (recalibration too).
The train step itself holds no pruning logic: one elementwise product per tensor, as
in tfmot's forward pass. Nothing in this module imports TensorFlow, tf_keras or tfmot.
"""
import contextlib
import inspect

import keras
from keras import ops

from tf_stdprune import mask_rule, registry
from tf_stdprune.schedule import StdPruningSchedule
from tf_stdprune.validate import check_finite, check_quality

keras.saving.register_keras_serializable(package="tf_stdprune")(StdPruningSchedule)

DEFAULT_STD_MODE = "initial"


def default_schedule():
    """``q = 1.0`` once every 100 steps (the tf_keras path's default too)."""
    return StdPruningSchedule([1.0], steps_per_iteration=100)


@contextlib.contextmanager
def substituted(layer, paths, tensors):
    """Sets each attribute path of ``layer`` to a tensor (no Keras tracking); restores on exit."""
    places = [registry.resolve(layer, path) for path in paths]
    originals = [getattr(owner, attribute) for owner, attribute in places]
    for (owner, attribute), tensor in zip(places, tensors):
        object.__setattr__(owner, attribute, tensor)
    try:
        yield
    finally:
        for (owner, attribute), original in zip(places, originals):
            object.__setattr__(owner, attribute, original)


class SubstitutingWrapper(keras.layers.Wrapper):
    """Calls its layer as Keras calls the bare layer, with some of its tensors replaced.

    A subclass sets ``paths`` (the layer's attribute paths, see `registry`) and defines
    ``substitutes()``, the tensors the layer computes with in their place. ``training``
    and ``mask``, as Keras resolves them for the wrapper (the argument given, else the
    enclosing call's mode; the input's Keras mask), are handed on when the layer's
    ``call`` takes them, and the layer's output mask is the wrapper's: a wrapped
    BatchNormalization trains on the batch's statistics and updates its moving ones, and
    the dropout of a wrapped LSTM or MultiHeadAttention is active in training only.
    """

    def __init__(self, layer, **kwargs):
        super().__init__(layer, **kwargs)
        self.supports_masking = layer.supports_masking
        # what the layer's ``call`` takes, read once rather than at every call
        self._call_parameters = frozenset(inspect.signature(layer.call).parameters)

    def substitutes(self):
        raise NotImplementedError("A SubstitutingWrapper defines substitutes().")

    def call(self, inputs, *args, training=None, mask=None, **kwargs):
        kwargs = self._layer_arguments(kwargs, training=training, mask=mask)
        with substituted(self.layer, self.paths, self.substitutes()):
            return self.layer.call(inputs, *args, **kwargs)

    def _layer_arguments(self, kwargs, **context):
        """``kwargs`` plus each of ``context`` that is set and that the layer's ``call``
        takes: what Keras would give the bare layer."""
        return dict(kwargs, **{k: v for k, v in context.items()
                               if v is not None and k in self._call_parameters})

    def compute_mask(self, inputs, previous_mask=None):
        return self.layer.compute_mask(inputs, previous_mask)

    def compute_output_spec(self, *args, training=None, mask=None, **kwargs):
        return self.layer.compute_output_spec(
            *args, **self._layer_arguments(kwargs, training=training, mask=mask))


MASK_DTYPE = "uint8"  # a mask costs a quarter of a float32 tensor's bytes


class MaskedTensors:
    """The pruning state of one layer's tensors and the rule applied to it, shared by the
    `PruneLowStd` wrapper and by pruning attached in place (`tf_stdprune.keras3.nested`).

    A user sets ``layer`` (the layer holding the tensors), ``paths`` (their attribute
    paths), ``pruning_schedule``, ``std_mode``, ``layer_quality`` and, unless the class
    defaults serve, ``block_size``, ``block_pooling_type`` and ``sparsity_m_by_n``, then calls
    `add_pruning_variables` once the layer is built: per tensor a ``uint8`` mask
    (1 = kept), the last ``threshold`` and ``sigma``, all non-trainable.
    """

    block_size, block_pooling_type, sparsity_m_by_n = (1, 1), "AVG", None

    def add_pruning_variables(self, owner, layer):
        """Creates the masks, thresholds and sigmas as ``owner``'s weights, each mask
        distributed as its tensor is (`keras.distribution`: the same layout)."""
        self.masks, self.thresholds, self.sigmas = [], [], []
        for path in self.paths:
            weight = registry.get_tensor(layer, path)
            name = path.replace(".", "_").lstrip("_")
            self.masks.append(owner.add_weight(name=f"{name}_mask", shape=weight.shape,
                                               initializer="ones", dtype=MASK_DTYPE,
                                               trainable=False))
            layout = variable_layout(weight, f"{self.name}: {path}")
            if layout is not None:
                self.masks[-1]._layout = layout
                self.masks[-1].assign(self.masks[-1].value)  # placed as the layout says
                check_placed_alike(weight, self.masks[-1], f"{self.name}: {path}")
            self.thresholds.append(owner.add_weight(name=f"{name}_threshold", shape=(),
                                                    initializer="zeros", trainable=False))
            self.sigmas.append(owner.add_weight(
                name=f"{name}_sigma", shape=(), trainable=False,
                initializer=keras.initializers.Constant(mask_rule.UNSET_SIGMA)))

    @property
    def pruning_variables(self):
        """Every variable of the pruning state: masks, thresholds, sigmas."""
        return [*self.masks, *self.thresholds, *self.sigmas]

    @property
    def pruned_weights(self):
        """The layer's prunable variables, in `paths` order."""
        return [registry.get_tensor(self.layer, path) for path in self.paths]

    def substitutes(self):
        """``w * m`` for each pruned tensor: what the layer computes with."""
        return [ops.multiply(w, ops.cast(m, w.dtype))
                for w, m in zip(self.pruned_weights, self.masks)]

    def update_masks(self, quality, optimizer=None, step=None):
        """Applies the rule once with quality ``q``, now (eagerly, between steps).

        Per tensor: ``threshold = q * layer_quality * sigma``, ``m = m AND |w| >= threshold``,
        ``w = w * m``; with ``optimizer``, each of its slots ``s`` of ``w`` becomes ``s * m``.
        If a weight or a sigma (stored or new) is NaN or infinite, raises
        `tf_stdprune.NonFiniteError` naming the layer, the tensor and ``step`` before any
        mask, weight or slot changes.
        """
        self.check_finite(step)
        q = float(quality) * self.layer_quality
        rule_ops = mask_rule.keras3_ops()
        results = []
        for weight, mask, sigma in zip(self.pruned_weights, self.masks, self.sigmas):
            mask_value = ops.cast(mask.value, "float32")
            if self.block_size != (1, 1):
                results.append(mask_rule.std_prune_blocks(
                    weight.value, mask_value, q, self.std_mode, sigma.value, self.block_size,
                    self.block_pooling_type, rule_ops))
            else:
                results.append(mask_rule.std_rule(weight.value, mask_value, q, self.std_mode,
                                                  sigma.value, rule_ops, self.sparsity_m_by_n))
        check_finite(self.name, step, [(f"{path} (sigma)", ops.convert_to_numpy(new_sigma))
                                       for path, (_, _, new_sigma, _) in zip(self.paths, results)])
        for weight, mask, threshold, sigma, (new_mask, new_threshold, new_sigma, new_weight) in zip(
                self.pruned_weights, self.masks, self.thresholds, self.sigmas, results):
            mask.assign(ops.cast(new_mask, mask.dtype))
            threshold.assign(new_threshold)
            sigma.assign(new_sigma)
            weight.assign(ops.cast(new_weight, weight.dtype))
        if optimizer is not None:
            self.apply_masks(optimizer)

    def check_finite(self, step=None):
        """Raises `tf_stdprune.NonFiniteError` if a pruned tensor or its stored sigma holds
        NaN or infinity (``step``: the step named in the message)."""
        check_finite(self.name, step, [
            (name, ops.convert_to_numpy(variable.value))
            for path, weight, sigma in zip(self.paths, self.pruned_weights, self.sigmas)
            for name, variable in ((path, weight), (f"{path} (stored sigma)", sigma))])

    def apply_masks(self, optimizer=None):
        """``w = w * m``, and with ``optimizer`` ``s = s * m`` for each of its slots ``s``."""
        rule_ops = mask_rule.keras3_ops()
        for weight, mask in zip(self.pruned_weights, self.masks):
            weight.assign(mask_rule.apply_mask(weight.value, mask.value, rule_ops))
            for slot in optimizer_slots(optimizer, weight) if optimizer is not None else []:
                slot.assign(slot * ops.cast(mask, slot.dtype))


LAYOUT_FIX = (
    "Masks are placed like their tensors, so the model must be created (or loaded) after "
    "keras.distribution.set_distribution(...) and pruned under the same distribution; or "
    "pass skip=[...] naming this layer to leave it dense.")


def variable_layout(variable, where):
    """The layout under which the active `keras.distribution` placed ``variable`` (None
    without a distribution). Raises ValueError naming ``where`` and the fix when, on JAX,
    ``variable`` was created outside the distribution (it holds no layout of its own), so
    that the distribution would place its mask differently from it."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return None
    if keras.backend.backend() == "jax" and getattr(variable, "_layout", None) is None:
        raise ValueError(
            f"{where}: the tensor was created before {type(distribution).__name__} was set "
            f"(it has no layout), so its mask cannot follow it. {LAYOUT_FIX}")
    return distribution.get_variable_layout(variable)


def check_placed_alike(variable, mask, where):
    """Raises ValueError naming ``where`` unless ``mask`` is sharded over the devices as
    ``variable`` is (JAX arrays; other backends have nothing to compare)."""
    placed, mask_placed = (getattr(v.value, "sharding", None) for v in (variable, mask))
    if placed is None or mask_placed is None:
        return
    if not placed.is_equivalent_to(mask_placed, len(variable.shape)):
        raise ValueError(f"{where}: the tensor is placed as {placed} but its mask as "
                         f"{mask_placed}; the mask cannot follow it. {LAYOUT_FIX}")


@keras.saving.register_keras_serializable(package="tf_stdprune")
class PruneLowStd(MaskedTensors, SubstitutingWrapper):
    """Wraps a Keras 3 layer so that weights with ``|w| < q * layer_quality * sigma`` are
    pruned when the schedule says so (module docstring).

    Args:
      layer: a Keras 3 layer that `registry` names (Dense, Conv*, Embedding, LSTM, ...).
      pruning_schedule: a `StdPruningSchedule` (default: ``q = 1.0`` every 100 steps).
      std_mode: ``"initial"``, ``"surviving"`` or ``"all"`` (see `mask_rule`).
      layer_quality: this layer's factor on ``q``.
      prune_batchnorm: whether BatchNormalization's ``gamma`` is pruned.
      sparsity_m_by_n: ``(m, n)``: at least ``m`` zeros in every ``n`` consecutive
        weights along the input dimension of Dense and Conv2D kernels, chosen before the
        std rule (order and sigma in `mask_rule`); None (default) for none.
      block_size, block_pooling_type: other than ``(1, 1)``, the rule keeps or prunes
        whole blocks of a 2-D kernel by their pooled ``|w|`` (`mask_rule.std_prune_blocks`).

    Examples:
      >>> wrapped = PruneLowStd(keras.layers.Dense(10))
      >>> y = wrapped(keras.ops.ones((2, 4)))
      >>> wrapped.update_masks(1.0)   # what UpdatePruningStep does at a pruning step
    """

    def __init__(self, layer, pruning_schedule=None, std_mode=DEFAULT_STD_MODE,
                 layer_quality=1.0, prune_batchnorm=True, sparsity_m_by_n=None,
                 block_size=(1, 1), block_pooling_type="AVG", **kwargs):
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.Model):
            raise TypeError(
                f"PruneLowStd wraps one Keras 3 layer, got {type(layer).__name__}; to prune "
                "a whole model call tf_stdprune.prune_low_std(model)."
            )
        if isinstance(layer, PruneLowStd):
            raise ValueError(f"Layer {layer.name!r} is already wrapped for pruning; wrap its "
                             "inner layer (wrapper.layer) or use it as it is.")
        if std_mode not in mask_rule.STD_MODES:
            raise ValueError(f"std_mode must be one of {mask_rule.STD_MODES}, got {std_mode!r}.")
        pruning_schedule = pruning_schedule or default_schedule()
        if not isinstance(pruning_schedule, StdPruningSchedule):
            raise TypeError(
                "On Keras 3, pruning_schedule must be a tf_stdprune.StdPruningSchedule, got "
                f"{type(pruning_schedule).__name__}."
            )
        self.paths = registry.prunable_attributes(layer, prune_batchnorm)
        if not self.paths:
            raise ValueError(
                f"Layer {layer.name!r} ({type(layer).__name__}) has no tensor that "
                "tf_stdprune prunes; prune_low_std(model) leaves such layers unwrapped."
            )
        kwargs.setdefault("name", f"prune_low_std_{layer.name}")
        super().__init__(layer, **kwargs)
        self.pruning_schedule = pruning_schedule
        self.std_mode = std_mode
        self.layer_quality = check_quality(layer_quality, f"layer_quality of {layer.name!r}")
        self.prune_batchnorm = bool(prune_batchnorm)
        self.sparsity_m_by_n = mask_rule.check_m_by_n(sparsity_m_by_n)
        self.block_size = mask_rule.check_block_arguments(block_size, block_pooling_type,
                                                          sparsity_m_by_n)
        self.block_pooling_type = block_pooling_type

    def build(self, input_shape=None):
        super().build(input_shape)
        mask_rule.check_m_by_n_ranks(self.layer.name, self.pruned_weights, self.sparsity_m_by_n)
        mask_rule.check_block_ranks(self.layer.name, self.pruned_weights, self.block_size)
        self.add_pruning_variables(self, self.layer)

    def get_config(self):
        return {
            **super().get_config(),
            "pruning_schedule": self.pruning_schedule.get_config(),
            "std_mode": self.std_mode,
            "layer_quality": self.layer_quality,
            "prune_batchnorm": self.prune_batchnorm,
            "sparsity_m_by_n": None if self.sparsity_m_by_n is None else list(self.sparsity_m_by_n),
            "block_size": list(self.block_size),
            "block_pooling_type": self.block_pooling_type,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["pruning_schedule"] = StdPruningSchedule.from_config(config["pruning_schedule"])
        return super().from_config(config, custom_objects)


def optimizer_slots(optimizer, variable):
    """The Keras 3 optimizer's state variables that belong to ``variable``.

    Keras 3 optimizers keep each kind of slot (SGD's momentums, Adam's m and v, ...) as a
    list aligned with the variables they were built for; every such list's entry for
    ``variable`` is returned. Empty before the optimizer is built.
    """
    trainable = getattr(optimizer, "_trainable_variables", None) or []
    index = next((i for i, v in enumerate(trainable) if v is variable), None)
    if index is None:
        return []
    slots = []
    for value in vars(optimizer).values():
        if isinstance(value, list) and len(value) == len(trainable) and value is not trainable:
            candidate = value[index]
            if isinstance(candidate, keras.Variable) and candidate.shape == variable.shape:
                slots.append(candidate)
    return slots

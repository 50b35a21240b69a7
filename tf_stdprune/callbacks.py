"""Keras callbacks that drive pruning inside ``model.fit``: pruning step, learning rate."""
import numbers

import tensorflow as tf

from tf_stdprune._keras import keras, tfmot
from tf_stdprune.dropout import dropout_sources, rescale_dropout, restore_dropout
from tf_stdprune.validate import check_int, check_positive
from tf_stdprune.wrapper import PruneLowStd

PruningSummaries = tfmot.sparsity.keras.PruningSummaries


class UpdatePruningStep(tfmot.sparsity.keras.UpdatePruningStep):
    """tfmot's `UpdatePruningStep`, plus optimizer-slot masking after each pruning step.

    At the end of a batch in which a `PruneLowStd` layer's masks changed (its
    ``weights_masked`` flag was cleared, see `PruneLowStd`), the optimizer slots of its
    pruned tensors are multiplied by the mask and the weights re-masked: ``s = s * m``,
    ``w = w * m``, and the flag is set again. The pruning batch's own update used the old
    momentum; after this nothing moves a pruned weight again. With ``steps_per_execution
    > 1`` it runs at the end of the execution that contains the pruning step.

    The flags are read (one small synchronising call) only where masks can have changed:
    at a batch whose steps include a step at which a layer's `StdPruningSchedule` prunes
    (``should_prune``, one training call per step assumed), at the first batch of every
    epoch (which also re-reads the steps, so a layer called twice per step is caught up
    there), and at every batch for a layer whose schedule cannot say in advance (a tfmot
    sparsity schedule). Other batches cost no read, so Keras's check of slow batch hooks
    stays quiet.

    At the start of training it does the same for every `PruneLowStd` layer, whatever
    happened to the weights before ``fit`` (a direct assignment, tfmot's callback): each
    then skips its forward ``w * m`` until its masks change again.
    """

    def __init__(self):
        super().__init__()
        # It never reads the logs: Keras may then hand over its tensors instead of
        # converting them to numpy at every batch (which waits for the step).
        self._supports_tf_logs = True

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._std_layers = [l for l in self.prunable_layers if isinstance(l, PruneLowStd)]
        self._last_batch = None  # also for custom loops, which may call no epoch hook
        if not self._std_layers:
            return
        for layer in self._std_layers:
            layer.mask_optimizer_slots(self.model.optimizer)
        flags = [l.weights_masked for l in self._std_layers]
        steps = [l.pruning_step for l in self._std_layers]
        self._read_state = tf.function(lambda: (tf.stack(flags), tf.stack(steps)))
        self._steps = self._read_state()[1].numpy()  # traced here, not inside a batch
        self._predictable = all(hasattr(l.pruning_schedule, "should_prune")
                                for l in self._std_layers)

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = None

    def on_train_batch_end(self, batch, logs=None):
        if not self._std_layers:
            return
        if self._last_batch is None or not self._predictable:
            self._mask_changed_layers()
        else:
            taken = max(batch - self._last_batch, 1)  # > 1 with steps_per_execution
            if self._may_have_pruned(taken):
                self._mask_changed_layers()
            else:
                self._steps = self._steps + taken
        self._last_batch = batch

    def _may_have_pruned(self, taken):
        """Whether a layer's schedule prunes at one of the next ``taken`` steps."""
        return any(layer.pruning_schedule.should_prune(int(step) + k)
                   for layer, step in zip(self._std_layers, self._steps)
                   for k in range(1, taken + 1))

    def _mask_changed_layers(self):
        flags, steps = self._read_state()
        self._steps = steps.numpy()
        for layer, masked in zip(self._std_layers, flags.numpy()):
            if not masked:
                layer.mask_optimizer_slots(self.model.optimizer)


class IterationLearningRate(keras.callbacks.Callback):
    """The reference experiment's learning rate: a per-iteration initial rate, dropped inside each iteration.

    For epoch ``e`` (0-based) with ``E`` epochs per iteration, ``i = e // E``, ``j = e % E``::

        lr(e) = initial_lrs[min(i, len(initial_lrs) - 1)] * factor ** #{d in drops : d <= j}

    so with drops ``(3, 10, 16)`` the rate falls 10x at the 4th, 11th and 17th epoch of
    every iteration (epochs counted from 0). Set on the optimizer at each epoch's start.
    """

    def __init__(self, initial_lrs, epochs_per_iteration, drops=(3, 10, 16), factor=0.1):
        super().__init__()
        initial_lrs = _as_list(initial_lrs, "initial_lrs", "rates > 0, e.g. [0.01, 0.001]")
        initial_lrs = [check_positive(lr, f"initial_lrs[{i}]", "a learning rate")
                       for i, lr in enumerate(initial_lrs)]
        epochs_per_iteration = check_int(epochs_per_iteration, "epochs_per_iteration", 1)
        drops = [check_int(d, f"drops[{i}]", 0, "an epoch inside an iteration")
                 for i, d in enumerate(_as_list(drops, "drops", "epochs, e.g. (3, 10, 16)", True))]
        factor = check_positive(factor, "factor", "0.1: a 10x drop")
        self.initial_lrs, self.drops, self.factor = initial_lrs, sorted(drops), factor
        self.epochs_per_iteration = epochs_per_iteration

    def on_train_begin(self, logs=None):
        if isinstance(self.model.optimizer.get_config().get("learning_rate"), dict):  # a schedule
            raise TypeError(
                "IterationLearningRate sets the learning rate at every epoch, but the optimizer "
                "has a LearningRateSchedule: compile with a float learning rate instead."
            )

    def rate(self, epoch):
        iteration, epoch_in_iteration = divmod(epoch, self.epochs_per_iteration)
        initial = self.initial_lrs[min(iteration, len(self.initial_lrs) - 1)]
        return initial * self.factor ** sum(d <= epoch_in_iteration for d in self.drops)

    def on_epoch_begin(self, epoch, logs=None):
        keras.backend.set_value(self.model.optimizer.learning_rate, self.rate(epoch))



def _as_list(value, where, what, empty_ok=False):
    """``value`` as a list (a single number becomes ``[value]``); raises unless it is a
    sequence of numbers (non-empty unless ``empty_ok``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [value]
    try:
        items = None if isinstance(value, (str, bytes, dict)) else list(value)
    except TypeError:
        items = None
    if items is None or not (items or empty_ok):
        raise ValueError(f"{where} must be a non-empty list of {what}, got {value!r}.")
    return items


class DropoutRescaling(keras.callbacks.Callback):
    """Rescales the Dropout rates to the surviving connections at each epoch's start.

    Placed after the callback that prunes (`IterativePruning` prunes at an iteration's
    first epoch start), it sees each pruning before the retraining that follows it. When
    a rate changes, the training function is re-traced so that the new rate is used.
    At the end of training the original rates are restored (`dropout.restore_dropout`).
    """

    def on_train_begin(self, logs=None):
        self.sources = dropout_sources(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if rescale_dropout(self.model, self.sources):
            self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        if restore_dropout(self.model):
            self.model.make_train_function(force=True)  # a later fit traces D_o again

"""tf_keras callbacks that drive pruning inside ``model.fit``: pruning step, learning rate,
dropout rescaling (the last two: `procedure`'s logic on tf_keras's ``Callback``)."""
import tensorflow as tf

from tf_stdprune.keras2.engine import keras, tfmot
from tf_stdprune.procedure.iterative import DropoutRescalingLogic, IterationLearningRateLogic
from tf_stdprune.keras2.wrapper import PruneLowStd

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

    A layer that was due to prune in the batch but whose masks did not change found NaN or
    infinite weights (the mask update then assigns nothing): `NonFiniteError` is raised,
    naming the layer, the tensor and the step.

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
        before, self._steps = self._steps, steps.numpy()
        for layer, masked, old, new in zip(self._std_layers, flags.numpy(), before, self._steps):
            if not masked:
                layer.mask_optimizer_slots(self.model.optimizer)
            elif any(prunes_at(layer.pruning_schedule, s) for s in range(int(old) + 1, int(new) + 1)):
                # due to prune, masks unchanged: the update refused non-finite values
                layer.check_finite(next(s for s in range(int(old) + 1, int(new) + 1)
                                        if prunes_at(layer.pruning_schedule, s)))


def prunes_at(schedule, step):
    """Whether ``schedule`` (ours or a tfmot sparsity schedule) prunes at ``step``."""
    if hasattr(schedule, "should_prune"):
        return schedule.should_prune(step)
    return bool(schedule(tf.constant(step, tf.int64))[0])


class IterationLearningRate(IterationLearningRateLogic, keras.callbacks.Callback):
    """`procedure.IterationLearningRateLogic` on tf_keras: at each epoch's start ``lr(e) =
    initial_lrs[min(i, len - 1)] * factor ** #{d in drops : d <= j}`` (``i = e // E``,
    ``j = e % E``) is set on the optimizer."""

    def set_learning_rate(self, value):
        keras.backend.set_value(self.model.optimizer.learning_rate, value)


class DropoutRescaling(DropoutRescalingLogic, keras.callbacks.Callback):
    """`procedure.DropoutRescalingLogic` on tf_keras: ``D_r = D_o * sqrt(C_ir / C_io)``
    after each pruning (Han et al. 2015), the training function re-traced; the original
    rates restored at the end of training."""

"""Keras callbacks that drive pruning inside ``model.fit``."""
import tensorflow_model_optimization as tfmot

from tf_stdprune.wrapper import PruneLowStd

PruningSummaries = tfmot.sparsity.keras.PruningSummaries


class UpdatePruningStep(tfmot.sparsity.keras.UpdatePruningStep):
    """tfmot's `UpdatePruningStep`, plus optimizer-slot masking after each pruning step.

    At the end of a batch in which a `PruneLowStd` layer pruned (its schedule fired at
    that batch's ``pruning_step``), the optimizer slots of every pruned tensor are
    multiplied by the mask and the weights re-masked: ``s = s * m``, ``w = w * m``. The
    pruning batch's own update used the old momentum; after this nothing moves a
    pruned weight again. With ``steps_per_execution > 1`` it runs at the end of the
    execution that contains the pruning step.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._std_layers = [l for l in self.prunable_layers if isinstance(l, PruneLowStd)]
        self._last_step = self._current_step()

    def _current_step(self):
        return int(self._std_layers[0].pruning_step.numpy()) if self._std_layers else 0

    def on_train_batch_end(self, batch, logs=None):
        if not self._std_layers:
            return
        step = self._current_step()
        for layer in self._std_layers:
            if _prunes_between(layer.pruning_schedule, self._last_step, step):
                layer.mask_optimizer_slots(self.model.optimizer)
        self._last_step = step


def _prunes_between(schedule, start, end):
    """Whether ``schedule`` prunes at some step in ``[start, end)``."""
    if hasattr(schedule, "prunes_between"):
        return schedule.prunes_between(start, end)
    return any(bool(schedule(step)[0]) for step in range(start, end))

"""The reference experiment's iterative procedure for tf_keras models.

`IterativePruning` is `procedure.IterativePruningLogic` (the procedure, the run
directory, the records; see there) on tf_keras's ``Callback``, with what is particular to
tf_keras: masks recomputed through tfmot's pruning object, BatchNormalization recalibrated
by `recalibration.recalibrate_batchnorm`, data given as arrays batched by ``tf.data``,
checkpoints written as ``tf.train.Checkpoint`` (`run_state`), TensorBoard scalars in
``run_dir/tensorboard``, and under a multi-worker strategy only the chief writes files.
`TargetAccuracy` is target mode's judge (`target`).
"""
import os
import sys

import tensorflow as tf

from tf_stdprune.procedure import iterative as procedure
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.callbacks import (  # noqa: F401  (the callbacks iterative_callbacks builds)
    DropoutRescaling, IterationLearningRate, UpdatePruningStep)
from tf_stdprune.procedure.iterative import warn_unreachable_drops  # noqa: F401
from tf_stdprune.keras2.prune import all_layers
from tf_stdprune.keras2.recalibration import BATCHNORM_LAYERS, recalibrate_batchnorm
from tf_stdprune.keras2.run_state import non_finite_weights, save_iteration
from tf_stdprune.procedure.target import TargetAccuracyLogic
from tf_stdprune.keras2.wrapper import PruneLowStd


class IterativePruning(procedure.IterativePruningLogic, keras.callbacks.Callback):
    """Prune, recalibrate, evaluate, retrain, log and checkpoint a tf_keras model,
    iteration by iteration (`procedure.IterativePruningLogic` has the arguments and the
    contract). ``checkpoint_extras`` are trackables saved with every checkpoint, e.g.
    ``{"data": iterator}``; pass the same to `restore_run`.
    """

    def convert_data(self, data, batch_size):
        """``data`` as batches: a `tf.data.Dataset` as it is, ``(x, y[, w])`` arrays batched."""
        if isinstance(data, tuple):
            return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
        return data

    def find_wrappers(self):
        return [l for l in all_layers(self.model) if isinstance(l, PruneLowStd)]

    def has_batchnorm(self):
        return any(isinstance(getattr(l, "layer", l), BATCHNORM_LAYERS)
                   for l in all_layers(self.model))

    def is_chief(self):
        return self.model.distribute_strategy.extended.should_checkpoint

    def pruning_step(self):
        return int(self.wrappers[0].pruning_step.numpy())

    def prune_iteration(self, step):
        """Shrinks the masks of every wrapper whose schedule prunes at ``step`` (the
        wrapper records the step as pruned, so it does not prune again inside the first
        batch) and zeroes their optimizer slots; returns the ``q`` or None."""
        quality = None
        for layer in self.wrappers:
            should_prune, q = layer.pruning_schedule(step)
            if bool(should_prune):
                layer.pruning_obj.update_masks(q)
                layer.mask_optimizer_slots(self.model.optimizer)
                quality = float(q)
        return quality

    def recalibrate(self):
        recalibrate_batchnorm(self.model, self.recalibration_data, self.recalibration_batches)

    def evaluate_data(self, data):
        return self.model.evaluate(data, verbose=0, return_dict=True)

    def learning_rate(self):
        return float(keras.backend.get_value(self.model.optimizer.learning_rate))

    def non_finite_weights(self):
        return non_finite_weights(self.model)

    def save_checkpoint(self, iteration, epoch):
        save_iteration(self.model, self.run_dir, iteration, epoch, self.history, self.chief,
                       self.checkpoint_extras)

    def open_writer(self):
        self.writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))

    def write_scalars(self, scalars, iteration):
        with self.writer.as_default():
            for name, value in scalars.items():
                tf.summary.scalar(name, value, step=iteration)
        self.writer.flush()

    def close_writer(self):
        self.writer.close()


class TargetAccuracy(TargetAccuracyLogic, keras.callbacks.Callback):
    """Target mode's judge on tf_keras (`target.TargetAccuracyLogic`): q rises by
    ``q_step`` per iteration until validation top-1 drops more than the budget."""

    def find_wrappers(self):
        return [l for l in all_layers(self.model) if isinstance(l, PruneLowStd)]

    def is_chief(self):
        return self.model.distribute_strategy.extended.should_checkpoint


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args, **kwargs):
    """`procedure.iterative_callbacks` built with tf_keras's callbacks (this module's)."""
    kwargs["classes"] = sys.modules[__name__]
    return procedure.iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args,
                                         **kwargs)

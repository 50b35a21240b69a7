"""The reference experiment's iterative procedure for Keras 3 models, on any backend.

`IterativePruning`, `IterationLearningRate` and `DropoutRescaling` are `procedure`'s logic
on Keras 3's ``Callback``, with what is particular to Keras 3: masks recomputed by
`tf_stdprune.keras3.prune.prune_due`, BatchNormalization recalibrated by `recalibrate_batchnorm`
(below), data evaluated as ``model.evaluate(x, y)``, and checkpoints written as one
``variables.npz`` (`VariablesCheckpoint`): every variable of ``model.variables`` (weights,
masks, sigmas, BN statistics and the layers' seed-generator states) and of
``optimizer.variables`` (slots, iteration count, learning rate), so a run resumes exactly
on every backend. The run directory is `run_directory`'s, as on tf_keras (no TensorBoard
scalars on Keras 3); target mode's judge is `TargetAccuracy`. On JAX, ``fit`` keeps the state outside the variables during an
epoch: the callbacks write it back (``model.jax_state_sync()``) before reading variables.

Nothing in this module imports tf_keras or tfmot.
"""
import os
import sys
import zipfile

import keras
import numpy as np

from tf_stdprune.procedure import iterative as procedure
from tf_stdprune.procedure.batchnorm_statistics import average_batch_statistics
from tf_stdprune.keras3.prune import (  # noqa: F401  (the callbacks iterative_callbacks builds)
    UpdatePruningStep, all_layers, prune_due, wrappers)
from tf_stdprune.procedure.run_directory import (
    CheckpointFormat, RunDirectoryError, restore_directory, run_settings, save_iteration_with)
from tf_stdprune.procedure.target import TargetAccuracyLogic

VARIABLES_FILE = "variables.npz"


def _sync(model):
    """Writes JAX's in-fit state back into the variables (nothing on other backends)."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def _numpy(variable):
    return np.asarray(keras.ops.convert_to_numpy(variable))


class VariablesCheckpoint(CheckpointFormat):
    """``directory/variables.npz``: ``m00000, m00001, ...`` the values of
    ``model.variables`` and ``o00000, ...`` those of ``model.optimizer.variables``, in
    their order, and ``paths``, their paths, for the error messages."""

    errors = (zipfile.BadZipFile, EOFError)

    def __init__(self, model):
        self.model = model

    def _variables(self):
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        return list(self.model.variables), list(optimizer.variables)

    def write(self, directory):
        _sync(self.model)
        model_variables, optimizer_variables = self._variables()
        arrays = {f"m{i:05d}": _numpy(v) for i, v in enumerate(model_variables)}
        arrays.update({f"o{i:05d}": _numpy(v) for i, v in enumerate(optimizer_variables)})
        arrays["paths"] = np.array([v.path for v in model_variables + optimizer_variables])
        with open(os.path.join(directory, VARIABLES_FILE), "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    def check(self, directory):
        """Reads every array once, which checks each one's CRC in the zip file."""
        with np.load(os.path.join(directory, VARIABLES_FILE)) as arrays:
            for name in arrays.files:
                arrays[name]

    def read(self, directory):
        """Assigns every saved value; raises `RunDirectoryError` if the number or the
        shapes of the variables differ from the model's and optimizer's."""
        pairs = []
        with np.load(os.path.join(directory, VARIABLES_FILE)) as arrays:
            for prefix, kind, variables in zip("mo", ("model", "optimizer"), self._variables()):
                saved = sorted(n for n in arrays.files if n[0] == prefix and n[1:].isdigit())
                if len(saved) != len(variables):
                    self._misfit(directory, f"{len(saved)} {kind} variables saved, "
                                            f"{len(variables)} now")
                pairs += [(v, arrays[n]) for v, n in zip(variables, saved)]
        for variable, value in pairs:
            if tuple(variable.shape) != value.shape:
                self._misfit(directory, f"{variable.path} has shape {tuple(variable.shape)}, "
                                        f"saved {value.shape}")
        for variable, value in pairs:
            variable.assign(value)

    @staticmethod
    def _misfit(directory, reason):
        raise RunDirectoryError(
            f"The checkpoint {directory} does not fit this model and optimizer ({reason}). "
            "Build and compile the model as for the run's first start (same layers, same "
            "optimizer class), or use a new directory.")


def restore_run(model, run_dir, fall_back=False, extras=None):
    """Restores the last finished iteration of ``run_dir`` into the compiled Keras 3
    ``model``; returns the epoch to pass as ``fit(initial_epoch=...)`` (0 for a new run).

    As `run_state.restore_run` on tf_keras (`run_directory.restore_directory`: lock,
    ``run.json`` refusal of other settings, ``fall_back``), with the checkpoint of
    `VariablesCheckpoint`: weights, masks, BN statistics, seed generators, optimizer
    slots and iteration count. ``extras`` (tf_keras trackables) are not supported.
    """
    if extras:
        raise ValueError("restore_run(extras=...) takes tf.train.Checkpoint trackables, which "
                         "a Keras 3 run does not save: leave extras out (model.variables, "
                         "seed generators included, and optimizer.variables are saved).")
    if getattr(model, "optimizer", None) is None:
        raise ValueError("Compile the model before restore_run(model, run_dir): its optimizer "
                         "state is restored too.")
    return restore_directory(VariablesCheckpoint(model), run_dir, run_settings(model), fall_back)


def _batchnorm_layers(model):
    return [l for l in (getattr(layer, "layer", layer) for layer in all_layers(model))
            if isinstance(l, keras.layers.BatchNormalization)]


def _x_batches(data, batch_size):
    """The ``x`` of each batch: of ``(x, ...)`` arrays sliced in ``batch_size``, or of an
    iterable yielding ``x`` or ``(x, ...)``."""
    if isinstance(data, tuple):
        x = data[0]
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size]
        return
    for batch in data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def recalibrate_batchnorm(model, data, batches, batch_size=32):
    """Re-estimates the moving statistics of every BatchNormalization of a Keras 3 model.

    Runs ``K = batches`` forward passes in training mode (no weight update), each with
    momentum 0, and sets ``moving_mean = (1/K) sum_k mean_k`` and ``moving_variance =
    (1/K) sum_k var_k``, ``var_k`` the biased batch variance (``/ n``) that Keras 3's layer
    feeds its moving average. ``data``: ``(x, ...)`` arrays (cut in ``batch_size``) or an
    iterable of ``x`` or ``(x, ...)`` batches. Masks and pruning steps are untouched; the
    pruned weights read are exactly 0. A layer with ``trainable=False`` keeps its
    statistics. Returns the number of batches used.
    """
    layers = [l for l in _batchnorm_layers(model) if l.trainable]
    if not layers or batches < 1:
        return 0
    _sync(model)
    return average_batch_statistics(layers, lambda x: model(x, training=True),
                                    _x_batches(data, batch_size), batches, _numpy)


class IterativePruning(procedure.IterativePruningLogic, keras.callbacks.Callback):
    """Prune, recalibrate, evaluate, retrain, log and checkpoint a Keras 3 model,
    iteration by iteration (`procedure.IterativePruningLogic` has the arguments and the
    contract; ``checkpoint_extras`` is not supported: every variable is saved)."""

    def on_train_begin(self, logs=None):
        if self.checkpoint_extras:
            raise ValueError("checkpoint_extras are tf.train.Checkpoint trackables, which a "
                             "Keras 3 run does not save: leave them out.")
        super().on_train_begin(logs)

    def find_wrappers(self):
        return wrappers(self.model)

    def has_batchnorm(self):
        return bool(_batchnorm_layers(self.model))

    def is_chief(self):
        return True

    def pruning_step(self):
        _sync(self.model)
        return int(_numpy(self.model.optimizer.iterations))

    def prune_iteration(self, step):
        _sync(self.model)
        return prune_due(self.wrappers, step, self.model.optimizer)

    def recalibrate(self):
        recalibrate_batchnorm(self.model, self.recalibration_data, self.recalibration_batches,
                              self.batch_size)

    def evaluate_data(self, data):
        if isinstance(data, tuple):
            return self.model.evaluate(*data, batch_size=self.batch_size, verbose=0,
                                       return_dict=True)
        return self.model.evaluate(data, verbose=0, return_dict=True)

    def learning_rate(self):
        return float(_numpy(self.model.optimizer.learning_rate))

    def non_finite_weights(self):
        values = [(w.path, _numpy(w)) for w in self.model.weights]
        return [path for path, value in values
                if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]

    def save_checkpoint(self, iteration, epoch):
        save_iteration_with(VariablesCheckpoint(self.model), self.run_dir, iteration, epoch,
                            self.history, self.chief)


class IterationLearningRate(procedure.IterationLearningRateLogic, keras.callbacks.Callback):
    """`procedure.IterationLearningRateLogic` on Keras 3: ``lr(e)`` is assigned to the
    optimizer's learning-rate variable at each epoch's start."""

    def set_learning_rate(self, value):
        self.model.optimizer.learning_rate = value


class DropoutRescaling(procedure.DropoutRescalingLogic, keras.callbacks.Callback):
    """`procedure.DropoutRescalingLogic` on Keras 3: ``D_r = D_o * sqrt(C_ir / C_io)``
    after each pruning, the training function re-traced; the rates restored at the end."""


class TargetAccuracy(TargetAccuracyLogic, keras.callbacks.Callback):
    """Target mode's judge on Keras 3 (`target.TargetAccuracyLogic`): q rises by
    ``q_step`` per iteration until validation top-1 drops more than the budget; a
    rejected iteration gives the model and optimizer variables their kept values back."""

    def on_train_begin(self, logs=None):
        _sync(self.model)
        super().on_train_begin(logs)

    def find_wrappers(self):
        return wrappers(self.model)

    def is_chief(self):
        return True


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args, **kwargs):
    """`procedure.iterative_callbacks` built with Keras 3's callbacks (this module's)."""
    kwargs["classes"] = sys.modules[__name__]
    return procedure.iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, *args,
                                         **kwargs)

"""The run directory of a tf_keras model: checkpoints as ``tf.train.Checkpoint``.

The directory itself (settings, lock, history, checkpoint rotation, ``state.json``, fall
back) is `tf_stdprune.procedure.run_directory`'s, shared by both Keras worlds; its names are
available here too. A checkpoint of a tf_keras model, ``checkpoints/iter-NNNN/ckpt``, is
a `tf.train.Checkpoint` of the model (weights, masks, sigmas, steps), the optimizer
(slots, iteration count), the layers' random generators (`layer_generators`) and the
caller's ``extras``.
"""
import contextlib
import os

import numpy as np
import tensorflow as tf

from tf_stdprune.io import atomic_write  # noqa: F401  (part of this module's names)
from tf_stdprune.procedure.run_directory import (  # noqa: F401  (this module's names, for its users)
    CHECKPOINTS, EXTENSIBLE_COUNTS, EXTENSIBLE_LISTS, HISTORY_FILE, KEPT_CHECKPOINTS,
    LOCK_FILE, RUN_FILE, STATE_FILE, CheckpointFormat, NonFiniteError, RunDirectoryError,
    acquire_lock, check_run_settings, check_writable, is_record, parse_history, read_history,
    release_all_locks, release_lock, restore_directory, run_settings, save_iteration_with,
    setting_differences, unwrapped_layers)


def layer_generators(model):
    """``{"layer_rng_<i>": generator}``: the `tf.random.Generator` of every layer that
    draws random numbers through one (dropout, noise and augmentation layers under
    ``keras.backend.experimental.enable_tf_random_generator()``), ``i`` its position.

    Keras creates these generators at a layer's first call and does not list them among
    the model's weights, so they are created here and checkpointed explicitly.
    """
    generators = {}
    for index, (_, layer) in enumerate(unwrapped_layers(model)):
        source = getattr(layer, "_random_generator", None)
        stateful = getattr(source, "RNG_STATEFUL", None)
        if stateful is not None and getattr(source, "_rng_type", None) == stateful:
            strategy = getattr(model, "distribute_strategy", None)
            with strategy.scope() if strategy is not None else contextlib.nullcontext():
                source._maybe_init()
        generator = getattr(source, "_generator", None)
        if isinstance(generator, tf.random.Generator):
            generators[f"layer_rng_{index}"] = generator
    return generators


def _build_optimizer(model):
    optimizer = model.optimizer
    if hasattr(optimizer, "build"):
        optimizer.build(model.trainable_variables)
    else:
        optimizer._create_all_weights(model.trainable_variables)


class TFCheckpoint(CheckpointFormat):
    """``directory/ckpt``: a `tf.train.Checkpoint` of model, optimizer, the layers'
    random generators and ``extras`` (more trackables, e.g. ``{"data": iterator}``)."""

    errors = (tf.errors.OpError,)

    def __init__(self, model, extras=None):
        self.model, self.extras = model, extras

    def _checkpoint(self):
        return tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                   **layer_generators(self.model), **(self.extras or {}))

    def write(self, directory):
        self._checkpoint().write(os.path.join(directory, "ckpt"))

    def check(self, directory):
        """Reads every tensor once, which checks the index and the data files' checksums."""
        reader = tf.train.load_checkpoint(os.path.join(directory, "ckpt"))
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)

    def read(self, directory):
        """Restores it, the optimizer built first so that its slots are restored exactly."""
        _build_optimizer(self.model)
        try:
            self._checkpoint().read(os.path.join(directory, "ckpt")) \
                .assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as error:
            raise RunDirectoryError(
                f"The checkpoint {directory} does not fit this model and optimizer "
                f"({str(error).splitlines()[0][:300]}). Build and compile the model as for "
                "the run's first start (same layers, same optimizer class), or use a new "
                "directory.") from error


def save_iteration(model, run_dir, iteration, epoch, history, chief=True, extras=None):
    """Checkpoints model, optimizer and random states after ``iteration``, atomically.

    Random states: the layers' generators (`layer_generators`), numpy's and Python's
    global states (in ``meta.json``), and ``extras``: more trackables, e.g.
    ``{"data_rng": generator}`` of a data pipeline or ``{"data": iterator}``; give the
    same to `restore_run`. See `run_directory.save_iteration_with` for the order of the
    writes. Under a multi-worker strategy every worker must call it, since writing a
    checkpoint runs collectives.
    """
    save_iteration_with(TFCheckpoint(model, extras), run_dir, iteration, epoch, history, chief)


def restore_run(model, run_dir, fall_back=False, extras=None):
    """Restores the last finished iteration of ``run_dir`` into ``model`` (compiled).

    Returns the epoch to pass as ``model.fit(initial_epoch=...)``: 0 for a new run.
    First it takes the directory's lock (`acquire_lock`), puts back or deletes what a
    killed write left, and checks ``model`` against ``run.json`` (`check_run_settings`):
    another architecture, schedule, ``std_mode``, ``layer_quality`` or optimizer
    raises before anything changes. A damaged directory (a truncated or corrupt
    checkpoint, an unreadable ``state.json``, a bad ``history.jsonl`` line) raises
    `RunDirectoryError` naming the file; with ``fall_back=True`` the newest intact
    earlier checkpoint is used instead (and the history cut back to it). Restores model,
    optimizer (built first so that its slots are restored exactly), the layers' random
    generators, numpy's and Python's random states, and ``extras``.
    """
    if model.optimizer is None:
        raise ValueError("Compile the model before restore_run(model, run_dir): its optimizer "
                         "state is restored too.")
    strategy = getattr(model, "distribute_strategy", None)
    chief = strategy is None or strategy.extended.should_checkpoint
    return restore_directory(TFCheckpoint(model, extras), run_dir, run_settings(model),
                             fall_back, chief)


def non_finite_weights(model):
    """Names of ``model``'s weights that hold a NaN or an infinity."""
    return [w.name for w in model.weights
            if w.dtype.is_floating and not np.isfinite(np.asarray(w.numpy(), np.float64)).all()]

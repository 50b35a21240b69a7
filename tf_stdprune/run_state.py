"""A run directory that survives crashes: atomic files, per-iteration checkpoints, resume.

Layout of ``run_dir``::

    history.jsonl          one JSON line per finished iteration
    checkpoints/iter-NNNN/ tf.train.Checkpoint of model (weights, masks, sigmas, steps)
                           and optimizer (slots, iteration count)
    state.json             {"iteration": i, "epoch": e, "checkpoint": ...}, written LAST

Every file is written to a temporary name in the same directory and then renamed with
``os.replace``, so a reader sees either the old or the new version, never half of one.
``state.json`` names only a checkpoint that was completely written, so a run killed at
any moment resumes from the last finished iteration.
"""
import json
import os
import shutil
import tempfile

import tensorflow as tf

from tf_stdprune.io import atomic_write

STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"


def check_writable(run_dir):
    """Raises a clear error now, not after hours of training, if ``run_dir`` is unusable."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        atomic_write(os.path.join(run_dir, ".write-test"), "ok")
        os.remove(os.path.join(run_dir, ".write-test"))
    except OSError as error:
        raise OSError(
            f"Cannot write to the run directory {run_dir!r} ({error.strerror}). "
            "Choose a writable --out_dir with free space."
        ) from error


def read_history(run_dir):
    """The finished iterations' records (a list of dicts)."""
    path = os.path.join(run_dir, HISTORY_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _checkpoint(model):
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer)


def save_iteration(model, run_dir, iteration, epoch, history, chief=True):
    """Checkpoints model + optimizer after ``iteration`` and records it, atomically.

    Under a multi-worker strategy every worker must call it, since writing a checkpoint
    runs collectives; a worker that is not the ``chief`` writes to a scratch directory
    that is then deleted, and records nothing.
    """
    final = os.path.join(run_dir, "checkpoints", f"iter-{iteration:04d}")
    staging = tempfile.mkdtemp(dir=run_dir if chief else None, prefix=".tmp-ckpt-")
    try:
        _checkpoint(model).write(os.path.join(staging, "ckpt"))
        if chief:
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once moved into place
    if not chief:
        return
    atomic_write(os.path.join(run_dir, HISTORY_FILE),
                 "".join(json.dumps(record) + "\n" for record in history))
    atomic_write(os.path.join(run_dir, STATE_FILE), json.dumps(
        {"iteration": iteration, "epoch": epoch, "checkpoint": os.path.relpath(final, run_dir)}))
    for name in os.listdir(os.path.dirname(final)):  # keep the newest checkpoint only
        if name != os.path.basename(final):
            shutil.rmtree(os.path.join(os.path.dirname(final), name), ignore_errors=True)


def restore_run(model, run_dir):
    """Restores the last finished iteration of ``run_dir`` into ``model`` (compiled).

    Returns the epoch to pass as ``model.fit(initial_epoch=...)``: 0 for a new run.
    The optimizer is built first so that its slots are restored exactly.
    """
    if model.optimizer is None:
        raise ValueError("Compile the model before restore_run(model, run_dir): its optimizer "
                         "state is restored too.")
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if name.startswith(".tmp-"):  # left by a run killed while writing
            target = os.path.join(run_dir, name)
            shutil.rmtree(target) if os.path.isdir(target) else os.remove(target)
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        state = json.load(f)
    optimizer = model.optimizer
    if hasattr(optimizer, "build"):
        optimizer.build(model.trainable_variables)
    else:
        optimizer._create_all_weights(model.trainable_variables)
    _checkpoint(model).read(os.path.join(run_dir, state["checkpoint"], "ckpt")).assert_existing_objects_matched()
    history = [r for r in read_history(run_dir) if r["iteration"] <= state["iteration"]]
    atomic_write(os.path.join(run_dir, HISTORY_FILE),
                 "".join(json.dumps(record) + "\n" for record in history))
    return state["epoch"]

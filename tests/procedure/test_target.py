"""Target mode: q rises until the accuracy budget is exceeded; that iteration is undone."""
import json
import os
import shutil
import signal
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.run_state import read_history, restore_run
from tf_stdprune.procedure.target import TARGET_FILE, TARGET_FIGURE, raised_qualities

BATCH, EPOCHS, MAX_ITERATIONS = 32, 1, 8


class StateRecorder(keras.callbacks.Callback):
    """Copies every model and optimizer variable at each epoch end (before judging)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_epoch_end(self, epoch, logs=None):
        self.states.append([v.numpy().copy() for v in self.model.variables]
                           + [v.numpy().copy() for v in self.model.optimizer.variables])


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 8)).astype("float32")
    y = np.argmax(x[:, :3] + 0.5 * x[:, 3:6], axis=1)
    return x, y


def trained_dense():
    keras.utils.set_random_seed(0)
    x, y = data()
    model = keras.Sequential([keras.layers.Dense(16, activation="relu", input_shape=(8,)),
                              keras.layers.Dense(3)])
    model.compile(keras.optimizers.Adam(0.02),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=BATCH, epochs=30, verbose=0)
    return model


def pruned(dense, steps):
    model = tf_stdprune.prune_low_std(dense, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.3], steps_per_iteration=EPOCHS * steps))
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def target_callbacks(run_dir):
    return tf_stdprune.iterative_callbacks(
        run_dir, EPOCHS, 1e-3, lr_drops=(), validation_data=data(), recalibration_batches=0,
        target_accuracy_drop=2.0, q_step=0.4)


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    keras.backend.clear_session()
    run_dir = str(tmp_path_factory.mktemp("target"))
    x, y = data()
    steps = len(x) // BATCH
    model = pruned(trained_dense(), steps)
    recorder = StateRecorder()
    callbacks = target_callbacks(run_dir)
    callbacks.insert(2, recorder)  # before IterativePruning: sees the state before judging
    history = model.fit(x, y, batch_size=BATCH, epochs=MAX_ITERATIONS * EPOCHS, verbose=0,
                        callbacks=callbacks)
    return run_dir, model, recorder, history


def test_q_rises_by_q_step_until_an_iteration_exceeds_the_budget(target_run):
    run_dir, _, _, history = target_run
    records = read_history(run_dir)
    assert len(records) >= 2 and len(records) < MAX_ITERATIONS
    np.testing.assert_allclose([r["q"] for r in records],
                               0.3 + 0.4 * np.arange(len(records)), rtol=1e-6)
    with open(os.path.join(run_dir, "baseline.json")) as f:
        baseline = json.load(f)["val_top1"]
    drops = [100 * (baseline - r["after"]["val_top1"]) for r in records]
    assert all(d <= 2.0 for d in drops[:-1]) and drops[-1] > 2.0
    assert [r.get("rejected", False) for r in records] == [False] * (len(records) - 1) + [True]
    assert len(history.epoch) == len(records) * EPOCHS  # fit stopped after the rejection


def test_rejected_iteration_is_undone_bit_for_bit(target_run, tmp_path):
    run_dir, model, recorder, _ = target_run
    kept = len(read_history(run_dir)) - 1
    expected = recorder.states[kept * EPOCHS - 1]  # the end of the last accepted iteration
    final = [v.numpy() for v in model.variables] + [v.numpy() for v in model.optimizer.variables]
    assert len(final) == len(expected)
    for actual, saved in zip(final, expected):
        np.testing.assert_array_equal(actual, saved)
    assert not all(np.array_equal(a, b) for a, b in zip(recorder.states[-1], expected))
    # The checkpoint on disk is the kept iteration as well.
    with open(os.path.join(run_dir, "state.json")) as f:
        assert json.load(f)["iteration"] == kept
    fresh = pruned(keras.Sequential([keras.layers.Dense(16, activation="relu", input_shape=(8,)),
                                     keras.layers.Dense(3)]), 128 // BATCH)
    restore_run(fresh, shutil.copytree(run_dir, str(tmp_path / "copy")))
    for actual, saved in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(actual, saved)


def test_summary_reports_kept_q_zeros_and_compression_and_figure_marks_rejection(target_run):
    run_dir, model, _, _ = target_run
    records = read_history(run_dir)
    with open(os.path.join(run_dir, TARGET_FILE)) as f:
        summary = json.load(f)
    assert summary["kept_q"] == records[-2]["q"]
    assert summary["rejected_q"] == records[-1]["q"]
    report = tf_stdprune.sparsity_report(model)
    assert summary["zero_parameters_rate"] == pytest.approx(records[-2]["zero_parameters_rate"])
    assert summary["zero_parameters_rate"] == pytest.approx(report.zero_parameters_rate)
    assert summary["compression_rate"] == pytest.approx(report.compression_rate)
    image = matplotlib.image.imread(os.path.join(run_dir, "figures", TARGET_FIGURE))
    red = (image[..., 0] > 0.75) & (image[..., 1] < 0.3) & (image[..., 2] < 0.3)
    assert red.sum() > 20  # the red cross of the rejected point


def test_schedule_of_a_target_run_lists_the_raised_qualities_and_still_serializes(target_run):
    _, model, _, _ = target_run
    wrapper = next(l for l in model.layers if isinstance(l, tf_stdprune.PruneLowStd))
    np.testing.assert_allclose(wrapper.pruning_schedule.qualities,
                               0.3 + 0.4 * np.arange(MAX_ITERATIONS + 1), rtol=1e-12)
    assert raised_qualities(0.5, 0.25, 3) == [0.5, 0.75, 1.0]
    assert wrapper.get_config()["pruning_schedule"]["config"]["qualities"][1] == pytest.approx(0.7)


def test_a_budget_never_exceeded_keeps_every_iteration_and_says_so(tmp_path):
    x, y = data()
    model = pruned(trained_dense(), len(x) // BATCH)
    callbacks = tf_stdprune.iterative_callbacks(
        str(tmp_path), EPOCHS, 1e-3, lr_drops=(), validation_data=(x, y),
        recalibration_batches=0, figures=False, target_accuracy_drop=100.0, q_step=0.1)
    history = model.fit(x, y, batch_size=BATCH, epochs=2 * EPOCHS, verbose=0, callbacks=callbacks)
    assert len(history.epoch) == 2 * EPOCHS
    with open(os.path.join(tmp_path, TARGET_FILE)) as f:
        summary = json.load(f)
    assert summary["rejected_iteration"] is None and summary["kept_iteration"] == 2
    assert summary["kept_q"] == pytest.approx(0.4)
    assert not any(r.get("rejected") for r in read_history(str(tmp_path)))


def test_bad_target_arguments_name_the_argument_and_the_fix():
    with pytest.raises(ValueError, match="q_step.*-0.1"):
        tf_stdprune.iterative_callbacks("unused", 1, 0.1, validation_data=data(),
                                        target_accuracy_drop=0.5, q_step=-0.1)
    with pytest.raises(ValueError, match="validation_data"):
        tf_stdprune.iterative_callbacks("unused", 1, 0.1, target_accuracy_drop=0.5)


def _script(run_dir, kill_after_batches=0):
    """``python test_target.py RUN_DIR [KILL_AFTER_BATCHES]``: a deterministic target run
    that resumes from RUN_DIR, killed with SIGKILL after that many batches if given."""
    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    x, y = data()
    model = pruned(trained_dense(), len(x) // BATCH)
    callbacks = target_callbacks(run_dir)
    if kill_after_batches:
        batches = []
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            batches.append(batch), len(batches) == kill_after_batches
            and os.kill(os.getpid(), signal.SIGKILL))))
    initial_epoch = restore_run(model, run_dir)
    model.fit(x, y, batch_size=BATCH, epochs=MAX_ITERATIONS * EPOCHS, initial_epoch=initial_epoch,
              shuffle=False, verbose=0, callbacks=callbacks)
    np.savez(os.path.join(run_dir, "final.npz"),
             *[v.numpy() for v in model.variables + list(model.optimizer.variables)])


def _run_script(run_dir, *arguments):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, os.path.abspath(__file__), str(run_dir), *arguments],
                          capture_output=True, text=True, timeout=300, env=env)


def _outcome(run_dir):
    history = read_history(run_dir)
    for record in history:
        record.pop("wall_time_s")
    with open(os.path.join(run_dir, TARGET_FILE)) as f:
        summary = json.load(f)
    final = np.load(os.path.join(run_dir, "final.npz"))
    return history, summary, [final[k] for k in sorted(final.files, key=lambda k: int(k[4:]))]


@pytest.mark.slow  # three processes, each importing TensorFlow and training
def test_target_run_killed_in_the_rejected_iteration_resumes_to_the_same_result(tmp_path):
    result = _run_script(tmp_path / "whole")
    assert result.returncode == 0, result.stderr[-3000:]
    history, summary, final = _outcome(tmp_path / "whole")
    assert history[-1]["rejected"] and summary["kept_iteration"] == 2
    # Killed in the third iteration's second batch, the one that is rejected.
    steps = 128 // BATCH
    killed = _run_script(tmp_path / "killed", str(2 * EPOCHS * steps + 2))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not os.path.exists(tmp_path / "killed" / TARGET_FILE)
    resumed = _run_script(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    history_resumed, summary_resumed, final_resumed = _outcome(tmp_path / "killed")
    assert json.dumps(history_resumed, sort_keys=True) == json.dumps(history, sort_keys=True)
    assert summary_resumed == summary
    assert len(final_resumed) == len(final)
    for resumed_value, value in zip(final_resumed, final):
        np.testing.assert_array_equal(resumed_value, value)


if __name__ == "__main__":
    _script(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)

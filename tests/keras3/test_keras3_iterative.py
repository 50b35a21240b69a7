"""The iterative procedure on Keras 3 (the backend under test): run directory, learning
rates, resume, refusals, dropout rescaling and BN recalibration, against independent
references (a tf_keras run's history keys, an uninterrupted run, numpy)."""
import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras3.helpers import BATCH, IMPORT_CHECK, pruned_for_iterations, state_arrays, tiny_data

import tf_stdprune
from tf_stdprune.procedure import dropout
from tf_stdprune.keras3.prune import wrappers
from tf_stdprune.procedure.run_directory import NonFiniteError, RunDirectoryError, read_history

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "iterative_run.py")
STEPS = 64 // BATCH


def fit_iterations(model, run_dir, epochs, initial_epoch=0, per_iteration=1, **kwargs):
    """``model.fit`` on `tiny_data` with the procedure's callbacks (lr list [0.05, 0.01])."""
    x, y = tiny_data()
    settings = dict(lr_drops=(), recalibration_data=(x, y), recalibration_batches=2,
                    validation_data=(x, y), batch_size=BATCH, figures=False)
    settings.update(kwargs)
    callbacks = settings.pop("callbacks", [])
    model.fit(x, y, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
              verbose=0, callbacks=tf_stdprune.iterative_callbacks(
                  str(run_dir), per_iteration, [0.05, 0.01], **settings) + callbacks)
    return model


def directory_snapshot(run_dir):
    """``{relative path: bytes}`` of every file below ``run_dir``."""
    files = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), run_dir)] = f.read()
    return files


def without_wall_time(history):
    return [{k: v for k, v in record.items() if k != "wall_time_s"} for record in history]


def tf_keras_history_keys(tmp_path):
    """The keys of a tf_keras run's history line (same tiny architecture, one iteration)."""
    tf_keras = pytest.importorskip("tf_keras")
    x, y = tiny_data()
    model = tf_keras.Sequential([
        tf_keras.layers.Conv2D(4, 3, padding="same", input_shape=(8, 8, 3)),
        tf_keras.layers.BatchNormalization(), tf_keras.layers.ReLU(),
        tf_keras.layers.MaxPooling2D(), tf_keras.layers.Flatten(), tf_keras.layers.Dense(3)])
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.5], steps_per_iteration=STEPS))
    pruned.compile(tf_keras.optimizers.SGD(0.05), tf_keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"])
    run_dir = str(tmp_path / "tf_keras")
    pruned.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=tf_stdprune.iterative_callbacks(
        run_dir, 1, [0.05], lr_drops=(), recalibration_data=(x, y), recalibration_batches=2,
        validation_data=(x, y), figures=False))
    return {key: sorted(value) if isinstance(value, dict) else None
            for key, value in read_history(run_dir)[0].items() if key != "layer_zeros"}


def test_a_keras3_run_directory_holds_the_tf_keras_files_history_keys_and_learning_rates(
        tmp_path):
    run_dir = tmp_path / "k3"
    model = fit_iterations(pruned_for_iterations(epochs=2, steps=STEPS), run_dir, 6,
                           per_iteration=2, lr_drops=(1,), figures=True)
    assert {"run.json", "history.jsonl", "baseline.json", "report.json", "state.json",
            "checkpoints", "figures"} <= set(os.listdir(run_dir))
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["iter-0002", "iter-0003"]
    assert os.listdir(run_dir / "figures")
    history = read_history(str(run_dir))
    keys = {key: sorted(value) if isinstance(value, dict) else None
            for key, value in history[0].items() if key != "layer_zeros"}
    assert keys == tf_keras_history_keys(tmp_path)
    assert [r["iteration"] for r in history] == [1, 2, 3]
    assert [r["q"] for r in history] == [0.5, 1.0, 1.5]
    zeros = [r["zero_weights"] for r in history]
    assert 0 < zeros[0] < zeros[1] < zeros[2]
    masks = sum(int(np.sum(np.asarray(m) == 0)) for w in wrappers(model) for m in w.masks)
    assert zeros[2] == masks
    # lr(e) = initial_lrs[min(i, 1)] * 0.1 ** #{d <= e % 2}, drops (1,)
    expected = [[0.05, 0.005], [0.01, 0.001], [0.01, 0.001]]
    for record, rates in zip(history, expected):
        assert record["learning_rates"] == pytest.approx(rates, rel=1e-6)
    with open(run_dir / "state.json") as f:
        assert json.load(f) == {"iteration": 3, "epoch": 6, "checkpoint": "checkpoints/iter-0003"}


def test_a_run_resumed_after_two_iterations_repeats_the_uninterrupted_run_bit_for_bit(tmp_path):
    # Without Dropout: its seed generator is restored too, but the comparison is cleaner.
    whole = fit_iterations(pruned_for_iterations(dropout=False), tmp_path / "whole", 3)
    keras.utils.set_random_seed(0)  # the same initialisation as ``whole``
    fit_iterations(pruned_for_iterations(dropout=False), tmp_path / "parts", 2)
    keras.utils.set_random_seed(1)  # another initialisation: restore_run must overwrite it
    resumed = pruned_for_iterations(dropout=False)
    initial_epoch = tf_stdprune.restore_run(resumed, str(tmp_path / "parts"))
    assert initial_epoch == 2
    fit_iterations(resumed, tmp_path / "parts", 3, initial_epoch=initial_epoch)
    for a, b in zip(state_arrays(whole), state_arrays(resumed), strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_wall_time(read_history(str(tmp_path / "parts"))) == \
        without_wall_time(read_history(str(tmp_path / "whole")))


def script_environment():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(HERE))] + sys.path))
    env.pop("TF_USE_LEGACY_KERAS", None)
    return env


@IMPORT_CHECK
def test_the_keras3_procedure_loads_neither_tf_keras_nor_tfmot(tmp_path):
    run_dir = str(tmp_path / "run")
    done = subprocess.run([sys.executable, SCRIPT, run_dir, "--iterations=1"],
                          env=script_environment(), capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert [r["iteration"] for r in read_history(run_dir)] == [1]
    with open(os.path.join(run_dir, "modules.json")) as f:
        assert json.load(f) == []


@pytest.mark.slow
def test_a_run_killed_in_the_middle_of_an_iteration_loses_no_finished_iteration(tmp_path):
    run_dir = str(tmp_path / "run")
    env = script_environment()
    killed = subprocess.run([sys.executable, SCRIPT, run_dir, f"--kill_after_batches={STEPS + 2}"],
                            env=env, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert [r["iteration"] for r in read_history(run_dir)] == [1]
    finished = subprocess.run([sys.executable, SCRIPT, run_dir], env=env, capture_output=True)
    assert finished.returncode == 0, finished.stderr.decode()[-2000:]
    assert [r["iteration"] for r in read_history(run_dir)] == [1, 2, 3]
    sys.path.insert(0, HERE)
    try:
        from iterative_run import run
    finally:
        sys.path.remove(HERE)
    uninterrupted = state_arrays(run(str(tmp_path / "whole")))
    with np.load(os.path.join(run_dir, "final.npz")) as saved:
        for index, value in enumerate(uninterrupted):
            np.testing.assert_array_equal(saved[f"arr_{index}"], value)


def test_restore_run_refuses_other_settings_naming_them_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    fit_iterations(pruned_for_iterations(dropout=False), run_dir, 2)
    before = directory_snapshot(run_dir)
    other = pruned_for_iterations(qualities=(0.5, 2.0, 2.5), dropout=False)
    with pytest.raises(RunDirectoryError, match=r"schedule\..*qualities"):
        tf_stdprune.restore_run(other, str(run_dir))
    assert directory_snapshot(run_dir) == before
    more = pruned_for_iterations(qualities=(0.5, 1.0, 1.5, 2.0), dropout=False)
    assert tf_stdprune.restore_run(more, str(run_dir)) == 2  # appended qualities are allowed


def test_a_damaged_checkpoint_is_named_and_fall_back_resumes_from_the_intact_one(tmp_path):
    run_dir = tmp_path / "run"
    fit_iterations(pruned_for_iterations(dropout=False), run_dir, 2)
    path = run_dir / "checkpoints" / "iter-0002" / "variables.npz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(RunDirectoryError, match="iter-0002 is damaged"):
        tf_stdprune.restore_run(pruned_for_iterations(dropout=False), str(run_dir))
    model = pruned_for_iterations(dropout=False)
    assert tf_stdprune.restore_run(model, str(run_dir), fall_back=True) == 1
    assert [r["iteration"] for r in read_history(str(run_dir))] == [1]


def test_dropout_follows_the_surviving_connections_and_strip_pruning_restores_it(tmp_path):
    rates, models = [], [pruned_for_iterations(), pruned_for_iterations()]
    recorder = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: rates.append(models[0].get_layer(index=5).rate))
    model = models[0]
    drop = model.get_layer(index=5)
    assert dropout.is_dropout(drop) and drop.rate == 0.2
    fit_iterations(model, tmp_path / "run", 2, callbacks=[recorder])
    conv = model.get_layer("prune_low_std_conv")
    remaining = int(np.count_nonzero(np.asarray(conv.masks[0])))
    assert remaining < 108  # C_io: 3 * 3 * 3 * 4 kernel entries
    assert rates[-1] == pytest.approx(0.2 * math.sqrt(remaining / 108))
    assert drop.rate == 0.2  # restored at the end of training
    dropout.rescale_dropout(model)
    assert drop.rate == pytest.approx(0.2 * math.sqrt(remaining / 108))
    assert tf_stdprune.strip_pruning(model).layers[5].rate == 0.2
    rates.clear()
    models.pop(0)
    fit_iterations(models[0], tmp_path / "off", 1, rescale_dropout=False, callbacks=[recorder])
    assert rates == [0.2]


@pytest.mark.parametrize("prune_batchnorm", [False, True])
def test_recalibration_sets_the_moving_statistics_to_the_mean_of_the_batch_statistics(
        prune_batchnorm):
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(4, name="dense")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(keras.layers.BatchNormalization(
        name="bn", momentum=0.9)(hidden)))
    pruned = tf_stdprune.prune_low_std(model, prune_batchnorm=prune_batchnorm)
    assert len(wrappers(pruned)) == 2 + prune_batchnorm  # True: BN runs inside its wrapper
    x = np.random.default_rng(2).normal(size=(24, 5)).astype("float32")
    weights = [np.asarray(w) for w in pruned.weights if "moving" not in w.path]
    assert tf_stdprune.recalibrate_batchnorm(pruned, (x,), 2) == 1  # batches of 32: only one
    assert tf_stdprune.recalibrate_batchnorm(pruned, [x[:8], (x[8:16],), x[16:]], 2) == 2
    kernel, bias = [np.asarray(v, np.float64) for v in model.get_layer("dense").weights]
    outputs = [x[:8] @ kernel + bias, x[8:16] @ kernel + bias]
    bn = model.get_layer("bn")
    np.testing.assert_allclose(np.asarray(bn.moving_mean),
                               np.mean([o.mean(axis=0) for o in outputs], axis=0), atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance),
                               np.mean([o.var(axis=0) for o in outputs], axis=0), rtol=1e-4)
    assert bn.momentum == 0.9
    for before, after in zip(weights, [w for w in pruned.weights if "moving" not in w.path]):
        np.testing.assert_array_equal(before, np.asarray(after))


def test_a_non_finite_weight_stops_the_run_before_anything_is_recorded(tmp_path):
    model = pruned_for_iterations(dropout=False)
    kernel = model.get_layer("prune_low_std_dense").layer.kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(NonFiniteError, match="dense baseline.*kernel"):
        fit_iterations(model, tmp_path / "run", 1)
    assert not os.path.exists(tmp_path / "run" / "state.json")


def test_target_mode_keeps_the_last_iteration_within_the_budget_and_restores_it_exactly(
        tmp_path):
    x, _ = tiny_data()
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int64") + (x[..., 1].mean(axis=(1, 2)) > 0)
    model = pruned_for_iterations(qualities=(0.3,), dropout=False)
    model.fit(x, y, batch_size=BATCH, epochs=15, shuffle=False, verbose=0)  # a dense model
    model.optimizer.iterations.assign(0)  # the pruning run starts at step 0
    run_dir = tmp_path / "run"
    history = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0,
                        callbacks=tf_stdprune.iterative_callbacks(
                            str(run_dir), 1, 0.01, lr_drops=(), validation_data=(x, y),
                            recalibration_data=(x, y), recalibration_batches=2,
                            batch_size=BATCH, figures=False, target_accuracy_drop=5.0,
                            q_step=10.0))
    with open(run_dir / "target.json") as f:
        summary = json.load(f)
    assert (summary["kept_iteration"], summary["rejected_iteration"]) == (1, 2)
    assert summary["kept_q"] == pytest.approx(0.3) and summary["rejected_q"] == pytest.approx(10.3)
    assert len(history.epoch) == 2  # stopped after the rejected iteration
    records = read_history(str(run_dir))
    assert [r.get("rejected", False) for r in records] == [False, True]
    assert records[1]["accuracy_drop"] > 5.0 >= records[0]["accuracy_drop"]
    with np.load(run_dir / "checkpoints" / "iter-0001" / "variables.npz") as kept:
        for index, value in enumerate(state_arrays(model)):
            prefix, number = ("m", index) if index < len(model.variables) else \
                ("o", index - len(model.variables))
            np.testing.assert_array_equal(kept[f"{prefix}{number:05d}"], value)

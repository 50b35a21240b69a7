"""The reference experiment's procedure through ONE model.fit: lr schedule, masks, history, report, figures."""
import json
import os

import matplotlib.image
import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune import __main__ as cli
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.callbacks import IterationLearningRate
from tf_stdprune.keras2.run_state import read_history

from conftest import tiny_cnn

ITERATIONS, EPOCHS, BATCH = 3, 2, 16


class MaskRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.masks, self.rates = [], []

    def on_epoch_end(self, epoch, logs=None):
        self.rates.append(float(keras.backend.get_value(self.model.optimizer.learning_rate)))
        self.masks.append([m.numpy().copy() for l in self.model.layers
                           if isinstance(l, tf_stdprune.PruneLowStd) for _, m, _ in l.pruning_vars])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    run_dir = str(tmp_path_factory.mktemp("run"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int64") + (x[..., 1].mean(axis=(1, 2)) > 0)
    steps = len(x) // BATCH
    model = tf_stdprune.prune_low_std(tiny_cnn(), pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.5, 0.8, 1.1], steps_per_iteration=EPOCHS * steps))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
    recorder = MaskRecorder()
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH)
    model.fit(data, epochs=ITERATIONS * EPOCHS, verbose=0, callbacks=tf_stdprune.iterative_callbacks(
        run_dir, EPOCHS, [0.1, 0.05], lr_drops=(1,), lr_drop_factor=0.1,
        train_eval_data=data, validation_data=data.take(2),
        recalibration_data=data, recalibration_batches=2) + [recorder])
    return run_dir, model, recorder


def test_learning_rate_seen_by_optimizer_follows_schedule(finished_run):
    run_dir, _, recorder = finished_run
    expected = [0.1, 0.01, 0.05, 0.005, 0.05, 0.005]  # per-iteration initial rate, drop at epoch 1
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    logged = [lr for record in read_history(run_dir) for lr in record["learning_rates"]]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    rule = IterationLearningRate([0.05] + [0.01] * 9 + [0.001, 0.001], 20, (3, 10, 16))
    assert [rule.rate(e) for e in (0, 2, 3, 9, 10, 16, 19, 20, 239, 260)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005, 0.01, 0.000001, 0.001])


def test_masks_only_shrink_and_prune_each_iteration(finished_run):
    _, _, recorder = finished_run
    for earlier, later in zip(recorder.masks, recorder.masks[1:]):
        for a, b in zip(earlier, later):
            assert np.all(b <= a)
    zeros = [sum(int((m == 0).sum()) for m in masks) for masks in recorder.masks[1::EPOCHS]]
    assert zeros[0] < zeros[1] < zeros[2]


def test_history_and_report_agree_with_independent_count(finished_run):
    run_dir, model, _ = finished_run
    history = read_history(run_dir)
    assert [r["iteration"] for r in history] == [1, 2, 3]
    assert [round(r["q"], 6) for r in history] == [0.5, 0.8, 1.1]
    stripped = tf_stdprune.strip_pruning(model)
    kernels = [l.kernel.numpy() for l in stripped.layers if hasattr(l, "kernel")]
    gammas = [l.gamma.numpy() for l in stripped.layers if isinstance(l, keras.layers.BatchNormalization)]
    zeros = sum(int(np.sum(t == 0)) for t in kernels + gammas)
    total = sum(int(np.prod(w.shape)) for w in stripped.weights)
    assert history[-1]["zero_weights"] == zeros
    assert history[-1]["total_parameters"] == total
    assert history[-1]["compression_rate"] == pytest.approx(total / (total - zeros))
    with open(os.path.join(run_dir, "report.json")) as f:
        report = json.load(f)
    assert report["zero_weights"] == zeros
    assert report["total_weights"] == sum(t.size for t in kernels + gammas)
    for record in history:
        for stage in ("before", "after"):
            assert {"train_top1", "val_top1", "train_loss", "val_loss"} <= set(record[stage])


def test_each_record_holds_the_mcnemar_change_of_validation_top1_against_dense(finished_run):
    run_dir, model, _ = finished_run
    rng = np.random.default_rng(0)  # the fixture's data again; validation_data = 2 batches
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int64") + (x[..., 1].mean(axis=(1, 2)) > 0)
    with np.load(os.path.join(run_dir, "baseline_predictions.npz")) as saved:
        dense, labels = saved["predicted"], saved["labels"]
    np.testing.assert_array_equal(labels, y[:2 * BATCH])
    baseline = json.load(open(os.path.join(run_dir, "baseline.json")))
    assert np.mean(dense == labels) == pytest.approx(baseline["val_top1"], abs=1e-6)
    last = read_history(run_dir)[-1]
    pruned = np.argmax(model.predict(x[:2 * BATCH], verbose=0), axis=1)
    assert last["val_top1_change"] == tf_stdprune.accuracy_change(dense, pruned, labels).to_dict()
    assert 100 * (last["after"]["val_top1"] - baseline["val_top1"]) == pytest.approx(
        last["val_top1_change"]["change"], abs=1e-4)


def test_figures_are_real_pngs(finished_run):
    run_dir, _, _ = finished_run
    figures = sorted(os.listdir(os.path.join(run_dir, "figures")))
    assert len(figures) == 5
    for name in figures:
        path = os.path.join(run_dir, "figures", name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(path) > 10_000
        height, width, _ = matplotlib.image.imread(path).shape
        assert height >= 400 and width >= 600


def test_cli_regenerates_report_and_figures(finished_run, capsys):
    run_dir, _, _ = finished_run
    figure = os.path.join(run_dir, "figures", "fig3_accuracy_vs_compression_rate.png")
    os.remove(figure)
    assert cli.main(["report", run_dir]) == 0
    out = capsys.readouterr().out
    assert "Final Parameters:" in out and "Compression rate: x" in out
    assert os.path.exists(figure)
    with pytest.raises(SystemExit):
        cli.main(["report", os.path.join(run_dir, "missing")])


def test_tensorboard_scalars_written(finished_run):
    run_dir, _, _ = finished_run
    events = [p for p in os.listdir(os.path.join(run_dir, "tensorboard")) if "tfevents" in p]
    assert events


def test_batchnorm_recalibration_matches_batch_statistics():
    """BN first: its statistics must become the mean of the per-batch input moments."""
    model = tf_stdprune.prune_low_std(keras.Sequential([
        keras.layers.BatchNormalization(input_shape=(4,)), keras.layers.Dense(2)]))
    model(tf.zeros([1, 4]))
    wrappers = [l for l in model.layers if isinstance(l, tf_stdprune.PruneLowStd)]
    steps = [int(l.pruning_step.numpy()) for l in wrappers]
    weights = [w.numpy().copy() for w in model.trainable_weights]
    rng = np.random.default_rng(1)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(32, 4)).astype("float32") for _ in range(3)]
    used = tf_stdprune.recalibrate_batchnorm(model, batches, batches=3)
    assert used == 3
    bn = wrappers[0].layer
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([b.mean(0) for b in batches], 0), rtol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean([b.var(0) for b in batches], 0),
                               rtol=1e-4)
    assert [int(l.pruning_step.numpy()) for l in wrappers] == steps
    for before, after in zip(weights, model.trainable_weights):
        np.testing.assert_array_equal(before, after.numpy())
    assert bn.momentum == 0.99

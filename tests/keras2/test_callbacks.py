"""IterationLearningRate against hand-derived SGD updates; IterativePruning's data handling,
metric names, baseline, TensorBoard scalars and the guards that keep a run directory sane."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.callbacks import UpdatePruningStep
from tf_stdprune.keras2.recalibration import recalibrate_batchnorm
from tf_stdprune.keras2.run_state import read_history
from tf_stdprune.keras2.wrapper import optimizer_slots

from conftest import fresh_run_inputs, tiny_cnn

EPOCHS, BATCH = 2, 16


class WeightRecorder(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.weights = [self.model.get_weights()[0].copy()]

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append(self.model.get_weights()[0].copy())


def test_learning_rate_schedule_drives_the_actual_sgd_updates():
    """One full-batch SGD step per epoch: w_{e+1} = w_e - lr_e * 2/n X^T (X w_e - y)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 2)).astype("float32")
    y = rng.normal(size=(8, 1)).astype("float32")
    model = keras.Sequential([keras.layers.Dense(1, use_bias=False, input_shape=(2,))])
    model.compile(keras.optimizers.SGD(1.0), "mse")
    recorder = WeightRecorder()
    schedule = tf_stdprune.IterationLearningRate([0.1, 0.05], 3, drops=(1, 2), factor=0.5)
    model.fit(x, y, batch_size=8, epochs=8, shuffle=False, verbose=0,
              callbacks=[schedule, recorder])
    # iteration 0: 0.1, /2 at its epoch 1, /2 again at 2; iterations 1, 2: 0.05 (the last repeats)
    expected = [0.1, 0.05, 0.025, 0.05, 0.025, 0.0125, 0.05, 0.025]
    for epoch, lr in enumerate(expected):
        w = recorder.weights[epoch].astype(np.float64)
        gradient = 2.0 / len(x) * x.T.astype(np.float64) @ (x @ w - y)
        np.testing.assert_allclose(recorder.weights[epoch + 1], w - lr * gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kwargs, argument", [
    (dict(initial_lrs=[], epochs_per_iteration=2), "initial_lrs"),
    (dict(initial_lrs=[0.1, -0.01], epochs_per_iteration=2), "initial_lrs"),
    (dict(initial_lrs=[float("nan")], epochs_per_iteration=2), "initial_lrs"),
    (dict(initial_lrs=0.1, epochs_per_iteration=0), "epochs_per_iteration"),
    (dict(initial_lrs=0.1, epochs_per_iteration=2.5), "epochs_per_iteration"),
    (dict(initial_lrs=0.1, epochs_per_iteration=2, drops=(3, -1)), "drops"),
    (dict(initial_lrs=0.1, epochs_per_iteration=2, factor=0), "factor"),
])
def test_learning_rate_arguments_are_checked(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        tf_stdprune.IterationLearningRate(**kwargs)


def test_learning_rate_refuses_an_optimizer_with_a_schedule(tiny_data):
    model = tiny_cnn()
    decay = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    model.compile(keras.optimizers.SGD(decay), "sparse_categorical_crossentropy")
    with pytest.raises(TypeError, match="float learning rate"):
        model.fit(*tiny_data, epochs=1, verbose=0,
                  callbacks=[tf_stdprune.IterationLearningRate([0.1], 1)])


def pruned_tiny(steps, metrics=("accuracy",)):
    schedule = tf_stdprune.StdPruningSchedule([0.5, 1.0], steps_per_iteration=EPOCHS * steps)
    model = tf_stdprune.prune_low_std(tiny_cnn(), pruning_schedule=schedule)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=list(metrics))
    return model


def scalars(log_dir):
    """``{tag: {step: value}}`` of every TensorBoard event file under ``log_dir``."""
    values = {}
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for value in event.summary.value:
                values.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    return values


@pytest.fixture(scope="module")
def array_run(tmp_path_factory):
    """Two iterations on (x, y) arrays, metrics=["accuracy"], evaluation on a tuple."""
    x, y, run_dir = fresh_run_inputs(tmp_path_factory)
    model = pruned_tiny(len(x) // BATCH)
    dense = model.evaluate(x[:32], y[:32], batch_size=32, verbose=0, return_dict=True)
    model.fit(x, y, batch_size=BATCH, epochs=2 * EPOCHS, shuffle=False, verbose=0,
              callbacks=tf_stdprune.iterative_callbacks(
                  run_dir, EPOCHS, [0.1], lr_drops=(1,), validation_data=(x[:32], y[:32]),
                  recalibration_data=(x,), recalibration_batches=2, figures=False))
    final = model.evaluate(x[:32], y[:32], batch_size=32, verbose=0, return_dict=True)
    return run_dir, model, dense, final


def test_history_logs_top1_under_its_own_name_and_matches_evaluate(array_run):
    run_dir, _, dense, final = array_run
    history = read_history(run_dir)
    assert [r["iteration"] for r in history] == [1, 2]
    with open(os.path.join(run_dir, "baseline.json")) as f:
        baseline = json.load(f)
    assert baseline["val_top1"] == pytest.approx(dense["accuracy"], abs=1e-6)
    assert baseline["val_loss"] == pytest.approx(dense["loss"], rel=1e-5)
    # the "after" numbers of the last iteration are the final model's
    assert history[-1]["after"]["val_top1"] == pytest.approx(final["accuracy"], abs=1e-6)
    assert history[-1]["after"]["val_loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert "val_accuracy" not in history[-1]["after"] and "val_top1" in history[0]["before"]


def test_tensorboard_scalars_equal_the_history(array_run):
    run_dir, _, _, _ = array_run
    history = read_history(run_dir)
    logged = scalars(os.path.join(run_dir, "tensorboard"))
    for record in history:
        step = record["iteration"]
        assert logged["q"][step] == pytest.approx(record["q"])
        assert logged["zero_parameters_rate"][step] == pytest.approx(record["zero_parameters_rate"])
        assert logged["after/val_top1"][step] == pytest.approx(record["after"]["val_top1"])
        assert logged["before/val_loss"][step] == pytest.approx(record["before"]["val_loss"])


def _files(run_dir):
    return {name: open(os.path.join(run_dir, name), "rb").read()
            for name in ("history.jsonl", "state.json")}


def test_a_new_fit_never_overwrites_or_misreads_a_run(array_run, tiny_data):
    run_dir, _, _, _ = array_run
    x, y = tiny_data
    before = _files(run_dir)
    callbacks = lambda: tf_stdprune.iterative_callbacks(  # noqa: E731
        run_dir, EPOCHS, [0.1], validation_data=(x, y), recalibration_data=(x,))
    fresh = pruned_tiny(len(x) // BATCH)
    with pytest.raises(ValueError, match="restore_run"):  # a new model, same run_dir
        fresh.fit(x, y, batch_size=BATCH, epochs=3 * EPOCHS, verbose=0, callbacks=callbacks())
    restored = pruned_tiny(len(x) // BATCH)
    assert tf_stdprune.restore_run(restored, run_dir) == 2 * EPOCHS
    with pytest.raises(ValueError, match="initial_epoch"):  # restored, initial_epoch forgotten
        restored.fit(x, y, batch_size=BATCH, epochs=3 * EPOCHS, verbose=0, callbacks=callbacks())
    assert _files(run_dir) == before


def test_dataset_of_unknown_size_needs_steps_per_epoch(tmp_path, tiny_data):
    x, y = tiny_data
    data = tf.data.Dataset.from_tensor_slices((x, y)).filter(lambda *_: True).batch(BATCH)
    assert data.cardinality() == tf.data.UNKNOWN_CARDINALITY
    model = pruned_tiny(len(x) // BATCH)
    callbacks = lambda: tf_stdprune.iterative_callbacks(  # noqa: E731
        str(tmp_path), EPOCHS, [0.1], validation_data=data, recalibration_data=data,
        recalibration_batches=1, figures=False)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        model.fit(data, epochs=EPOCHS, verbose=0, callbacks=callbacks())
    model.fit(data.repeat(), steps_per_epoch=len(x) // BATCH, epochs=2 * EPOCHS, verbose=0,
              callbacks=callbacks())
    history = read_history(str(tmp_path))
    assert [(r["iteration"], r["q"]) for r in history] == [(1, 0.5), (2, 1.0)]


def test_batchnorm_model_needs_recalibration_data_or_an_explicit_opt_out(tmp_path, tiny_data):
    x, y = tiny_data
    model = pruned_tiny(len(x) // BATCH)
    with pytest.raises(ValueError, match="recalibration_batches=0"):
        model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                  callbacks=tf_stdprune.iterative_callbacks(str(tmp_path), EPOCHS, [0.1]))
    with pytest.raises(TypeError, match="validation_data"):
        tf_stdprune.iterative_callbacks(str(tmp_path), EPOCHS, [0.1], validation_data=[x, y])


def test_recalibration_of_a_conv_model_matches_numpy_and_touches_nothing_else():
    """4-D inputs take the fused kernel: the variance is the unbiased one (ddof=1)."""
    model = pruned_tiny(4)
    conv_wrapper, bn_wrapper = model.layers[0], model.layers[1]
    conv_wrapper.pruning_obj.update_masks(1.0)
    state = [v.numpy().copy() for v in model.weights
             if "moving_" not in v.name]  # kernels, gammas, masks, sigmas, pruning steps
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.0, 2.0, size=(16, 8, 8, 3)).astype("float32") for _ in range(3)]
    assert recalibrate_batchnorm(model, tf.data.Dataset.from_tensor_slices(
        np.concatenate(batches)).batch(16), 3) == 3
    outputs = [conv_wrapper.layer(b).numpy().reshape(-1, 4).astype(np.float64) for b in batches]
    bn = bn_wrapper.layer
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([o.mean(0) for o in outputs], 0),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.mean([o.var(0, ddof=1) for o in outputs], 0), rtol=1e-4)
    after = [v.numpy() for v in model.weights if "moving_" not in v.name]
    for a, b in zip(state, after):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="from_tensor_slices"):
        recalibrate_batchnorm(model, (batches[0],), 1)


class LogTypes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self._supports_tf_logs = True
        self.types = []

    def on_train_batch_end(self, batch, logs=None):
        self.types.append(type(logs["loss"]))


def test_update_pruning_step_leaves_batch_logs_as_tensors(tiny_data):
    # Keras converts every batch's logs to numpy unless all batch-hook callbacks take tensors.
    model = tf_stdprune.prune_low_std(
        tiny_cnn(), pruning_schedule=tf_stdprune.StdPruningSchedule([0.5], steps_per_iteration=2))
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy())
    recorder = LogTypes()
    model.fit(*tiny_data, batch_size=16, epochs=1, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep(), recorder])
    assert recorder.types and all(issubclass(t, tf.Tensor) for t in recorder.types)


class CountedReads(UpdatePruningStep):
    """Records the global step of every batch at which the flags are read."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.batches, self.read_at = 0, []

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1
        super().on_train_batch_end(batch, logs)

    def _mask_changed_layers(self):
        self.read_at.append(self.batches)
        super()._mask_changed_layers()


def test_update_pruning_step_reads_the_flags_only_where_masks_can_change(tiny_data):
    """Steps 1, 6, 11, 16 prune (every 5 steps); 8 batches an epoch: reads at the pruning
    batches and at each epoch's first batch (steps 1 and 9), no other; and the pruned
    weights and momentum slots still end exactly 0."""
    model = tf_stdprune.prune_low_std(
        tiny_cnn(), pruning_schedule=tf_stdprune.StdPruningSchedule([0.5, 1.0, 1.5, 2.0],
                                                                   steps_per_iteration=5))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    callback = CountedReads()
    model.fit(*tiny_data, batch_size=8, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert callback.read_at == [1, 6, 9, 11, 16]
    pruned_count = 0
    for layer in model.layers:
        for weight, mask, _ in getattr(layer, "pruning_vars", []):
            pruned = mask.numpy() == 0
            pruned_count += pruned.sum()
            assert (weight.numpy()[pruned] == 0).all()
            for slot in optimizer_slots(model.optimizer, weight):
                assert (slot.numpy()[pruned] == 0).all()
    assert pruned_count > 0

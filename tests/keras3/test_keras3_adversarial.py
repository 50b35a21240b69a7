"""Keras 3: user mistakes and unusual models either work exactly or fail loudly; files are
never half written, and the user's model is never changed."""
import os
import shutil
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras3.helpers import BACKEND

import tf_stdprune
from tf_stdprune.keras3.wrapper import PruneLowStd
from tf_stdprune.procedure.run_directory import RunDirectoryError, acquire_lock, release_lock

X = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
Y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
STEPS = 4  # 16 samples, batch 4


def _schedule(qualities=(0.5, 1.0)):
    return tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration=STEPS)


def _dense():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, name="a"),
                             keras.layers.Dense(2, name="b")])


def _pruned(**compile_kwargs):
    pruned = tf_stdprune.prune_low_std(_dense(), pruning_schedule=_schedule())
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9), "mse", **compile_kwargs)
    return pruned


def _fit(model, epochs=1, **kwargs):
    model.fit(X, Y, batch_size=4, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[tf_stdprune.UpdatePruningStep()], **kwargs)


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _values(model):
    return [_np(v) for v in model.variables]


def _exactly_pruned(wrapper):
    """Stored weights are exactly 0 where the mask is 0, and the mask pruned something."""
    for weight, mask in zip(wrapper.pruned_weights, wrapper.masks):
        assert np.all(_np(weight)[_np(mask) == 0] == 0.0)
        assert np.any(_np(mask) == 0)


def test_a_shared_layer_is_wrapped_once_and_both_calls_compute_with_the_mask():
    inputs = keras.Input((4,))
    shared = keras.layers.Dense(4, name="shared")
    outputs = keras.layers.Dense(2, name="head")(keras.layers.Concatenate()(
        [shared(inputs), shared(keras.layers.Activation("tanh")(inputs))]))
    model = keras.Model(inputs, outputs)
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=_schedule())
    pruned.compile(keras.optimizers.SGD(0.05), "mse")
    _fit(pruned)
    found = [l for l in tf_stdprune.keras3.prune.wrappers(pruned) if l.layer.name == "shared"]
    assert len({id(w) for w in found}) == 1
    wrapper = found[0]
    _exactly_pruned(wrapper)
    # both branches use w * m: the stripped model (dense w * m) gives the same outputs
    stripped = tf_stdprune.strip_pruning(pruned)
    np.testing.assert_allclose(_np(stripped(X)), _np(pruned(X)), rtol=1e-6, atol=1e-6)
    assert tf_stdprune.sparsity_report(pruned).total_weights == 4 * 4 + 8 * 2  # counted once


def test_a_multi_input_multi_output_model_prunes_every_branch():
    left, right = keras.Input((4,), name="left"), keras.Input((3,), name="right")
    joined = keras.layers.Concatenate()([keras.layers.Dense(5, name="l")(left),
                                         keras.layers.Dense(5, name="r")(right)])
    model = keras.Model([left, right], [keras.layers.Dense(2, name="o1")(joined),
                                        keras.layers.Dense(1, name="o2")(joined)])
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=_schedule())
    pruned.compile(keras.optimizers.SGD(0.05), ["mse", "mse"])
    xr = np.random.default_rng(2).normal(size=(16, 3)).astype("float32")
    pruned.fit([X, xr], [Y, Y[:, :1]], batch_size=4, epochs=1, verbose=0,
               callbacks=[tf_stdprune.UpdatePruningStep()])
    found = tf_stdprune.keras3.prune.wrappers(pruned)
    assert sorted(w.layer.name for w in found) == ["l", "o1", "o2", "r"]
    for wrapper in found:
        _exactly_pruned(wrapper)
    outputs = tf_stdprune.strip_pruning(pruned)([X, xr])
    np.testing.assert_allclose(_np(outputs[1]), _np(pruned([X, xr])[1]), rtol=1e-5, atol=1e-6)


def test_mixed_bfloat16_prunes_float32_weights_with_uint8_masks():
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        pruned = _pruned()
        _fit(pruned)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    wrapper = pruned.layers[0]
    assert wrapper.masks[0].dtype == "uint8" and wrapper.layer.kernel.dtype == "float32"
    _exactly_pruned(wrapper)


def test_an_optimizer_that_already_took_steps_is_refused_before_any_pruning():
    """The pruning step is optimizer.iterations: an optimizer reused from an earlier fit
    would skip the first pruning silently, so fit raises naming the fix."""
    dense = _dense()
    optimizer = keras.optimizers.SGD(0.05)
    dense.compile(optimizer, "mse")
    dense.fit(X, Y, batch_size=4, epochs=1, verbose=0)  # 4 steps taken
    pruned = tf_stdprune.prune_low_std(dense, pruning_schedule=_schedule())
    pruned.compile(optimizer, "mse")
    before = _values(pruned)
    with pytest.raises(ValueError, match="optimizer.*already took 4 steps.*fresh optimizer"):
        _fit(pruned)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(pruned)))


@pytest.mark.parametrize("jit_compile", [False, True])
def test_pruned_weights_stay_exactly_zero_with_and_without_jit_compile(jit_compile):
    if BACKEND == "jax" and not jit_compile:
        jit_compile = "auto"
    pruned = _pruned(jit_compile=jit_compile)
    _fit(pruned, epochs=3)
    for wrapper in tf_stdprune.keras3.prune.wrappers(pruned):
        _exactly_pruned(wrapper)


def _iterative_fit(model, run_dir, epochs, initial_epoch=0):
    model.fit(X, Y, batch_size=4, epochs=epochs, initial_epoch=initial_epoch, shuffle=False,
              verbose=0, callbacks=tf_stdprune.iterative_callbacks(
                  str(run_dir), 1, [0.05], lr_drops=(), recalibration_batches=0,
                  validation_data=(X, Y), figures=False))


def test_a_deleted_checkpoint_is_named_and_fall_back_resumes_from_the_one_before(tmp_path):
    run_dir = tmp_path / "run"
    _iterative_fit(_pruned(), run_dir, 2)
    shutil.rmtree(run_dir / "checkpoints" / "iter-0002")
    with pytest.raises(RunDirectoryError, match="iter-0002"):
        tf_stdprune.restore_run(_pruned(), str(run_dir))
    assert tf_stdprune.restore_run(_pruned(), str(run_dir), fall_back=True) == 1


def test_a_truncated_checkpoint_is_named_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    _iterative_fit(_pruned(), run_dir, 1)
    path = run_dir / "checkpoints" / "iter-0001" / "variables.npz"
    path.write_bytes(path.read_bytes()[:300])
    model = _pruned()
    before = _values(model)
    with pytest.raises(RunDirectoryError, match="iter-0001"):
        tf_stdprune.restore_run(model, str(run_dir))
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(model)))


def test_a_run_directory_that_is_a_file_is_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "run"
    path.write_text("the user's notes")
    model = _pruned()
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        tf_stdprune.restore_run(model, str(path))
    with pytest.raises(RunDirectoryError, match="is a file, not a directory"):
        _iterative_fit(model, path, 1)
    assert path.read_text() == "the user's notes"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_run_directory_fails_before_training(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(stat.S_IRUSR | stat.S_IXUSR)
    model = _pruned()
    before = _values(model)
    try:
        with pytest.raises(OSError, match="Cannot write"):
            _iterative_fit(model, run_dir, 1)
    finally:
        run_dir.chmod(stat.S_IRWXU)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(model)))
    assert os.listdir(run_dir) == []


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tf_stdprune.procedure.run_directory "
         "import acquire_lock; acquire_lock(sys.argv[1]); print('locked', flush=True); "
         "time.sleep(60)", str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        model = _pruned()
        with pytest.raises(RunDirectoryError, match=f"in use by process {holder.pid}"):
            tf_stdprune.restore_run(model, str(run_dir))
        with pytest.raises(RunDirectoryError, match=f"in use by process {holder.pid}"):
            _iterative_fit(model, run_dir, 1)
    finally:
        holder.kill()
        holder.wait()
    assert acquire_lock(str(run_dir))  # the lock of a process that is gone is taken over
    release_lock(str(run_dir))


def _load_without_tf_stdprune(path, tmp_path):
    code = ("import sys, keras, numpy as np\n"
            "model = keras.saving.load_model(sys.argv[1])\n"
            "assert 'tf_stdprune' not in sys.modules\n"
            "np.save(sys.argv[2], keras.ops.convert_to_numpy(model(np.load(sys.argv[3]))))\n")
    np.save(tmp_path / "x.npy", X)
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    return subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "y.npy"),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, env=env)


def test_a_stripped_keras_file_loads_without_tf_stdprune_and_a_pruned_one_names_it(tmp_path):
    pruned = _pruned()
    _fit(pruned)
    stripped = tf_stdprune.strip_pruning(pruned)
    stripped.save(tmp_path / "stripped.keras")
    done = _load_without_tf_stdprune(tmp_path / "stripped.keras", tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), _np(stripped(X)), rtol=1e-6)
    pruned.save(tmp_path / "pruned.keras")
    done = _load_without_tf_stdprune(tmp_path / "pruned.keras", tmp_path)
    assert done.returncode != 0 and "PruneLowStd" in done.stderr
    loaded = keras.saving.load_model(tmp_path / "pruned.keras")  # with tf_stdprune imported
    np.testing.assert_allclose(_np(loaded(X)), _np(pruned(X)), rtol=1e-6)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="model.export writes a TF SavedModel")
def test_keras_model_export_of_a_stripped_model_serves_the_pruned_outputs(tmp_path):
    import tensorflow as tf

    pruned = _pruned()
    _fit(pruned)
    stripped = tf_stdprune.strip_pruning(pruned)
    before = _values(pruned)
    stripped.export(str(tmp_path / "exported"), verbose=False)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = loaded.serve(X)
    np.testing.assert_allclose(served.numpy(), _np(pruned(X)), rtol=1e-6, atol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(before, _values(pruned)))

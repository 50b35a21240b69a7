"""A run directory resumes only the run it holds, has one owner, never records a diverged
iteration, and names the damaged file (falling back to the previous checkpoint on request)."""
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import tf_stdprune
from tf_stdprune.keras2 import run_state
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.iterative import iterative_callbacks, warn_unreachable_drops

from conftest import fresh_run_inputs, tiny_cnn

EPOCHS, BATCH, STEPS = 1, 16, 4


def pruned(qualities=(0.6, 1.2), std_mode="initial", optimizer=None, model=None,
           layer_quality=None):
    schedule = tf_stdprune.StdPruningSchedule(list(qualities), steps_per_iteration=EPOCHS * STEPS)
    model = tf_stdprune.prune_low_std(model or tiny_cnn(), pruning_schedule=schedule,
                                      std_mode=std_mode, layer_quality=layer_quality)
    model.compile(optimizer or keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def callbacks(run_dir, x, y, epochs=EPOCHS):
    return iterative_callbacks(run_dir, epochs, [0.1], lr_drops=(), validation_data=(x, y),
                               recalibration_data=(x,), recalibration_batches=1, figures=False)


class Snapshots(keras.callbacks.Callback):
    """The model's weights at the end of every epoch (after the checkpoint was written)."""

    def __init__(self):
        super().__init__()
        self.weights = []

    def on_epoch_end(self, epoch, logs=None):
        self.weights.append([w.numpy().copy() for w in self.model.weights])


def files(run_dir):
    """``{relative path: bytes}`` of every file under ``run_dir``."""
    out = {}
    for root, _, names in os.walk(run_dir):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = f.read()
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A two-iteration run, its data, and the weights after each iteration."""
    x, y, run_dir = fresh_run_inputs(tmp_path_factory)
    model, snapshots = pruned(), Snapshots()
    model.fit(x, y, batch_size=BATCH, epochs=2 * EPOCHS, shuffle=False, verbose=0,
              callbacks=callbacks(run_dir, x, y) + [snapshots])
    return run_dir, x, y, snapshots.weights


@pytest.fixture
def copy(finished, tmp_path):
    run_dir, x, y, weights = finished
    target = str(tmp_path / "run")
    shutil.copytree(run_dir, target)
    return target, x, y, weights


def test_run_json_records_the_settings_that_define_the_run(finished):
    run_dir = finished[0]
    with open(os.path.join(run_dir, "run.json")) as f:
        recorded = json.load(f)
    assert recorded == run_state.run_settings(pruned(), epochs_per_iteration=EPOCHS)
    assert recorded["schedule"]["config"]["qualities"] == [0.6, 1.2]
    assert recorded["std_mode"] == "initial" and recorded["layer_quality"] == {}
    assert recorded["optimizer"]["class_name"] == "SGD"
    assert recorded["optimizer"]["config"]["momentum"] == pytest.approx(0.9)
    assert "learning_rate" not in recorded["optimizer"]["config"]
    assert recorded["parameters"] == sum(int(np.prod(w.shape)) for w in tiny_cnn().weights)


@pytest.mark.parametrize("changed, named", [
    (dict(qualities=(0.6, 1.3)), "schedule.config.qualities: [0.6, 1.2]"),
    (dict(std_mode="surviving"), 'std_mode: "initial" (run directory) vs "surviving"'),
    (dict(layer_quality={"dense": 0.5}), "layer_quality: {}"),
    (dict(optimizer=keras.optimizers.Adam(0.1)), "optimizer.class_name"),
    (dict(model=tiny_cnn(num_classes=4)), "architecture"),
])
def test_restore_refuses_each_changed_setting_and_changes_nothing(copy, changed, named):
    run_dir, _, _, _ = copy
    before = files(run_dir)
    with pytest.raises(ValueError, match="other settings") as error:
        tf_stdprune.restore_run(pruned(**changed), run_dir)
    assert named in str(error.value)
    assert files(run_dir) == before


def test_one_error_names_every_difference_and_fit_refuses_a_new_iteration_length(copy):
    run_dir, x, y, _ = copy
    before = files(run_dir)
    with pytest.raises(ValueError) as error:
        tf_stdprune.restore_run(pruned(qualities=(0.5, 1.2), std_mode="all"), run_dir)
    assert "schedule.config.qualities" in str(error.value) and "std_mode" in str(error.value)
    model = pruned(qualities=(0.6, 1.2))
    schedule = model.layers[0].pruning_schedule
    schedule.steps_per_iteration = 2 * STEPS  # two epochs per iteration instead of one
    with pytest.raises(ValueError, match="epochs_per_iteration: 1 .* vs 2"):
        model.fit(x, y, batch_size=BATCH, epochs=6, verbose=0, callbacks=callbacks(run_dir, x, y, 2))
    assert files(run_dir) == before
    assert not os.path.exists(os.path.join(run_dir, "lock"))


def test_more_qualities_appended_extend_the_run(copy):
    run_dir, x, y, _ = copy
    model = pruned(qualities=(0.6, 1.2, 1.5))
    epoch = tf_stdprune.restore_run(model, run_dir)
    assert epoch == 2 * EPOCHS
    model.fit(x, y, batch_size=BATCH, epochs=3 * EPOCHS, initial_epoch=epoch, shuffle=False,
              verbose=0, callbacks=callbacks(run_dir, x, y))
    assert [r["q"] for r in run_state.read_history(run_dir)] == pytest.approx([0.6, 1.2, 1.5])
    with open(os.path.join(run_dir, "run.json")) as f:
        assert json.load(f)["schedule"]["config"]["qualities"] == [0.6, 1.2, 1.5]
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["iter-0002", "iter-0003"]


HOLDER = textwrap.dedent("""
    import sys, time
    from tf_stdprune.keras2 import run_state
    run_state.acquire_lock(sys.argv[1])
    print("locked", flush=True)
    time.sleep(120)
""")


def test_a_second_process_on_a_live_run_is_refused_and_a_stale_lock_taken_over(copy, caplog):
    run_dir, _, _, _ = copy
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"in use by process {holder.pid} on host"):
            tf_stdprune.restore_run(pruned(), run_dir)
    finally:
        holder.kill()
        holder.wait()
    with open(os.path.join(run_dir, "lock")) as f:
        assert json.load(f)["pid"] == holder.pid  # the killed holder left its lock behind
    with caplog.at_level(logging.WARNING):
        assert tf_stdprune.restore_run(pruned(), run_dir) == 2 * EPOCHS
    assert "no longer running" in caplog.text
    with open(os.path.join(run_dir, "lock")) as f:
        assert json.load(f)["pid"] == os.getpid()
    run_state.release_lock(run_dir)
    assert not os.path.exists(os.path.join(run_dir, "lock"))


def test_a_finished_fit_releases_the_lock(finished):
    assert not os.path.exists(os.path.join(finished[0], "lock"))


def test_nan_weights_stop_the_run_and_keep_the_last_good_iteration(copy):
    run_dir, x, y, weights = copy
    model = pruned(qualities=(0.6, 1.2, 1.5))
    epoch = tf_stdprune.restore_run(model, run_dir)
    before = files(run_dir)
    dense = model.layers[-1]
    poison = keras.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: dense.layer.kernel.assign(
        np.full(dense.layer.kernel.shape, np.nan, np.float32)))
    with pytest.raises(FloatingPointError, match=f"iteration 3, weight {dense.layer.name}/kernel"):
        model.fit(x, y, batch_size=BATCH, epochs=3 * EPOCHS, initial_epoch=epoch, shuffle=False,
                  verbose=0, callbacks=[poison] + callbacks(run_dir, x, y))
    records = lambda found: {k: v for k, v in found.items()  # noqa: E731
                             if k.startswith("checkpoints") or k in ("history.jsonl", "state.json")}
    assert records(files(run_dir)) == records(before)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["iter-0001", "iter-0002"]


def test_a_nan_loss_in_the_baseline_stops_before_pruning(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    x[0, 0, 0, 0] = np.inf
    y = rng.integers(0, 3, size=64)
    with pytest.raises(FloatingPointError, match="the dense baseline"):
        pruned().fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
                     callbacks=callbacks(str(tmp_path), x, y))
    assert not os.path.exists(tmp_path / "history.jsonl")


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    with open(path, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)


def _empty(path):
    open(path, "wb").close()


def _garbage(path):
    with open(path, "a") as f:
        f.write("{not json\n")


LAST = "checkpoints/iter-0002/"


@pytest.mark.parametrize("damaged, damage, intact", [
    (LAST + "ckpt.data-00000-of-00001", _truncate, 1),
    (LAST + "ckpt.data-00000-of-00001", _flip, 1),
    (LAST + "ckpt.index", _empty, 1),
    ("state.json", _garbage, 2),  # the newest checkpoint is intact, only the pointer is lost
])
def test_a_damaged_run_names_the_file_and_falls_back_to_an_intact_checkpoint(
        copy, damaged, damage, intact):
    run_dir, _, _, weights = copy
    damage(os.path.join(run_dir, damaged))
    before = files(run_dir)
    with pytest.raises(ValueError) as error:
        tf_stdprune.restore_run(pruned(), run_dir)
    message = str(error.value)
    assert os.path.dirname(damaged) in message or damaged in message
    assert "fall_back=True" in message and f"iteration {intact}" in message
    assert files(run_dir) == before
    run_state.release_lock(run_dir)
    model = pruned()
    assert tf_stdprune.restore_run(model, run_dir, fall_back=True) == intact * EPOCHS
    for expected, variable in zip(weights[intact - 1], model.weights):
        np.testing.assert_array_equal(variable.numpy(), expected, err_msg=variable.name)
    assert [r["iteration"] for r in run_state.read_history(run_dir)] == list(range(1, intact + 1))
    with open(os.path.join(run_dir, "state.json")) as f:
        assert json.load(f)["iteration"] == intact
    run_state.release_lock(run_dir)


def test_a_garbage_history_line_is_named(copy):
    run_dir, _, _, _ = copy
    _garbage(os.path.join(run_dir, "history.jsonl"))
    with pytest.raises(ValueError, match=r"history.jsonl, line 3, is not an iteration record"):
        tf_stdprune.restore_run(pruned(), run_dir)


def test_a_checkpoint_of_another_optimizer_is_refused_with_the_way_on(copy):
    run_dir, _, _, _ = copy
    os.remove(os.path.join(run_dir, "run.json"))  # only the checkpoint can tell
    with pytest.raises(ValueError, match="does not fit this model and optimizer.*same optimizer"):
        tf_stdprune.restore_run(pruned(optimizer=keras.optimizers.Adam(0.1)), run_dir)


def test_leftovers_of_a_killed_write_are_cleaned_or_put_back(copy):
    run_dir, _, _, _ = copy
    state = os.path.join(run_dir, "state.json")
    os.replace(state, os.path.join(run_dir, ".state.json.old-x1"))  # killed between renames
    os.makedirs(os.path.join(run_dir, "checkpoints", ".iter-0003.tmp-x2"))
    assert tf_stdprune.restore_run(pruned(), run_dir) == 2 * EPOCHS
    assert os.path.exists(state)
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["iter-0001", "iter-0002"]
    assert not [n for n in os.listdir(run_dir) if n.startswith(".")]


def test_learning_rate_drops_that_never_fire_are_named(caplog):
    with caplog.at_level(logging.WARNING):
        assert warn_unreachable_drops((3, 10, 16), 6) == [10, 16]
        iterative_callbacks("unused", 6, [0.1])
    assert caplog.text.count("lr_drops [10, 16] never take effect") == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert warn_unreachable_drops((3, 5), 6) == []
    assert "never take effect" not in caplog.text

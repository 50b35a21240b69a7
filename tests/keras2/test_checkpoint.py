"""restore_run brings back every variable of model and optimizer bit for bit, and only from
the checkpoint that state.json names: partial or unnamed checkpoints are never read."""
import json
import os

import numpy as np

import tf_stdprune
from tf_stdprune.keras2.engine import keras

from conftest import tiny_cnn

EPOCHS, BATCH = 1, 16


def pruned_model(steps):
    schedule = tf_stdprune.StdPruningSchedule([0.6, 1.2], steps_per_iteration=EPOCHS * steps)
    model = tf_stdprune.prune_low_std(tiny_cnn(), pruning_schedule=schedule)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def variables(model):
    """``{name: value}`` of the model's weights (masks, sigmas, steps, BN statistics
    included) and of the optimizer's state (momentum slots, iteration count)."""
    named = [(f"model/{i}", v) for i, v in enumerate(model.weights)]
    named += [(f"optimizer/{i}", v) for i, v in enumerate(model.optimizer.variables)]
    return {name: (v.name, np.array(v.numpy())) for name, v in named}


def test_restore_is_exact_and_ignores_partial_checkpoints(tmp_path, tiny_data):
    x, y = tiny_data
    run_dir = str(tmp_path)
    model = pruned_model(len(x) // BATCH)
    model.fit(x, y, batch_size=BATCH, epochs=2 * EPOCHS, shuffle=False, verbose=0,
              callbacks=tf_stdprune.iterative_callbacks(
                  run_dir, EPOCHS, [0.1], lr_drops=(), validation_data=(x, y),
                  recalibration_data=(x,), recalibration_batches=2, figures=False))
    saved = variables(model)
    assert saved["optimizer/0"] == ("iteration:0", 2 * EPOCHS * len(x) // BATCH)
    assert any("mask" in name and not value.all() for name, value in saved.values())

    # A run killed while writing iteration 3: a staging directory and an unnamed checkpoint.
    for partial in (os.path.join(run_dir, ".tmp-ckpt-killed"),
                    os.path.join(run_dir, "checkpoints", "iter-0003")):
        os.makedirs(partial)
        with open(os.path.join(partial, "ckpt.index"), "wb") as f:
            f.write(b"half a checkpoint")
    with open(os.path.join(run_dir, "history.jsonl"), "a") as f:
        f.write(json.dumps({"iteration": 3}) + "\n")

    keras.backend.clear_session()
    restored = pruned_model(len(x) // BATCH)
    assert tf_stdprune.restore_run(restored, run_dir) == 2 * EPOCHS
    loaded = variables(restored)
    assert loaded.keys() == saved.keys()
    for key, (name, value) in saved.items():
        np.testing.assert_array_equal(loaded[key][1], value, err_msg=name)
    assert not os.path.exists(os.path.join(run_dir, ".tmp-ckpt-killed"))
    history = tf_stdprune.keras2.run_state.read_history(run_dir)
    assert [r["iteration"] for r in history] == [1, 2]


def test_a_new_run_directory_restores_nothing(tmp_path):
    model = pruned_model(4)
    before = variables(model)
    assert tf_stdprune.restore_run(model, str(tmp_path / "new")) == 0
    after = variables(model)
    assert all(np.array_equal(before[k][1], after[k][1]) for k in before)

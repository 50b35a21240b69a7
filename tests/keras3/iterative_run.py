"""A deterministic Keras 3 iterative run that can be killed with SIGKILL on purpose.

    python iterative_run.py RUN_DIR [--kill_after_batches=N] [--iterations=I]

``I`` (3 by default) iterations of one epoch on `helpers.tiny_data` (the model without Dropout). Rerunning
the same command resumes from RUN_DIR. At the end it writes ``RUN_DIR/final.npz``
(`helpers.state_arrays`) and ``RUN_DIR/modules.json``: the tf_keras, tfmot and tf_keras-only
tf_stdprune modules the process loaded.
"""
import argparse
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_stdprune  # noqa: E402
from keras3.helpers import BATCH, pruned_for_iterations, state_arrays, tiny_data  # noqa: E402

TF_KERAS_MODULES = ("tf_keras", "tensorflow_model_optimization", "tf_stdprune.keras2.engine",
                    "tf_stdprune.keras2.wrapper", "tf_stdprune.keras2.prune", "tf_stdprune.keras2.callbacks",
                    "tf_stdprune.keras2.iterative", "tf_stdprune.keras2.run_state",
                    "tf_stdprune.keras2.recalibration")


def run(run_dir, kill_after_batches=None, iterations=3):
    """The run; returns the model. Kills this process after that many batches if given."""
    keras.utils.set_random_seed(0)
    x, y = tiny_data()
    model = pruned_for_iterations(dropout=False, steps=len(x) // BATCH)
    callbacks = tf_stdprune.iterative_callbacks(
        run_dir, 1, [0.05, 0.01], lr_drops=(), recalibration_data=(x, y),
        recalibration_batches=2, validation_data=(x, y), batch_size=BATCH, figures=False)
    if kill_after_batches:
        batches = [0]

        def count(batch, logs):
            batches[0] += 1
            if batches[0] == kill_after_batches:
                os.kill(os.getpid(), signal.SIGKILL)

        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=count))
    initial_epoch = tf_stdprune.restore_run(model, run_dir)
    model.fit(x, y, batch_size=BATCH, epochs=iterations, initial_epoch=initial_epoch,
              shuffle=False, verbose=0, callbacks=callbacks)
    return model


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill_after_batches", type=int)
    parser.add_argument("--iterations", type=int, default=3)
    args = parser.parse_args()
    model = run(args.run_dir, args.kill_after_batches, args.iterations)
    np.savez(os.path.join(args.run_dir, "final.npz"), *state_arrays(model))
    loaded = sorted(name for name in sys.modules
                    if name in TF_KERAS_MODULES or name.split(".")[0] in TF_KERAS_MODULES)
    with open(os.path.join(args.run_dir, "modules.json"), "w") as f:
        json.dump(loaded, f)


if __name__ == "__main__":
    main()

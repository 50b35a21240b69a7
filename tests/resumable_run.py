"""A small, deterministic iterative run that can be killed with SIGKILL on purpose.

    python resumable_run.py RUN_DIR [--kill_after_batches=N | --kill_on_replace=N]

``--kill_after_batches=N`` kills the process after its N-th training batch;
``--kill_on_replace=N`` kills it at its N-th ``os.replace`` call, i.e. in the middle of
writing a checkpoint, history or state file. Rerunning the same command resumes.
"""
import argparse
import itertools
import os
import signal

import numpy as np
import tensorflow as tf

import tf_stdprune
from tf_stdprune import run_state
from tf_stdprune._keras import keras

ITERATIONS, EPOCHS, BATCH = 4, 2, 16


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--kill_after_batches", type=int)
    parser.add_argument("--kill_on_replace", type=int)
    args = parser.parse_args()
    if args.kill_on_replace:
        replace, calls = os.replace, [0]

        def dying_replace(src, dst):
            calls[0] += 1
            if calls[0] == args.kill_on_replace:
                os.kill(os.getpid(), signal.SIGKILL)
            replace(src, dst)

        run_state.os.replace = dying_replace

    keras.utils.set_random_seed(0)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8, 8, 3)).astype("float32")
    y = (x[:, :4, :4, 0].mean(axis=(1, 2)) > 0).astype("int64") + (x[..., 1].mean(axis=(1, 2)) > 0)
    model = keras.Sequential([
        keras.layers.Conv2D(6, 3, padding="same", input_shape=(8, 8, 3)),
        keras.layers.BatchNormalization(), keras.layers.ReLU(), keras.layers.Flatten(),
        keras.layers.Dense(3)])
    steps = len(x) // BATCH
    model = tf_stdprune.prune_low_std(model, pruning_schedule=tf_stdprune.StdPruningSchedule(
        [0.4, 0.7, 1.0, 1.3], steps_per_iteration=EPOCHS * steps))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")])
    callbacks = tf_stdprune.iterative_callbacks(
        args.run_dir, EPOCHS, [0.05, 0.02], lr_drops=(1,),
        validation_data=tf.data.Dataset.from_tensor_slices((x[:32], y[:32])).batch(16),
        recalibration_data=tf.data.Dataset.from_tensor_slices(x).batch(BATCH),
        recalibration_batches=2, figures=False)
    if args.kill_after_batches:
        counter = itertools.count(1)
        callbacks.append(keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: (
            os.kill(os.getpid(), signal.SIGKILL)
            if next(counter) == args.kill_after_batches else None)))
    initial_epoch = tf_stdprune.restore_run(model, args.run_dir)
    model.fit(x, y, batch_size=BATCH, epochs=ITERATIONS * EPOCHS, initial_epoch=initial_epoch,
              shuffle=False, verbose=0, callbacks=callbacks)

if __name__ == "__main__":
    main()

"""Quickstart: prune a small Dense network on scikit-learn's digits, then compress it.

Keras 3 (the backend KERAS_BACKEND names); ``--keras=2`` runs the same code on tf_keras.
Offline, under a minute on a CPU. Everything goes to ``--out_dir`` (default
``runs/quickstart/keras3`` in this checkout, which git ignores). Run it again and it
resumes that run from its last finished iteration (a finished run only redoes the
compression); give another ``--out_dir`` to start a fresh one. It says which it does.

    python examples/quickstart.py              # Keras 3
    python examples/quickstart.py --keras=2    # tf_keras, tfmot's engine
"""
import os

from absl import app, flags

from tf_stdprune.console import plain_logs, quiet_start

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
flags.DEFINE_enum("keras", "3", ["2", "3"], "3: Keras 3. 2: tf_keras.")
flags.DEFINE_string("out_dir", None, "Run directory (default: runs/quickstart/keras<N>).")
FLAGS = flags.FLAGS


def main(argv):
    plain_logs()  # log lines without absl's prefixes unless --alsologtostderr
    with quiet_start():
        import numpy as np
        from sklearn.datasets import load_digits
        if FLAGS.keras == "2":
            import tf_keras as keras
        else:
            import keras
        import tf_stdprune
    out_dir = FLAGS.out_dir or os.path.join(ROOT, "runs", "quickstart", f"keras{FLAGS.keras}")
    keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense_weights = os.path.join(out_dir, "dense.weights.h5")
    if os.path.exists(dense_weights):
        model.load_weights(dense_weights)                                # the earlier baseline
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"])
    if not os.path.exists(dense_weights):
        model.fit(x[train], y[train], batch_size=50, epochs=10, verbose=0)  # dense baseline
        os.makedirs(out_dir, exist_ok=True)
        model.save_weights(dense_weights)
    dense_predictions = model.predict(x[test], verbose=0)

    E, steps_per_epoch = 3, 1400 // 50   # retraining epochs per iteration, batches per epoch
    schedule = tf_stdprune.StdPruningSchedule([0.5, 1.0, 1.5],
                                              steps_per_iteration=E * steps_per_epoch)
    pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
    pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"])
    run_dir = os.path.join(out_dir, "run")
    initial_epoch = tf_stdprune.restore_run(pruned, run_dir)            # 0 for a new run
    print(f"resuming the run in {run_dir} after iteration {initial_epoch // E} of 3 "
          "(give another --out_dir for a fresh run)" if initial_epoch
          else f"starting a fresh run in {run_dir}")
    pruned.fit(x[train], y[train], batch_size=50, epochs=3 * E, initial_epoch=initial_epoch,
               verbose=0, callbacks=tf_stdprune.iterative_callbacks(
                   run_dir, E, initial_lrs=[0.05, 0.01], lr_drops=(),
                   validation_data=(x[test], y[test]), figures=False))
    print(tf_stdprune.sparsity_report(pruned))            # counts parameters (Han et al. 2015)
    change = tf_stdprune.accuracy_change(dense_predictions, pruned.predict(x[test], verbose=0),
                                         y[test])
    print(f"top-1 change, pruned - dense: {change}")

    quantized = tf_stdprune.quantize_weights(tf_stdprune.strip_pruning(pruned), bits=5)
    quantized.compile(keras.optimizers.Adam(1e-5), loss, metrics=["accuracy"])
    quantized.fit(x[train], y[train], batch_size=50, epochs=1, verbose=0)   # centroids
    final = tf_stdprune.strip_quantization(quantized)
    path = tf_stdprune.compress(final, os.path.join(out_dir, "model.tfspz"), overwrite=True)
    print(tf_stdprune.compression_report(path))        # counts bits (Han, Mao and Dally 2016)
    restored = tf_stdprune.decompress(path)              # the model, back from the file
    top1 = np.mean(np.argmax(restored.predict(x[test], verbose=0), axis=1) == y[test])
    print(f"test top-1 of the decompressed model: {100 * top1:.2f} %")


if __name__ == "__main__":
    app.run(main)

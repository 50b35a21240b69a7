"""Quickstart: prune a small Dense network on scikit-learn's digits, then compress it.

Offline, under a minute on a laptop CPU. Writes its run directory and the compressed file
under the directory given as the first argument (default ``quickstart_run``).

    python examples/quickstart.py [OUT_DIR]
"""
import os
import sys

import numpy as np
from sklearn.datasets import load_digits
import tf_keras as keras

import tf_stdprune

out_dir = sys.argv[1] if len(sys.argv) > 1 else "quickstart_run"
keras.utils.set_random_seed(0)
x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype("float32")
order = np.random.default_rng(0).permutation(len(x))
train, test = order[:1400], order[1400:]
model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(128, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"])
model.fit(x[train], y[train], batch_size=50, epochs=10, verbose=0)          # dense baseline

E, steps_per_epoch = 3, 1400 // 50     # retraining epochs per iteration, batches per epoch
schedule = tf_stdprune.StdPruningSchedule([0.5, 1.0, 1.5], steps_per_iteration=E * steps_per_epoch)
pruned = tf_stdprune.prune_low_std(model, pruning_schedule=schedule)
pruned.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss, metrics=["accuracy"])
pruned.fit(x[train], y[train], batch_size=50, epochs=3 * E, verbose=0,
           callbacks=tf_stdprune.iterative_callbacks(
               os.path.join(out_dir, "run"), E, initial_lrs=[0.05, 0.01], lr_drops=(),
               validation_data=(x[test], y[test]), figures=False))
print(tf_stdprune.sparsity_report(pruned))                # counts parameters (Han et al. 2015)

quantized = tf_stdprune.quantize_weights(pruned, bits=5)  # weight sharing, 32 shared values
quantized.compile(keras.optimizers.Adam(1e-5), loss, metrics=["accuracy"])
quantized.fit(x[train], y[train], batch_size=50, epochs=1, verbose=0)       # centroids
final = tf_stdprune.strip_quantization(quantized)
path = tf_stdprune.compress(final, os.path.join(out_dir, "model.tfspz"), overwrite=True)
print(tf_stdprune.compression_report(path))               # counts bits (Han, Mao and Dally 2016)
restored = tf_stdprune.decompress(path)                   # the model, back from the file
top1 = np.mean(np.argmax(restored.predict(x[test], verbose=0), axis=1) == y[test])
print(f"test top-1 of the decompressed model: {100 * top1:.2f} %")

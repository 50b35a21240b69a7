"""Which ``std_mode`` gives the best sparsity / accuracy trade-off? Measured on digits.

scikit-learn's 1,797 real 8x8 digits (flattened, 25 % held out), a small
Dense-BN-ReLU network trained dense first (as the reference experiment prunes a trained VGG19), then,
for every mode from the same dense weights, the reference experiment's procedure: ``iterations``
iterations of one pruning step with an increasing ``q`` and ``epochs_per_iteration``
epochs of retraining. Repeated for ``seeds`` seeds; the table shows means and, per
seed, the final zero-weights rate (prunable tensors, exact zeros) and test accuracy.

    python benchmarks/std_mode.py --seeds=2
"""
import json
import statistics

from absl import app, flags

import tf_stdprune
from tf_stdprune.keras2.engine import keras
from tf_stdprune.mask_rule import STD_MODES

FLAGS = flags.FLAGS
flags.DEFINE_list("qualities", ["0.5", "0.75", "1.0", "1.25", "1.5"],
                  "q of each iteration (one pruning step each).")
flags.DEFINE_integer("epochs_per_iteration", 3, "Retraining epochs after each pruning step.")
flags.DEFINE_integer("baseline_epochs", 15, "Dense training epochs before pruning.")
flags.DEFINE_integer("seeds", 2, "Independent repetitions (data split, init, order).")
flags.DEFINE_integer("batch_size", 32, "Batch size.")
flags.DEFINE_float("learning_rate", 0.02, "SGD learning rate (momentum 0.9).")


def digits(seed):
    """Train/test arrays: 64 features in [0, 1], 10 classes, a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    return train_test_split(x, data.target, test_size=0.25, stratify=data.target,
                            random_state=seed)


def mlp():
    L = keras.layers
    return keras.Sequential([
        L.Dense(128, input_shape=(64,)), L.BatchNormalization(), L.ReLU(),
        L.Dense(64), L.BatchNormalization(), L.ReLU(), L.Dense(10)])


def _compile(model):
    model.compile(keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def run_seed(seed):
    """Dense accuracy, then (zero-weights rate %, test accuracy) of every mode."""
    x_train, x_test, y_train, y_test = digits(seed)
    keras.utils.set_random_seed(seed)
    dense = _compile(mlp())
    dense.fit(x_train, y_train, batch_size=FLAGS.batch_size, epochs=FLAGS.baseline_epochs,
              verbose=0)
    results = {"dense": {"zero_weights_rate": 0.0,
                         "accuracy": dense.evaluate(x_test, y_test, verbose=0)[1]}}
    steps_per_epoch = -(-len(x_train) // FLAGS.batch_size)
    qualities = [float(q) for q in FLAGS.qualities]
    for std_mode in STD_MODES:
        keras.utils.set_random_seed(seed)
        model = mlp()
        model.set_weights(dense.get_weights())
        pruned = _compile(tf_stdprune.prune_low_std(
            model, std_mode=std_mode, pruning_schedule=tf_stdprune.StdPruningSchedule(
                qualities, FLAGS.epochs_per_iteration * steps_per_epoch)))
        pruned.fit(x_train, y_train, batch_size=FLAGS.batch_size, verbose=0,
                   epochs=len(qualities) * FLAGS.epochs_per_iteration,
                   callbacks=[tf_stdprune.UpdatePruningStep()])
        stripped = _compile(tf_stdprune.strip_pruning(pruned))
        results[std_mode] = {
            "zero_weights_rate": tf_stdprune.sparsity_report(stripped).zero_weights_rate,
            "accuracy": stripped.evaluate(x_test, y_test, verbose=0)[1],
        }
    return results


def main(_):
    runs = [run_seed(seed) for seed in range(FLAGS.seeds)]
    summary = {
        name: {
            "zero_weights_rate_mean": statistics.mean(r[name]["zero_weights_rate"] for r in runs),
            "accuracy_mean": statistics.mean(r[name]["accuracy"] for r in runs),
            "per_seed": [r[name] for r in runs],
        }
        for name in runs[0]
    }
    config = {"qualities": FLAGS.qualities, "epochs_per_iteration": FLAGS.epochs_per_iteration,
              "baseline_epochs": FLAGS.baseline_epochs, "seeds": FLAGS.seeds,
              "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate}
    print(json.dumps({"benchmark": "std_mode", "config": config, "results": summary}, indent=2))
    print(f"\nstd_mode on digits ({', '.join(f'{k}={v}' for k, v in config.items())})")
    print(f"{'mode':<10} {'zero weights %':>15} {'accuracy %':>11}   per seed (zeros % / acc %)")
    for name, row in summary.items():
        seeds = "  ".join(f"{r['zero_weights_rate']:.1f}/{100 * r['accuracy']:.1f}"
                          for r in row["per_seed"])
        print(f"{name:<10} {row['zero_weights_rate_mean']:>15.2f} "
              f"{100 * row['accuracy_mean']:>11.2f}   {seeds}")


if __name__ == "__main__":
    app.run(main)

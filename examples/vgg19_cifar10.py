"""The seed's experiment end to end: VGG19-BN, dense baseline, iterative std pruning.

    python examples/vgg19_cifar10.py --preset=quick          # digits, ~5 min on 2 CPUs
    python examples/vgg19_cifar10.py --preset=paper --data_dir=~/tensorflow_datasets

Presets fill the defaults; every flag given on the command line overrides its preset.
Running the same command again resumes from the last finished iteration.
Outputs in --out_dir: baseline/ (dense weights, accuracy), run/ (history.jsonl,
checkpoints, report.json, figures/, tensorboard/), final/ (stripped model as .keras,
.h5 and SavedModel), summary.md.
"""
import json
import os
import time

from absl import app, flags, logging
import tensorflow as tf

import tf_stdprune
from tf_stdprune import data, models
from tf_stdprune._keras import keras
from tf_stdprune.run_state import atomic_write, check_writable

PRESETS = {
    "paper": dict(dataset="cifar10", width=1.0, iterations=20, epochs_per_iteration=20,
                  initial_lrs=[0.05] + [0.01] * 9 + [0.001, 0.001], lr_drops=[3, 10, 16],
                  qualities=[0.25 * (i + 1) for i in range(20)], batch_size=128,
                  baseline_epochs=60, baseline_lr=0.05, baseline_lr_drops=[20, 40, 50]),
    "quick": dict(dataset="digits", width=0.25, iterations=5, epochs_per_iteration=4,
                  initial_lrs=[0.01], lr_drops=[3], qualities=[0.6, 1.0, 1.4, 1.8, 2.2],
                  batch_size=64, baseline_epochs=12, baseline_lr=0.05, baseline_lr_drops=[8, 11]),
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "quick", list(PRESETS), "Defaults for the flags below.")
flags.DEFINE_enum("dataset", None, ["cifar10", "digits"], "Data set.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets directory holding cifar10/.")
flags.DEFINE_float("width", None, "Width multiplier of VGG19-BN (1.0: 38,969,930 parameters).")
flags.DEFINE_integer("iterations", None, "Prune + retrain iterations.")
flags.DEFINE_integer("epochs_per_iteration", None, "Retraining epochs per iteration.")
flags.DEFINE_list("initial_lrs", None, "Initial learning rate of each iteration (last repeats).")
flags.DEFINE_list("lr_drops", None, "Epochs inside an iteration where the rate drops 10x.")
flags.DEFINE_list("qualities", None, "Quality parameter q of each iteration (last repeats).")
flags.DEFINE_enum("std_mode", "initial", ["initial", "surviving", "all"], "Which std sigma is.")
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_integer("baseline_epochs", None, "Epochs of the dense baseline.")
flags.DEFINE_float("baseline_lr", None, "Initial learning rate of the dense baseline.")
flags.DEFINE_list("baseline_lr_drops", None, "Epochs where the baseline's rate drops 10x.")
flags.DEFINE_integer("recalibration_batches", 20, "BN recalibration batches (0: off).")
flags.DEFINE_integer("eval_train_batches", 20, "Training batches evaluated per iteration.")
flags.DEFINE_string("out_dir", "runs/quick", "Output directory.")
flags.DEFINE_bool("resume", True, "Continue an interrupted run found in --out_dir.")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on GPU, mixed_bfloat16 on CPU.")
flags.DEFINE_bool("jit_compile", False, "Compile train steps with XLA.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy.")


def config():
    """The preset's values, overridden by every flag given explicitly."""
    values = dict(PRESETS[FLAGS.preset])
    for name in values:
        if FLAGS[name].present:
            values[name] = FLAGS[name].value
    for name in ("initial_lrs", "qualities"):
        values[name] = [float(v) for v in values[name]]
    for name in ("lr_drops", "baseline_lr_drops"):
        values[name] = [int(v) for v in values[name]]
    return values


def make_strategy(name):
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def load_data(cfg):
    if cfg["dataset"] == "digits":
        return data.digits(batch_size=cfg["batch_size"])
    train, test, info = data.cifar10(FLAGS.data_dir, batch_size=cfg["batch_size"])
    return train, test, info.features["label"].num_classes


def compile_model(model, jit_compile):
    model.compile(
        keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit_compile)
    return model


def dense_baseline(cfg, strategy, train, test, num_classes, out_dir):
    """Trains (or reloads) the dense model; returns it and its test metrics."""
    with strategy.scope():
        model = compile_model(models.vgg19_bn(num_classes, width=cfg["width"]), FLAGS.jit_compile)
    weights, metrics_path = os.path.join(out_dir, "weights.h5"), os.path.join(out_dir, "baseline.json")
    if FLAGS.resume and os.path.exists(metrics_path):
        model.load_weights(weights)
        with open(metrics_path) as f:
            return model, json.load(f)
    schedule = tf_stdprune.callbacks.IterationLearningRate(
        [cfg["baseline_lr"]], cfg["baseline_epochs"], cfg["baseline_lr_drops"])
    model.fit(train, epochs=cfg["baseline_epochs"], callbacks=[schedule], verbose=2)
    metrics = {f"val_{k}": float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}
    os.makedirs(out_dir, exist_ok=True)
    model.save_weights(weights + ".tmp.h5")
    os.replace(weights + ".tmp.h5", weights)
    atomic_write(metrics_path, json.dumps(metrics, indent=2))
    return model, metrics


def save_final(model, out_dir):
    """The stripped model as .keras, .h5 and SavedModel; returns their sizes in bytes."""
    sizes = {}
    os.makedirs(out_dir, exist_ok=True)
    for name, save in (("model.keras", model.save), ("model.h5", model.save),
                       ("saved_model", lambda p: tf.saved_model.save(model, p))):
        path = os.path.join(out_dir, name)
        tmp = os.path.join(out_dir, ".tmp-" + name)
        save(tmp)
        if os.path.isdir(path):
            tf.io.gfile.rmtree(path)
        os.replace(tmp, path)
        sizes[name] = (sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
                       if os.path.isdir(path) else os.path.getsize(path))
    return sizes


def write_summary(path, cfg, dense, final, report, sizes, seconds):
    rows = [("dense top-1 (%)", f"{100 * dense['val_top1']:.2f}"),
            ("pruned top-1 (%)", f"{100 * final['val_top1']:.2f}"),
            ("zero weights rate (%)", f"{report.zero_weights_rate:.2f}"),
            ("zero parameters rate (%)", f"{report.zero_parameters_rate:.2f}"),
            ("compression rate", f"x{report.compression_rate:.2f}"),
            ("total parameters", f"{report.total_parameters}"),
            ("zero weights", f"{report.zero_weights}")]
    rows += [(f"size of {name} (bytes)", str(size)) for name, size in sizes.items()]
    rows.append(("wall time (s)", f"{seconds:.0f}"))
    text = (f"# {cfg['dataset']}, VGG19-BN width {cfg['width']}, {cfg['iterations']} iterations x "
            f"{cfg['epochs_per_iteration']} epochs, std_mode {FLAGS.std_mode}\n\n"
            "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows))
    atomic_write(path, text)
    return text


def main(_):
    started = time.time()
    cfg = config()
    out_dir = os.path.expanduser(FLAGS.out_dir)
    check_writable(out_dir)
    if FLAGS.mixed_precision:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    strategy = make_strategy(FLAGS.strategy)
    train, test, num_classes = load_data(cfg)
    dense, dense_metrics = dense_baseline(cfg, strategy, train, test, num_classes,
                                          os.path.join(out_dir, "baseline"))
    logging.info("dense baseline: %s", dense_metrics)

    run_dir = os.path.join(out_dir, "run")
    atomic_write(os.path.join(run_dir, "baseline.json"), json.dumps(dense_metrics))
    steps_per_epoch = int(tf.data.experimental.cardinality(train))
    with strategy.scope():
        schedule = tf_stdprune.StdPruningSchedule(
            cfg["qualities"], steps_per_iteration=cfg["epochs_per_iteration"] * steps_per_epoch)
        pruned = compile_model(tf_stdprune.prune_low_std(
            dense, pruning_schedule=schedule, std_mode=FLAGS.std_mode), FLAGS.jit_compile)
    initial_epoch = tf_stdprune.restore_run(pruned, run_dir) if FLAGS.resume else 0
    pruned.fit(
        train, epochs=cfg["iterations"] * cfg["epochs_per_iteration"], initial_epoch=initial_epoch,
        verbose=2, callbacks=tf_stdprune.iterative_callbacks(
            run_dir, cfg["epochs_per_iteration"], cfg["initial_lrs"], cfg["lr_drops"],
            train_eval_data=train.take(FLAGS.eval_train_batches), validation_data=test,
            recalibration_data=train if FLAGS.recalibration_batches else None,
            recalibration_batches=FLAGS.recalibration_batches))

    final = compile_model(tf_stdprune.strip_pruning(pruned), False)
    final_metrics = {f"val_{k}": float(v) for k, v in final.evaluate(test, verbose=0, return_dict=True).items()}
    report = tf_stdprune.sparsity_report(final)
    sizes = save_final(final, os.path.join(out_dir, "final"))
    print(report)
    print(write_summary(os.path.join(out_dir, "summary.md"), cfg, dense_metrics, final_metrics,
                        report, sizes, time.time() - started))


if __name__ == "__main__":
    app.run(main)

"""The reference experiment end to end: VGG19-BN, a dense baseline, then iterative std pruning.

    python examples/vgg19_cifar10.py --preset=quick          # digits, offline, ~4 min on 2 CPUs
    python examples/vgg19_cifar10.py --preset=paper --data_dir=~/tensorflow_datasets
    python examples/vgg19_cifar10.py --preset=paper --strategy=mirrored --mixed_precision --jit_compile

Presets fill the defaults; every flag given on the command line overrides its preset.
Every flag is checked before anything trains. Running the same command again resumes: the
dense baseline is reloaded and pruning goes on from the last finished iteration. The
settings that define the run are kept in --out_dir/run.json; resuming with other ones is
refused, except more --iterations (with --qualities and --initial_lrs extended at their
end). One process at a time owns --out_dir (its ``lock`` file). Outputs in --out_dir:

    run.json, lock                                the run's settings; its owner while it runs
    baseline/weights.h5, baseline/metrics.json    the dense model and its test metrics
    baseline/wall_time.json                       (and its training time)
    run/                                          history.jsonl, checkpoints, report.json,
                                                  figures/, tensorboard/ (the iterations)
    final/model.keras, final/model.h5, final/saved_model/    the stripped pruned model
    final/sparse_saved_model/, final/model.tfspz  with --export_sparse / --compress (quick:
                                                  on), after --quantize_bits weight sharing
    summary.md                                    dense vs pruned top-1, zeros, compression,
                                                  sizes on disk, wall time (summed over
                                                  all the processes of the run)
"""
import json
import math
import os
import shutil
import tempfile
import time

from absl import app, flags, logging
import tensorflow as tf

import tf_stdprune
from tf_stdprune import compressed_file, data, export, models, run_state
from tf_stdprune._keras import keras
from tf_stdprune.io import atomic_write, clean_temporaries, write_atomically
from tf_stdprune.iterative import warn_unreachable_drops
from tf_stdprune.run_state import check_writable

# The reference experiment gives no quality parameters: "paper" raises q by 0.1 per iteration up to 1.6
# (about 89 % of a Gaussian layer below 1.6 sigma; the reference experiment ended at 87.9 % zeros).
PRESETS = {
    "paper": dict(
        dataset="cifar10", width=1.0, batch_size=128, augment=True,
        baseline_epochs=160, baseline_lr=0.05, baseline_lr_drops=[80, 120],
        iterations=20, epochs_per_iteration=20, lr_drops=[3, 10, 16],
        initial_lrs=[0.05] + [0.01] * 9 + [0.001, 0.001],
        qualities=[round(0.1 * i, 1) for i in range(1, 17)],
        std_mode="initial", recalibration_batches=50, out_dir="runs/paper",
        quantize_bits=None, export_sparse=False, compress=False),
    # quick: measured on this machine (README): dense 98.9 %, 96.5 % zeros after q = 1.7,
    # 99.2 % after 5-bit weight sharing, file x62.8, about 4 minutes in all.
    "quick": dict(
        dataset="digits", width=0.25, batch_size=64, augment=False,
        baseline_epochs=8, baseline_lr=0.01, baseline_lr_drops=[6],
        iterations=4, epochs_per_iteration=3, lr_drops=[2],
        initial_lrs=[0.01], qualities=[0.8, 1.2, 1.5, 1.7],
        std_mode="initial", recalibration_batches=10, out_dir="runs/quick",
        quantize_bits=5, export_sparse=True, compress=True),
}
LIST_TYPES = {"initial_lrs": float, "qualities": float, "lr_drops": int, "baseline_lr_drops": int}

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "quick", list(PRESETS), "Defaults of the flags below.")
flags.DEFINE_enum("dataset", None, ["cifar10", "digits"], "cifar10 (tfds) or digits (offline).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory holding cifar10/.")
flags.DEFINE_integer("max_train_examples", None, "Use only the first N training examples.",
                     lower_bound=1)
flags.DEFINE_bool("augment", None, "Pad-4 random crops (+ flips on CIFAR-10) for training.")
flags.DEFINE_float("width", None, "Width multiplier of VGG19-BN (1.0: 38,969,930 parameters).")
flags.DEFINE_integer("batch_size", None, "Global batch size (split over replicas).",
                     lower_bound=1)
flags.DEFINE_integer("baseline_epochs", None, "Epochs of the dense baseline.", lower_bound=1)
flags.DEFINE_float("baseline_lr", None, "Initial learning rate of the dense baseline.")
flags.DEFINE_list("baseline_lr_drops", None, "Baseline epochs where the rate drops 10x.")
flags.DEFINE_integer("iterations", None, "Prune + retrain iterations.", lower_bound=1)
flags.DEFINE_integer("epochs_per_iteration", None, "Retraining epochs per iteration.",
                     lower_bound=1)
flags.DEFINE_list("initial_lrs", None, "Initial learning rate of each iteration (last repeats).")
flags.DEFINE_list("lr_drops", None, "Epochs inside an iteration where the rate drops 10x.")
flags.DEFINE_list("qualities", None, "Quality parameter q of each iteration (last repeats).")
flags.DEFINE_enum("std_mode", None, ["initial", "surviving", "all"], "Which sigma q multiplies.")
flags.DEFINE_integer("recalibration_batches", None, "BN recalibration batches (0: off).",
                     lower_bound=0)
flags.DEFINE_string("out_dir", None, "Output directory.")
flags.DEFINE_bool("resume", True, "Continue the run found in --out_dir.")
flags.DEFINE_integer("seed", 0, "Random seed (weights, shuffling, augmentation, split).")
flags.DEFINE_bool("mixed_precision", False, "mixed_float16 on GPU, mixed_bfloat16 on CPU.")
flags.DEFINE_bool("jit_compile", False, "Compile the train and test steps with XLA.")
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy (multi_worker reads TF_CONFIG).")
flags.DEFINE_integer("cpu_replicas", None, "Split the CPU into N logical devices (to try "
                     "--strategy=mirrored without GPUs).", lower_bound=1)
flags.DEFINE_integer("quantize_bits", None, "Weight sharing with 2^b centroids after pruning "
                     "(0: none).", lower_bound=0, upper_bound=12)
flags.DEFINE_integer("quantize_epochs", 2, "Centroid fine-tuning epochs after weight sharing.",
                     lower_bound=0)
flags.DEFINE_float("quantize_lr", 1e-5, "Adam learning rate of the centroid fine-tuning.",
                   lower_bound=0)
flags.DEFINE_bool("export_sparse", None, "Also export a sparse SavedModel.")
flags.DEFINE_bool("compress", None, "Also write the Huffman-coded model file.")


def config():
    """The preset's values, overridden by every flag given explicitly; lists parsed."""
    cfg = dict(PRESETS[FLAGS.preset], data_dir=FLAGS.data_dir, seed=FLAGS.seed,
               max_train_examples=FLAGS.max_train_examples,
               quantize_epochs=FLAGS.quantize_epochs, quantize_lr=FLAGS.quantize_lr)
    for name in PRESETS[FLAGS.preset]:
        if FLAGS[name].present:
            cfg[name] = FLAGS[name].value
    for name, kind in LIST_TYPES.items():
        try:
            cfg[name] = [kind(v) for v in cfg[name]]
        except ValueError as error:
            raise app.UsageError(f"--{name}: {error}") from error
    cfg["out_dir"] = os.path.expanduser(cfg["out_dir"])
    cfg["quantize_bits"] = cfg["quantize_bits"] or None
    return cfg


# The settings that define a run in --out_dir: resuming with another value is refused.
RUN_SETTINGS = ("dataset", "max_train_examples", "augment", "width", "batch_size", "seed",
                "baseline_epochs", "baseline_lr", "baseline_lr_drops", "iterations",
                "epochs_per_iteration", "lr_drops", "initial_lrs", "qualities", "std_mode",
                "recalibration_batches")


def validate(cfg):
    """Raises `app.UsageError` naming the flag, the value and the fix for every value that
    would fail later (e.g. after the dense baseline trained); warns of LR drops that can
    never fire."""
    def positive(name, values):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad or not values:
            raise app.UsageError(f"--{name}={','.join(map(str, values))}: every value must be a "
                                 "finite number > 0.")

    positive("initial_lrs", cfg["initial_lrs"])
    positive("baseline_lr", [cfg["baseline_lr"]])
    positive("width", [cfg["width"]])
    if not cfg["qualities"] or any(not (math.isfinite(q) and q >= 0) for q in cfg["qualities"]):
        raise app.UsageError(f"--qualities={','.join(map(str, cfg['qualities']))}: every q must be "
                             "a finite number >= 0 (the threshold is q * sigma).")
    for name in ("lr_drops", "baseline_lr_drops"):
        if any(d < 0 for d in cfg[name]):
            raise app.UsageError(f"--{name}={','.join(map(str, cfg[name]))}: drops are epochs >= 0.")
    warn_unreachable_drops(cfg["lr_drops"], cfg["epochs_per_iteration"])
    unreachable = [d for d in cfg["baseline_lr_drops"] if d >= cfg["baseline_epochs"]]
    if unreachable:
        logging.warning("--baseline_lr_drops %s never take effect: the baseline trains %d epochs.",
                        unreachable, cfg["baseline_epochs"])


def claim_out_dir(cfg, chief):
    """Takes --out_dir's lock, refuses a resume with other settings, and puts back or
    deletes what a killed write left; every check comes before the baseline trains."""
    out_dir = cfg["out_dir"]
    settings = {name: cfg[name] for name in RUN_SETTINGS}
    if not chief:
        run_state.check_run_settings(out_dir, settings, write=False)
        return
    check_writable(out_dir)
    took = run_state.acquire_lock(out_dir)
    try:
        run_state.check_run_settings(out_dir, settings, write=False)
    except ValueError as error:
        if took:
            run_state.release_lock(out_dir)
        raise app.UsageError(f"{error}") from error
    for directory in (out_dir, os.path.join(out_dir, "baseline"), os.path.join(out_dir, "final")):
        clean_temporaries(directory)
    run_state.check_run_settings(out_dir, settings)


def split_cpu(replicas):
    """Makes ``replicas`` logical CPU devices; must run before TensorFlow uses a device."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)])


def make_strategy(name):
    """``default``; ``mirrored`` over all GPUs, else over all logical CPUs; ``multi_worker``
    (``TF_CONFIG``); ``tpu``."""
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    return tf.distribute.get_strategy()


def set_mixed_precision():
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def load_data(cfg):
    if cfg["dataset"] == "digits":
        return data.digits(batch_size=cfg["batch_size"], augment=cfg["augment"], seed=cfg["seed"],
                           max_train_examples=cfg["max_train_examples"])
    return data.cifar10(cfg["data_dir"], batch_size=cfg["batch_size"], augment=cfg["augment"],
                        max_train_examples=cfg["max_train_examples"], seed=cfg["seed"])


def compile_model(model, jit_compile, optimizer=None):
    """``optimizer`` (default SGD with momentum 0.9, the rate set per epoch by the
    callbacks), cross-entropy, top-1/top-5."""
    model.compile(
        optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile=jit_compile)
    return model


def evaluate(model, test):
    return {k: float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}


def dense_baseline(cfg, strategy, train, test, info, jit_compile, resume, build_model, write_dir):
    """The trained dense model and its test metrics, reloaded from ``baseline/`` if there."""
    weights, metrics_path = (os.path.join(cfg["out_dir"], "baseline", name)
                             for name in ("weights.h5", "metrics.json"))
    with strategy.scope():
        model = compile_model(build_model(info.num_classes, width=cfg["width"],
                                          input_shape=info.image_shape), jit_compile)
    if resume and os.path.exists(metrics_path):  # metrics.json is written after weights.h5
        model.load_weights(weights)
        with open(metrics_path) as f:
            return model, json.load(f)
    started = time.time()
    history = model.fit(train, epochs=cfg["baseline_epochs"], verbose=2, callbacks=[
        tf_stdprune.IterationLearningRate([cfg["baseline_lr"]], cfg["baseline_epochs"],
                                          cfg["baseline_lr_drops"])])
    # Evaluated as the pruned model will be: BN statistics re-estimated first.
    tf_stdprune.recalibrate_batchnorm(model, train, cfg["recalibration_batches"])
    metrics = evaluate(model, test)
    check_finite(model, dict(metrics, train_loss=history.history["loss"][-1]))
    out_dir = os.path.join(write_dir, "baseline")
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, "weights.h5"), model.save_weights)
    atomic_write(os.path.join(out_dir, "wall_time.json"),
                 json.dumps({"wall_time_s": time.time() - started}))
    atomic_write(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2))
    return model, metrics


def check_finite(model, metrics):
    """Raises `run_state.NonFiniteError` naming the weights and losses of the dense
    baseline that are NaN or infinite; nothing of it is saved."""
    bad = run_state.non_finite_weights(model)
    bad += [f"{name} = {value}" for name, value in metrics.items()
            if "loss" in name and not math.isfinite(value)]
    if bad:
        raise run_state.NonFiniteError(
            f"The dense baseline diverged: {', '.join(bad[:5])} not finite. Nothing was saved; "
            "lower --baseline_lr and run again.")


def baseline_seconds(out_dir):
    """The dense baseline's training time as recorded when it trained (0 if unknown)."""
    try:
        with open(os.path.join(out_dir, "baseline", "wall_time.json")) as f:
            return float(json.load(f)["wall_time_s"])
    except (OSError, ValueError, KeyError):
        return 0.0


def pruned_model(dense, cfg, strategy, steps_per_epoch, jit_compile):
    """``prune_low_std(dense)`` with the iterations' schedule, compiled in ``strategy``."""
    with strategy.scope():
        schedule = tf_stdprune.StdPruningSchedule(
            cfg["qualities"], steps_per_iteration=cfg["epochs_per_iteration"] * steps_per_epoch)
        return compile_model(tf_stdprune.prune_low_std(
            dense, pruning_schedule=schedule, std_mode=cfg["std_mode"]), jit_compile)


def save_final(model, out_dir, export_sparse=False, compress=False):
    """The stripped model as ``.keras``, ``.h5`` and a serving SavedModel (plus the sparse
    SavedModel and the Huffman-coded file if asked); returns ``{name: disk_size}``."""
    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    write_atomically(path("model.keras"), model.save)
    write_atomically(path("model.h5"), model.save)
    export.export_dense_saved_model(model, path("saved_model"), overwrite=True)
    names = ["model.keras", "model.h5", "saved_model"]
    if export_sparse:
        export.export_sparse_saved_model(model, path("sparse_saved_model"), overwrite=True)
        names.append("sparse_saved_model")
    if compress:
        compressed_file.compress(model, path("model.tfspz"), overwrite=True)
        names.append("model.tfspz")
    return {name: export.disk_size(path(name)) for name in names}


def share_weights(final, cfg, strategy, train, test, jit_compile):
    """Trained quantization: k-means weight sharing (2^b centroids, zeros kept), then
    ``quantize_epochs`` of centroid fine-tuning with Adam at ``quantize_lr``.
    Returns the plain model with the shared values baked in, and the top-1 after each stage.
    Why Adam: see `tf_stdprune.quantize` (a centroid's gradient sums over its members).
    """
    with strategy.scope():
        shared = compile_model(tf_stdprune.quantize_weights(final, bits=cfg["quantize_bits"]),
                               jit_compile, keras.optimizers.Adam(cfg["quantize_lr"]))
    accuracy = {"after clustering": evaluate(shared, test)["top1"]}
    if cfg["quantize_epochs"]:
        shared.fit(train, epochs=cfg["quantize_epochs"], verbose=2)
        accuracy["after centroid fine-tuning"] = evaluate(shared, test)["top1"]
    with strategy.scope():
        return compile_model(tf_stdprune.strip_quantization(shared), jit_compile), accuracy


def summary_markdown(cfg, dense, final, report, sizes, seconds, stages=()):
    rows = [("dense top-1 (%)", f"{100 * dense['top1']:.2f}"),
            ("pruned top-1 (%)", f"{100 * final['top1']:.2f}"),
            ("total parameters", str(report.total_parameters)),
            ("total weights", str(report.total_weights)),
            ("zero weights", str(report.zero_weights)),
            ("zero weights rate (%)", f"{report.zero_weights_rate:.4f}"),
            ("zero parameters rate (%)", f"{report.zero_parameters_rate:.4f}"),
            ("compression rate", "all weights pruned" if report.to_dict()["compression_rate"] is None
             else f"x{report.compression_rate:.4f}")]
    rows += [(f"top-1 {stage} (%)", f"{100 * top1:.2f}") for stage, top1 in stages]
    rows += [(f"size of final/{name} (bytes, gzip bytes)", f"{size['bytes']}, {size['gzip_bytes']}")
             for name, size in sizes.items()]
    rows.append(("wall time (s)", f"{seconds:.0f}"))
    return (f"# {cfg['dataset']}: VGG19-BN width {cfg['width']}, {cfg['iterations']} iterations "
            f"x {cfg['epochs_per_iteration']} epochs, q {cfg['qualities']}, std_mode "
            f"{cfg['std_mode']}\n\n| measure | value |\n|---|---|\n"
            + "".join(f"| {name} | {value} |\n" for name, value in rows))


def run(cfg, strategy, jit_compile=False, resume=True, build_model=models.vgg19_bn):
    """Baseline, iterative pruning, stripped model, summary; returns (pruned model, text).

    ``build_model(num_classes, width=, input_shape=)`` makes the dense model.
    """
    # Every worker of a multi-worker strategy saves (saving may run collectives) and
    # resumes from --out_dir (a shared filesystem), but only the chief writes there.
    chief = strategy.extended.should_checkpoint
    claim_out_dir(cfg, chief)
    write_dir = cfg["out_dir"] if chief else tempfile.mkdtemp(prefix="vgg19-worker-")
    check_writable(write_dir)
    keras.utils.set_random_seed(cfg["seed"])
    train, test, info = load_data(cfg)
    dense, dense_metrics = dense_baseline(cfg, strategy, train, test, info, jit_compile, resume,
                                          build_model, write_dir)
    print(f"dense baseline: top-1 {100 * dense_metrics['top1']:.2f} %")

    run_dir = os.path.join(cfg["out_dir"], "run")
    pruned = pruned_model(dense, cfg, strategy, info.steps_per_epoch, jit_compile)
    initial_epoch = tf_stdprune.restore_run(pruned, run_dir) if resume else 0
    pruned.fit(train, epochs=cfg["iterations"] * cfg["epochs_per_iteration"],
               initial_epoch=initial_epoch, verbose=2,
               callbacks=tf_stdprune.iterative_callbacks(
                   run_dir, cfg["epochs_per_iteration"], cfg["initial_lrs"], cfg["lr_drops"],
                   validation_data=test, recalibration_data=train,
                   recalibration_batches=cfg["recalibration_batches"]))

    started = time.time()  # the iterations' and the baseline's times are in their records
    with strategy.scope():
        final = compile_model(tf_stdprune.strip_pruning(pruned), jit_compile)
    final_metrics = evaluate(final, test)
    report = tf_stdprune.sparsity_report(final)
    print(report, report.table(), sep="\n\n")
    stages = {}
    if cfg["quantize_bits"] is not None:
        final, stages = share_weights(final, cfg, strategy, train, test, jit_compile)
    sizes = save_final(final, os.path.join(write_dir, "final"), cfg["export_sparse"],
                       cfg["compress"])
    if cfg["compress"] and chief:
        storage = tf_stdprune.compression_report(os.path.join(write_dir, "final", "model.tfspz"))
        print(storage.table())
        tf_stdprune.plot_compression_stages(
            storage, os.path.join(write_dir, "final", "compression_stages.png"))
    seconds = (baseline_seconds(cfg["out_dir"]) + time.time() - started
               + sum(r["wall_time_s"] for r in run_state.read_history(run_dir)))
    text = summary_markdown(cfg, dense_metrics, final_metrics, report, sizes, seconds,
                            stages.items())
    if chief:
        atomic_write(os.path.join(write_dir, "summary.md"), text)
        print(text)
        run_state.release_lock(cfg["out_dir"])
    else:
        shutil.rmtree(write_dir)
    return pruned, text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = config()
    validate(cfg)
    if not FLAGS.resume and os.path.exists(os.path.join(cfg["out_dir"], "baseline")):
        raise app.UsageError(f"--out_dir {cfg['out_dir']} holds a previous run: pass --resume "
                             "to continue it, or choose another --out_dir.")
    if FLAGS.cpu_replicas:
        split_cpu(FLAGS.cpu_replicas)
    if FLAGS.mixed_precision:
        print("mixed precision policy:", set_mixed_precision())
    try:
        run(cfg, make_strategy(FLAGS.strategy), FLAGS.jit_compile, FLAGS.resume)
    except data.DatasetUnavailableError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)

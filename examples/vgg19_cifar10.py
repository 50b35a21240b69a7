"""The reference experiment end to end: VGG19-BN, a dense baseline, then iterative std pruning.

    python examples/vgg19_cifar10.py --preset=quick          # digits, offline, minutes on a CPU
    python examples/vgg19_cifar10.py --preset=paper --data_dir=~/tensorflow_datasets
    python examples/vgg19_cifar10.py --preset=paper --strategy=mirrored --mixed_precision --jit_compile
    python examples/vgg19_cifar10.py --layer_quality=auto    # per-layer q from a sensitivity scan
    python examples/vgg19_cifar10.py --target_drop=0.5 --q_step=0.1 --iterations=10
    KERAS_BACKEND=jax python examples/vgg19_cifar10.py --keras=3   # Keras 3 (or tensorflow)

Every setting is a field of `vgg19_config.Config`: a preset fills them, every flag given on
the command line replaces its field. Every flag is checked before anything trains. Running
the same command again resumes: the dense baseline is reloaded and pruning goes on from the
last finished iteration. The settings that define the run are kept in --out_dir/run.json;
resuming with other ones is refused, except more --iterations (with --qualities and
--initial_lrs extended at their end). One process at a time owns --out_dir (its ``lock``
file). Outputs in --out_dir:

    run.json, lock                                the run's settings; its owner while it runs
    baseline/weights.h5, baseline/metrics.json    the dense model and its test metrics
    baseline/wall_time.json                       (and its training time)
    sensitivity/                                  with --sensitivity or --layer_quality=auto:
                                                  sensitivity.json, .md (table, suggested
                                                  layer_quality), .png (conv / dense panels)
    run/                                          history.jsonl, checkpoints, report.json,
                                                  figures/, tensorboard/ (the iterations),
                                                  target.json (target mode)
    final/model.keras, final/model.h5, final/saved_model/    the stripped pruned model
    final/sparse_saved_model/, final/model.tfspz  with --export_sparse / --compress (quick:
                                                  on), after --quantize_bits weight sharing
    final/model.tflite, final/model_int8.tflite   with --tflite (quick: on)
    summary.md                                    dense vs pruned top-1, zeros, compression,
                                                  sizes on disk, wall time (summed over
                                                  all the processes of the run), and every
                                                  exported form's size, latency and top-1

Target mode (--target_drop) starts at the first of --qualities and raises q by --q_step per
iteration, for at most --iterations, until top-1 on the test data drops more than
--target_drop points below dense; that iteration is undone. --layer_quality=auto multiplies
each iteration's q, per layer, by the largest q that layer alone tolerates in the sensitivity
analysis (no retraining) within --sensitivity_max_drop points.

--keras=3 runs it all on Keras 3, on the backend KERAS_BACKEND names, without loading
tf_keras or tfmot: the dense weights are baseline/weights.weights.h5 (Keras 3's suffix),
final/ holds no model.h5 and no TFLite files (tf_keras only; a note is printed), the
SavedModels are written on the tensorflow backend only, and the checkpoints hold the
model and optimizer but not the data pipeline's generator, so a resumed iteration sees
other batches than an uninterrupted one would. --strategy other than default,
--mixed_precision, --jit_compile and --cpu_replicas are refused there.

Run as a script, TensorFlow's start-up log lines are kept off the terminal
(`vgg19_config.quiet_start`; set TF_CPP_MIN_LOG_LEVEL=0 to see them), and so are its
Python INFO lines (SavedModel and TFLite writers).
"""
import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import tempfile
import time

import vgg19_config
from vgg19_config import PRESETS, RUN_SETTINGS, Config, config, validate  # noqa: F401

from absl import app, flags

with vgg19_config.quiet_start() if __name__ == "__main__" else contextlib.nullcontext():
    import numpy as np
    import tensorflow as tf

    import tf_stdprune
    from tf_stdprune import data, models
    from tf_stdprune.keras2 import run_state
    from tf_stdprune.io import atomic_write, clean_temporaries, write_atomically
    from tf_stdprune.keras2.run_state import check_writable
    from tf_stdprune.procedure.sensitivity import DEFAULT_QUALITIES, SensitivityRow, SensitivityTable
    if __name__ == "__main__":
        tf.config.list_physical_devices()  # the device probing logs its lines here
        tf.get_logger().setLevel("WARNING")  # no INFO lines from savers and converters

FLAGS = flags.FLAGS
vgg19_config.define_flags(FLAGS)
flags.adopt_module_key_flags(vgg19_config)  # --helpshort lists them


def claim_out_dir(cfg, chief):
    """Takes --out_dir's lock, refuses a resume with other settings, and puts back or
    deletes what a killed write left; every check comes before the baseline trains."""
    out_dir = cfg.out_dir
    settings = cfg.run_settings()
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
    for directory in (out_dir, *(os.path.join(out_dir, d)
                                 for d in ("baseline", "final", "sensitivity"))):
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


def set_mixed_precision(keras):
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def is_keras3(model):
    """Whether ``model`` is a Keras 3 object (its class comes from the ``keras`` package)."""
    return type(model).__module__.split(".")[0] == "keras"


def keras_of(model):
    """The Keras module ``model`` belongs to: Keras 3's ``keras`` or ``tf_keras``."""
    if is_keras3(model):
        import keras
        return keras
    from tf_stdprune.keras2.engine import keras
    return keras


def load_data(cfg):
    """``(train, test, info)`` of ``cfg.dataset``."""
    if cfg.dataset == "digits":
        return data.digits(batch_size=cfg.batch_size, augment=cfg.augment, seed=cfg.seed,
                           max_train_examples=cfg.max_train_examples)
    return data.cifar10(cfg.data_dir, batch_size=cfg.batch_size, augment=cfg.augment,
                        max_train_examples=cfg.max_train_examples, seed=cfg.seed)


def compile_model(model, jit_compile, optimizer=None):
    """``optimizer`` (default a new SGD with momentum 0.9, the rate set per epoch by the
    callbacks), cross-entropy, top-1/top-5, in ``model``'s Keras. A Keras 3 model is
    compiled with ``jit_compile="auto"`` (``jit_compile`` true is refused earlier); its
    pruning step is ``optimizer.iterations``, so every pruned model gets a new optimizer."""
    keras = keras_of(model)
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile="auto" if is_keras3(model) else jit_compile)
    return model


def evaluate(model, test):
    return {k: float(v) for k, v in model.evaluate(test, verbose=0, return_dict=True).items()}


def build_dense(cfg, strategy, info, build_model):
    """The compiled, untrained dense model; refuses --layer_quality names it lacks."""
    keras3 = {"keras_module": cfg.keras_module()} if cfg.keras == "3" else {}
    with strategy.scope():
        model = compile_model(build_model(info.num_classes, width=cfg.width,
                                          input_shape=info.image_shape, **keras3),
                              cfg.jit_compile)
    if isinstance(cfg.layer_quality, dict):
        unknown = sorted(set(cfg.layer_quality) - {layer.name for layer in model.layers})
        if unknown:
            raise app.UsageError(
                f"--layer_quality names {unknown}, which are not layers of the model; choose "
                f"among {[l.name for l in model.layers if l.weights]} (or give 'auto').")
    return model


def dense_baseline(cfg, model, train_test, write_dir):
    """Trains ``model`` (or reloads it from ``baseline/``); returns its test metrics."""
    train, test = train_test
    weights_name = baseline_weights_name(cfg)
    weights, metrics_path = (os.path.join(cfg.out_dir, "baseline", name)
                             for name in (weights_name, "metrics.json"))
    if cfg.resume and os.path.exists(metrics_path):  # metrics.json is written after the weights
        model.load_weights(weights)
        with open(metrics_path) as f:
            return json.load(f)
    started = time.time()
    history = model.fit(train, epochs=cfg.baseline_epochs, verbose=2, callbacks=[
        tf_stdprune.IterationLearningRate([cfg.baseline_lr], cfg.baseline_epochs,
                                          list(cfg.baseline_lr_drops))])
    # Evaluated as the pruned model will be: BN statistics re-estimated first.
    tf_stdprune.recalibrate_batchnorm(model, train, cfg.recalibration_batches)
    metrics = evaluate(model, test)
    check_finite(model, dict(metrics, train_loss=history.history["loss"][-1]))
    out_dir = os.path.join(write_dir, "baseline")
    os.makedirs(out_dir, exist_ok=True)
    write_atomically(os.path.join(out_dir, weights_name), model.save_weights)
    atomic_write(os.path.join(out_dir, "wall_time.json"),
                 json.dumps({"wall_time_s": time.time() - started}))
    atomic_write(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2))
    return metrics


def baseline_weights_name(cfg):
    """The dense weights' file in ``baseline/``: Keras 3 requires the ``.weights.h5`` suffix."""
    return "weights.weights.h5" if cfg.keras == "3" else "weights.h5"


def non_finite_weights(model):
    """Names of ``model``'s floating-point weights that hold a NaN or an infinity (either
    Keras: the values are read through NumPy)."""
    if not is_keras3(model):
        return run_state.non_finite_weights(model)
    values = ((w.path, np.asarray(w)) for w in model.weights)
    return [name for name, value in values
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all()]


def check_finite(model, metrics):
    """Raises `run_state.NonFiniteError` naming the weights and losses of the dense
    baseline that are NaN or infinite; nothing of it is saved."""
    bad = non_finite_weights(model)
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


def sensitivity_table(cfg, dense, test):
    """`tf_stdprune.sensitivity_analysis` of the dense model on the test data, or, when
    resuming, the table an earlier process of the run wrote (if it tried the same q)."""
    qualities = sorted(cfg.sensitivity_qualities or DEFAULT_QUALITIES)
    path = os.path.join(cfg.out_dir, "sensitivity", "sensitivity.json")
    if cfg.resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        table = SensitivityTable([SensitivityRow(**row) for row in saved["rows"]],
                                 saved["baseline"], saved["metric"])
        if sorted({row.q for row in table.rows}) == qualities:
            return table
    return tf_stdprune.sensitivity_analysis(dense, test, qualities=qualities)


def sensitivity_markdown(table, suggestion, max_drop):
    """The table (one row per layer and q) and the suggested ``layer_quality``."""
    rows = "".join(f"| {r.layer} | {r.kind} | {r.q:g} | {100 * r.zero_fraction:.2f} | "
                   f"{100 * r.accuracy:.2f} | {table.drop(r):.2f} |\n" for r in table.rows)
    factors = "".join(f"| {name} | {factor:g} |\n" for name, factor in suggestion.items())
    return (f"# Sensitivity: each layer pruned alone at q, no retraining\n\n"
            f"Dense {table.metric}: {100 * table.baseline:.2f} %.\n\n"
            f"| layer | kind | q | zeros (%) | {table.metric} (%) | drop (points) |\n"
            f"|---|---|---|---|---|---|\n{rows}\n"
            f"## layer_quality for --layer_quality=auto (drop <= {max_drop:g} points)\n\n"
            f"| layer | factor |\n|---|---|\n{factors}")


def layer_quality(cfg, dense, test, write_dir):
    """``cfg.layer_quality`` resolved: with --sensitivity or 'auto' the analysis runs and
    is written to ``sensitivity/``; 'auto' becomes its `suggest_layer_quality`."""
    if not (cfg.sensitivity or cfg.layer_quality == "auto"):
        return cfg.layer_quality
    table = sensitivity_table(cfg, dense, test)
    suggestion = tf_stdprune.suggest_layer_quality(table, cfg.sensitivity_max_drop)
    print(table)
    out_dir = os.path.join(write_dir, "sensitivity")
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "sensitivity.json"),
                 json.dumps(dict(table.to_dict(), layer_quality=suggestion,
                                 max_drop=cfg.sensitivity_max_drop), indent=2))
    atomic_write(os.path.join(out_dir, "sensitivity.md"),
                 sensitivity_markdown(table, suggestion, cfg.sensitivity_max_drop))
    table.plot(os.path.join(out_dir, "sensitivity.png"))
    return suggestion if cfg.layer_quality == "auto" else cfg.layer_quality


def pruned_model(cfg, dense, strategy, steps_per_epoch):
    """``prune_low_std(dense)`` with the iterations' schedule, compiled in ``strategy``."""
    with strategy.scope():
        schedule = tf_stdprune.StdPruningSchedule(
            list(cfg.qualities), steps_per_iteration=cfg.epochs_per_iteration * steps_per_epoch)
        return compile_model(tf_stdprune.prune_low_std(
            dense, pruning_schedule=schedule, std_mode=cfg.std_mode,
            layer_quality=cfg.layer_quality), cfg.jit_compile)


def prune_iteratively(cfg, pruned, data_and_info, run_dir):
    """The iterations as one ``fit`` (resumed from ``run_dir``'s last checkpoint). With
    --keras=2 every checkpoint also holds the data pipeline's generator
    (``info.generator``): a resumed run sees the same batches and crops as an
    uninterrupted one. A Keras 3 checkpoint holds the model and optimizer only."""
    train, test, info = data_and_info
    extras = {"data_rng": info.generator} if cfg.keras == "2" else None
    restore = {"extras": extras} if extras else {}
    initial_epoch = tf_stdprune.restore_run(pruned, run_dir, **restore) if cfg.resume else 0
    pruned.fit(train, epochs=cfg.iterations * cfg.epochs_per_iteration,
               initial_epoch=initial_epoch, verbose=2,
               callbacks=tf_stdprune.iterative_callbacks(
                   run_dir, cfg.epochs_per_iteration, list(cfg.initial_lrs), list(cfg.lr_drops),
                   rescale_dropout=cfg.rescale_dropout, target_accuracy_drop=cfg.target_drop,
                   q_step=cfg.q_step, validation_data=test, recalibration_data=train,
                   recalibration_batches=cfg.recalibration_batches,
                   **({"checkpoint_extras": extras} if extras else {})))


def saved_model_note(cfg):
    """Why no SavedModel is written (a Keras 3 run off the tensorflow backend), or None."""
    if cfg.keras == "3":
        backend = cfg.keras_module().backend.backend()
        if backend != "tensorflow":
            return (f"note: no SavedModel on the {backend} backend of Keras 3 (exports need "
                    "KERAS_BACKEND=tensorflow); final/saved_model/ is not written.")
    return None


def save_final(model, out_dir, cfg, train):
    """The stripped model as ``.keras``, ``.h5`` (tf_keras only) and a serving SavedModel
    (tf_keras, or Keras 3 on the tensorflow backend), plus the sparse SavedModel, the
    Huffman-coded file and the TFLite flatbuffers (tf_keras only), float32 and int8
    calibrated on a few training batches, if asked; returns ``{name: disk_size}``."""
    os.makedirs(out_dir, exist_ok=True)
    path = lambda name: os.path.join(out_dir, name)  # noqa: E731
    write_atomically(path("model.keras"), model.save)
    names = ["model.keras"]
    if cfg.keras == "2":
        write_atomically(path("model.h5"), model.save)
        names.append("model.h5")
    note = saved_model_note(cfg)
    if note:
        print(note)
    else:
        tf_stdprune.export_dense_saved_model(model, path("saved_model"), overwrite=True)
        names.append("saved_model")
    if cfg.export_sparse and not note:
        tf_stdprune.export_sparse_saved_model(model, path("sparse_saved_model"), overwrite=True)
        names.append("sparse_saved_model")
    if cfg.compress:
        tf_stdprune.compress(model, path("model.tfspz"), overwrite=True)
        names.append("model.tfspz")
    if cfg.tflite and cfg.keras == "3":
        print("note: no TFLite files with --keras=3 (the TFLite export takes tf_keras "
              "models); run with --keras=2 for final/model.tflite.")
    elif cfg.tflite and cfg.mixed_precision:
        print("note: no TFLite files with --mixed_precision (the converter takes float32 "
              "models); run without it for final/model.tflite.")
    elif cfg.tflite:
        tf_stdprune.export_tflite(model, path("model.tflite"), sparse=True, overwrite=True)
        tf_stdprune.export_tflite(model, path("model_int8.tflite"), sparse=True, int8=True,
                                  representative_data=train.take(4), overwrite=True)
        names += ["model.tflite", "model_int8.tflite"]
    return {name: tf_stdprune.disk_size(path(name)) for name in names}


def share_weights(final, cfg, strategy, train_test):
    """Trained quantization: k-means weight sharing (2^b centroids, zeros kept), then
    ``quantize_epochs`` of centroid fine-tuning with Adam at ``quantize_lr``.
    Returns the plain model with the shared values baked in, and the top-1 after each stage.
    Why Adam: see `tf_stdprune.keras2.quantize` (a centroid's gradient sums over its members).
    """
    train, test = train_test
    with strategy.scope():
        shared = compile_model(tf_stdprune.quantize_weights(final, bits=cfg.quantize_bits),
                               cfg.jit_compile, keras_of(final).optimizers.Adam(cfg.quantize_lr))
    accuracy = {"after clustering": evaluate(shared, test)["top1"]}
    if cfg.quantize_epochs:
        shared.fit(train, epochs=cfg.quantize_epochs, verbose=2)
        accuracy["after centroid fine-tuning"] = evaluate(shared, test)["top1"]
    with strategy.scope():
        return compile_model(tf_stdprune.strip_quantization(shared), cfg.jit_compile), accuracy


# The exported forms compared in summary.md: (name, file in final/).
FORMS = (("dense SavedModel", "saved_model"), ("sparse SavedModel", "sparse_saved_model"),
         ("TFLite", "model.tflite"), ("TFLite int8", "model_int8.tflite"),
         ("compressed file (decompressed, then run as the Keras model)", "model.tfspz"))
LATENCY_CALLS = 10  # calls at batch 1 whose median is reported
EVAL_BATCH = 256


def tflite_predictor(path):
    """``images -> logits`` through ``tf.lite.Interpreter`` (re-allocated on a new shape)."""
    interpreter = tf.lite.Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]
    shape = []

    def predict(x):
        if list(x.shape) != shape:
            interpreter.resize_tensor_input(source, list(x.shape))
            interpreter.allocate_tensors()
            shape[:] = list(x.shape)
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target)
    return predict


def predictor(path):
    """``images -> logits`` (numpy) running the exported form at ``path``; the
    compressed file is decompressed and run as the Keras model it holds."""
    if path.endswith(".tflite"):
        return tflite_predictor(path)
    if path.endswith(".tfspz"):
        model = tf_stdprune.decompress(path)
        if is_keras3(model):  # a jitted predict step on any backend
            return lambda x: np.asarray(model.predict_on_batch(x))
        call = tf.function(lambda x: model(x, training=False))
        return lambda x: call(tf.constant(x)).numpy()
    serve = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    return lambda x: next(iter(serve(**{name: tf.constant(x)}).values())).numpy()


def measure(predict, x, y):
    """``(median latency in ms of LATENCY_CALLS calls at batch 1, top-1 in % on (x, y))``."""
    predict(x[:1])  # builds, traces or allocates
    seconds = []
    for _ in range(LATENCY_CALLS):
        started = time.perf_counter()
        predict(x[:1])
        seconds.append(time.perf_counter() - started)
    logits = np.concatenate([predict(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
    return 1000 * statistics.median(seconds), 100 * float(np.mean(np.argmax(logits, 1) == y))


def forms_markdown(final_dir, test):
    """summary.md's table: size, latency at batch 1 and top-1 of every exported form."""
    x, y = (np.concatenate(part) for part in zip(*test.as_numpy_iterator()))
    x = x.astype(np.float32)
    rows = []
    for name, file in FORMS:
        path = os.path.join(final_dir, file)
        if os.path.exists(path):
            latency, top1 = measure(predictor(path), x, y)
            rows.append(f"| {name} | final/{file} | {tf_stdprune.disk_size(path)['bytes']} | "
                        f"{latency:.2f} | {top1:.2f} |\n")
    return (f"\n## Exported forms (latency: median of {LATENCY_CALLS} calls at batch 1; top-1 "
            f"on the {len(y)} test images)\n\n| form | file | size (bytes) | latency (ms) | "
            "top-1 (%) |\n|---|---|---|---|---|\n" + "".join(rows))


def target_rows(run_dir):
    """Target mode's outcome (``run/target.json``) as summary rows; none if absent."""
    path = os.path.join(run_dir, "target.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        target = json.load(f)
    rows = [("target mode: kept iteration", str(target["kept_iteration"])),
            ("target mode: kept q", "none (dense)" if target["kept_q"] is None
             else f"{target['kept_q']:.4g}")]
    if target["rejected_iteration"] is not None:
        rows.append(("target mode: rejected q (drop, points)",
                     f"{target['rejected_q']:.4g} ({target['rejected_accuracy_drop']:.2f})"))
    return rows


def summary_markdown(cfg, metrics, report, sizes, extra_rows=()):
    """summary.md's main table; ``metrics`` = ``{"dense": ..., "final": ...}``."""
    rows = [("dense top-1 (%)", f"{100 * metrics['dense']['top1']:.2f}"),
            ("pruned top-1 (%)", f"{100 * metrics['final']['top1']:.2f}"),
            ("total parameters", str(report.total_parameters)),
            ("total weights", str(report.total_weights)),
            ("zero weights", str(report.zero_weights)),
            ("zero weights rate (%)", f"{report.zero_weights_rate:.4f}"),
            ("zero parameters rate (%)", f"{report.zero_parameters_rate:.4f}"),
            ("compression rate", "all weights pruned" if report.to_dict()["compression_rate"] is None
             else f"x{report.compression_rate:.4f}")]
    rows += list(extra_rows)
    rows += [(f"size of final/{name} (bytes, gzip bytes)", f"{size['bytes']}, {size['gzip_bytes']}")
             for name, size in sizes.items()]
    q = (f"q from {cfg.qualities[0]} by {cfg.q_step} while top-1 drops <= {cfg.target_drop} "
         "points" if cfg.target_drop is not None else f"q {list(cfg.qualities)}")
    keras = (f", Keras 3 ({cfg.keras_module().backend.backend()} backend)"
             if cfg.keras == "3" else "")
    return (f"# {cfg.dataset}: VGG19-BN width {cfg.width}, {cfg.iterations} iterations "
            f"x {cfg.epochs_per_iteration} epochs, {q}, std_mode {cfg.std_mode}{keras}\n\n"
            "| measure | value |\n|---|---|\n"
            + "".join(f"| {name} | {value} |\n" for name, value in rows))


def finish(cfg, pruned, strategy, data_and_dir):
    """Strips, shares weights, saves every form; returns (summary text, final dir)."""
    (train, test), write_dir, dense_metrics = data_and_dir
    started = time.time()  # the iterations' and the baseline's times are in their records
    with strategy.scope():
        final = compile_model(tf_stdprune.strip_pruning(pruned), cfg.jit_compile)
    final_metrics = evaluate(final, test)
    report = tf_stdprune.sparsity_report(final)
    print(report)
    stages = {}
    if cfg.quantize_bits is not None:
        final, stages = share_weights(final, cfg, strategy, (train, test))
    final_dir = os.path.join(write_dir, "final")
    sizes = save_final(final, final_dir, cfg, train)
    chief = strategy.extended.should_checkpoint
    if cfg.compress and chief:
        storage = tf_stdprune.compression_report(os.path.join(final_dir, "model.tfspz"))
        print(storage.table())
        tf_stdprune.plot_compression_stages(
            storage, os.path.join(final_dir, "compression_stages.png"))
    run_dir = os.path.join(cfg.out_dir, "run")
    extra = target_rows(run_dir) + [(f"top-1 {stage} (%)", f"{100 * top1:.2f}")
                                    for stage, top1 in stages.items()]
    forms = forms_markdown(final_dir, test) if chief else ""
    seconds = (baseline_seconds(cfg.out_dir) + time.time() - started
               + sum(r["wall_time_s"] for r in run_state.read_history(run_dir)))
    extra.append(("wall time (s)", f"{seconds:.0f}"))
    return summary_markdown(cfg, {"dense": dense_metrics, "final": final_metrics}, report,
                            sizes, extra) + forms


def run(cfg, strategy, build_model=models.vgg19_bn):
    """Baseline, (sensitivity,) iterative pruning, stripped model and its exported forms,
    summary; returns (pruned model, summary text).

    ``build_model(num_classes, width=, input_shape=)`` makes the dense model.
    """
    # Every worker of a multi-worker strategy saves (saving may run collectives) and
    # resumes from --out_dir (a shared filesystem), but only the chief writes there.
    chief = strategy.extended.should_checkpoint
    claim_out_dir(cfg, chief)
    write_dir = cfg.out_dir if chief else tempfile.mkdtemp(prefix="vgg19-worker-")
    check_writable(write_dir)
    keras = cfg.keras_module()
    # A fresh session: layer names (which run.json and sensitivity.json record) are the
    # same in every run, also when main runs again in one process.
    keras.backend.clear_session()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.keras == "2":
        # Dropout draws from tf.random.Generator objects, which the checkpoints save.
        keras.backend.experimental.enable_tf_random_generator()
    train, test, info = load_data(cfg)
    try:
        dense = build_dense(cfg, strategy, info, build_model)
    except app.UsageError:
        run_state.release_lock(cfg.out_dir)
        raise
    dense_metrics = dense_baseline(cfg, dense, (train, test), write_dir)
    print(f"dense baseline: top-1 {100 * dense_metrics['top1']:.2f} %")
    resolved = dataclasses.replace(cfg, layer_quality=layer_quality(cfg, dense, test, write_dir))
    pruned = pruned_model(resolved, dense, strategy, info.steps_per_epoch)
    prune_iteratively(cfg, pruned, (train, test, info), os.path.join(cfg.out_dir, "run"))
    text = finish(cfg, pruned, strategy, ((train, test), write_dir, dense_metrics))
    if chief:
        atomic_write(os.path.join(write_dir, "summary.md"), text)
        print(text)
        run_state.release_lock(cfg.out_dir)
    else:
        shutil.rmtree(write_dir)
    return pruned, text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    cfg = config(FLAGS)
    validate(cfg)
    if not cfg.resume and os.path.exists(os.path.join(cfg.out_dir, "baseline")):
        raise app.UsageError(f"--out_dir {cfg.out_dir} holds a previous run: pass --resume "
                             "to continue it, or choose another --out_dir.")
    # Bit-identical reruns and resumes: TensorFlow picks deterministic kernels.
    tf.config.experimental.enable_op_determinism()
    if cfg.cpu_replicas:
        split_cpu(cfg.cpu_replicas)
    if cfg.mixed_precision:
        print("mixed precision policy:", set_mixed_precision(cfg.keras_module()))
    try:
        run(cfg, make_strategy(cfg.strategy))
    except data.DatasetUnavailableError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)

"""The stages of a whole pruning experiment in one output directory, either Keras: claim
the directory, train (or reload) the dense baseline, the sensitivity analysis, weight
sharing, every exported form, and the summary. Each stage writes atomically and is
skipped when an earlier process of the run finished it, so the same script resumes.

Layout of the output directory (``out_dir``)::

    run.json, lock                   the run's settings; its owner while it runs
    baseline/weights(.weights).h5    the dense weights (Keras 3 requires ``.weights.h5``),
    baseline/metrics.json            its test metrics (written last),
    baseline/wall_time.json          its training time
    sensitivity/                     sensitivity.json, .md (table, suggested layer_quality), .png
    run/                             the iterative procedure's run directory
    final/                           the stripped model and its exported forms
    summary.md                       dense vs pruned, every exported form side by side
"""
import contextlib
import json
import math
import os
import time

from absl import logging
import numpy as np
import tensorflow as tf

import tf_stdprune
from tf_stdprune.dispatch import KERAS3, keras_module, world_of
from tf_stdprune.io import atomic_write, clean_temporaries, write_atomically
from tf_stdprune.procedure.run_directory import (
    NonFiniteError, RunDirectoryError, acquire_lock, check_run_settings, check_writable,
    read_history, release_lock)
from tf_stdprune.procedure.iterative import BASELINE_PREDICTIONS, warn_unreachable_drops
from tf_stdprune.procedure.sensitivity import DEFAULT_QUALITIES, SensitivityRow, SensitivityTable
from tf_stdprune.validate import MAX_QUALITY


class SettingsError(RunDirectoryError):
    """The output directory holds a run made with other settings."""


def claim_out_dir(out_dir, settings, chief=True, stages=("baseline", "final", "sensitivity")):
    """Takes ``out_dir``'s lock (`RunDirectoryError` if a live process holds it), refuses
    (`SettingsError`, the lock released) a ``run.json`` with other ``settings``, puts back
    or deletes what a killed write left in ``out_dir`` and its ``stages``, then records
    ``settings``. A non-chief worker only compares.

    Examples:
      >>> claim_out_dir("runs/quick", {"seed": 0, "width": 0.25})
    """
    took = False
    if chief:
        check_writable(out_dir)
        took = acquire_lock(out_dir)
    try:
        check_run_settings(out_dir, settings, write=False)
    except RunDirectoryError as error:
        if took:
            release_lock(out_dir)
        raise SettingsError(str(error)) from error
    if not chief:
        return
    for directory in (out_dir, *(os.path.join(out_dir, d) for d in stages)):
        clean_temporaries(directory)
    check_run_settings(out_dir, settings)


def check_settings(prefix="", *, qualities, initial_lrs, lr_drops, epochs_per_iteration,
                   baseline_lr, baseline_lr_drops, baseline_epochs, width, q_step, target_drop,
                   sensitivity_max_drop, sensitivity_qualities, layer_quality):
    """Raises `ValueError` naming the setting (``prefix`` + its name, e.g. ``--qualities``),
    the value and the fix for every value that would fail later; warns of learning-rate
    drops that never fire and, in target mode, of the qualities after the first."""
    def listed(values):
        return ",".join(map(str, values))

    def positive(name, values):
        if not values or any(not (math.isfinite(v) and v > 0) for v in values):
            raise ValueError(f"{prefix}{name}={listed(values)}: every value must be a finite "
                             "number > 0.")

    def quality(name, values):
        if not values or any(not (math.isfinite(q) and 0 <= q <= MAX_QUALITY) for q in values):
            raise ValueError(f"{prefix}{name}={listed(values)}: every q must be a finite number "
                             ">= 0 (the threshold is q * sigma).")

    positive("initial_lrs", initial_lrs)
    positive("baseline_lr", [baseline_lr])
    positive("width", [width])
    quality("qualities", qualities)
    for name, drops in (("lr_drops", lr_drops), ("baseline_lr_drops", baseline_lr_drops)):
        if any(d < 0 for d in drops):
            raise ValueError(f"{prefix}{name}={listed(drops)}: drops are epochs >= 0.")
    if not (math.isfinite(sensitivity_max_drop) and sensitivity_max_drop >= 0):
        raise ValueError(f"{prefix}sensitivity_max_drop={sensitivity_max_drop}: give the points "
                         "of top-1 a layer may lose, a finite number >= 0, e.g. 1.0.")
    if sensitivity_qualities is not None:
        quality("sensitivity_qualities", sensitivity_qualities)
    if isinstance(layer_quality, dict):
        bad = {k: v for k, v in layer_quality.items()
               if not (math.isfinite(v) and 0 <= v <= MAX_QUALITY)}
        if bad:
            raise ValueError(f"{prefix}layer_quality: the factors {bad} must be finite numbers "
                             ">= 0 (a layer's q is the iteration's q times its factor; 0 keeps "
                             "it dense).")
    if target_drop is not None and not (math.isfinite(target_drop) and target_drop >= 0):
        raise ValueError(f"{prefix}target_drop={target_drop}: give the largest accepted drop of "
                         "top-1 below dense in points, a finite number >= 0, e.g. 0.5.")
    positive("q_step", [q_step])
    if target_drop is not None and len(qualities) > 1:
        logging.warning(
            "Target mode starts at %squalities' first value %s and raises q by %sq_step=%s per "
            "iteration: the values after it are not used.", prefix, qualities[0], prefix, q_step)
    warn_unreachable_drops(list(lr_drops), epochs_per_iteration)
    unreachable = [d for d in baseline_lr_drops if d >= baseline_epochs]
    if unreachable:
        logging.warning("%sbaseline_lr_drops %s never take effect: the baseline trains "
                        "%d epochs.", prefix, unreachable, baseline_epochs)


def parse_layer_quality(text):
    """``"auto"``, ``""``/``"none"`` (None) or ``"fc1=0.8,conv2d_3=1.2"`` -> ``{"fc1": 0.8,
    ...}``; raises `ValueError` naming the item that is not ``name=factor``.

    Examples:
      >>> parse_layer_quality("fc1=0.8,conv2d_3=1.2")
      {'fc1': 0.8, 'conv2d_3': 1.2}
    """
    if text in ("", "none"):
        return None
    if text == "auto":
        return "auto"
    factors = {}
    for item in text.split(","):
        name, equals, value = item.partition("=")
        try:
            factors[name.strip()] = float(value)
        except ValueError:
            equals = ""
        if not equals or not name.strip():
            raise ValueError(f"{item!r} is not name=factor. Give 'auto' (from the sensitivity "
                             "analysis) or e.g. dense=0.8,conv2d_3=1.2.")
    return factors


def non_finite_weights(model):
    """Names of ``model``'s floating-point weights that hold a NaN or an infinity (either
    Keras: Keras 3 names a weight by its path)."""
    names = []
    for weight in model.weights:
        value = np.asarray(weight.numpy() if hasattr(weight, "numpy") else weight)
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            names.append(weight.path if world_of(model) == KERAS3 else weight.name)
    return names


def check_finite(model, metrics, fix="lower the baseline's learning rate"):
    """Raises `NonFiniteError` naming the weights and losses of a trained dense baseline
    that are NaN or infinite (``fix`` says what to do)."""
    bad = non_finite_weights(model)
    bad += [f"{name} = {value}" for name, value in metrics.items()
            if "loss" in name and not math.isfinite(value)]
    if bad:
        raise NonFiniteError(f"The dense baseline diverged: {', '.join(bad[:5])} not finite. "
                             f"Nothing was saved; {fix} and run again.")


def compile_classifier(model, jit_compile=False, optimizer=None):
    """Compiles ``model`` (logits) in its own Keras with ``optimizer`` (default a new SGD
    with momentum 0.9; the procedure's callbacks set its rate every epoch), sparse
    cross-entropy and ``top1``/``top5`` accuracy; returns it. Keras 3 compiles with
    ``jit_compile="auto"``. A pruned model needs a new optimizer: its pruning step is
    ``optimizer.iterations``.

    Examples:
      >>> pruned = compile_classifier(tf_stdprune.prune_low_std(dense, pruning_schedule=s))
    """
    keras = keras_module(world_of(model))
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile="auto" if world_of(model) == KERAS3 else jit_compile)
    return model


def evaluate(model, data):
    """``model.evaluate`` as ``{metric: float}``."""
    return {k: float(v) for k, v in model.evaluate(data, verbose=0, return_dict=True).items()}


def baseline_weights_name(model):
    """The dense weights' file in ``baseline/``: Keras 3 requires ``.weights.h5``."""
    return "weights.weights.h5" if world_of(model) == KERAS3 else "weights.h5"


def dense_baseline(model, train, test, out_dir, *, epochs, lr, lr_drops, recalibration_batches,
                   resume=True, write_dir=None, fix="lower the baseline's learning rate"):
    """Trains the compiled dense ``model`` (SGD rate ``lr``, 10x lower at each of
    ``lr_drops``), re-estimates its BatchNormalization statistics as the pruned model's
    will be, and writes it to ``write_dir/baseline`` (default ``out_dir``); with
    ``resume`` a baseline ``out_dir`` holds is reloaded instead. Returns its test metrics.

    Examples:
      >>> metrics = dense_baseline(model, train, test, "runs/a", epochs=8, lr=0.01,
      ...                          lr_drops=[6], recalibration_batches=10)
    """
    name = baseline_weights_name(model)
    weights, metrics_path = (os.path.join(out_dir, "baseline", f) for f in (name, "metrics.json"))
    if resume and os.path.exists(metrics_path):  # metrics.json is written after the weights
        model.load_weights(weights)
        with open(metrics_path) as f:
            return json.load(f)
    started = time.time()
    history = model.fit(train, epochs=epochs, verbose=2, callbacks=[
        tf_stdprune.IterationLearningRate([lr], epochs, list(lr_drops))])
    tf_stdprune.recalibrate_batchnorm(model, train, recalibration_batches)
    metrics = evaluate(model, test)
    check_finite(model, dict(metrics, train_loss=history.history["loss"][-1]), fix)
    directory = os.path.join(write_dir or out_dir, "baseline")
    os.makedirs(directory, exist_ok=True)
    write_atomically(os.path.join(directory, name), model.save_weights)
    atomic_write(os.path.join(directory, "wall_time.json"),
                 json.dumps({"wall_time_s": time.time() - started}))
    atomic_write(os.path.join(directory, "metrics.json"), json.dumps(metrics, indent=2))
    return metrics


def wall_seconds(out_dir):
    """The baseline's and the iterations' recorded training times, summed (seconds)."""
    try:
        with open(os.path.join(out_dir, "baseline", "wall_time.json")) as f:
            seconds = float(json.load(f)["wall_time_s"])
    except (OSError, ValueError, KeyError):
        seconds = 0.0
    run_dir = os.path.join(out_dir, "run")
    return seconds + sum(r["wall_time_s"] for r in read_history(run_dir))


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


def resolve_layer_quality(layer_quality, analyse, dense, test, out_dir, qualities=None,
                          max_drop=1.0, resume=True, write_dir=None):
    """``layer_quality`` as ``prune_low_std`` takes it: with ``analyse`` or
    ``layer_quality="auto"`` the `sensitivity_stage` runs, and ``"auto"`` becomes its
    suggestion."""
    if not (analyse or layer_quality == "auto"):
        return layer_quality
    suggestion = sensitivity_stage(dense, test, out_dir, qualities, max_drop, resume, write_dir)
    return suggestion if layer_quality == "auto" else layer_quality


def set_mixed_precision(keras):
    """``mixed_float16`` on a GPU, else ``mixed_bfloat16``, as ``keras``'s global policy;
    returns its name."""
    policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def sensitivity_stage(dense, test, out_dir, qualities=None, max_drop=1.0, resume=True,
                      write_dir=None):
    """`tf_stdprune.sensitivity_analysis` of ``dense`` on ``test`` (or, resuming, the table
    an earlier process wrote for the same q), printed and written to ``sensitivity/``;
    returns `suggest_layer_quality` at ``max_drop`` points."""
    qualities = sorted(qualities or DEFAULT_QUALITIES)
    path = os.path.join(out_dir, "sensitivity", "sensitivity.json")
    table = None
    if resume and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        table = SensitivityTable([SensitivityRow(**row) for row in saved["rows"]],
                                 saved["baseline"], saved["metric"])
        if sorted({row.q for row in table.rows}) != qualities:
            table = None
    table = table or tf_stdprune.sensitivity_analysis(dense, test, qualities=qualities)
    suggestion = tf_stdprune.suggest_layer_quality(table, max_drop)
    print(table)
    directory = os.path.join(write_dir or out_dir, "sensitivity")
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, "sensitivity.json"), json.dumps(
        dict(table.to_dict(), layer_quality=suggestion, max_drop=max_drop), indent=2))
    atomic_write(os.path.join(directory, "sensitivity.md"),
                 sensitivity_markdown(table, suggestion, max_drop))
    table.plot(os.path.join(directory, "sensitivity.png"))
    return suggestion


def share_weights(model, bits, train, test, epochs, compile_model, optimizer,
                  scope=contextlib.nullcontext):
    """Trained quantization (Han, Mao and Dally 2016): k-means weight sharing with
    ``2^bits`` centroids (zeros kept), then ``epochs`` of centroid fine-tuning with
    ``optimizer()`` (e.g. Adam: a centroid's gradient sums over its members). Models are
    compiled by ``compile_model(model[, optimizer])`` inside ``scope()`` (a distribution
    strategy's). Returns the plain model with the shared values, and the top-1 after each
    stage."""
    with scope():
        shared = compile_model(tf_stdprune.quantize_weights(model, bits=bits), optimizer())
    accuracy = {"after clustering": evaluate(shared, test)["top1"]}
    if epochs:
        shared.fit(train, epochs=epochs, verbose=2)
        accuracy["after centroid fine-tuning"] = evaluate(shared, test)["top1"]
    with scope():
        return compile_model(tf_stdprune.strip_quantization(shared)), accuracy


def export_final(model, directory, *, sparse=False, compress=False, tflite=False,
                 calibration=None):
    """Writes the stripped ``model`` as ``model.keras``, ``model.h5`` (tf_keras) and a
    dense serving SavedModel (tf_keras, Keras 3 on TensorFlow) and, as asked, the sparse
    SavedModel, the Huffman-coded file and the TFLite flatbuffers (float32 and int8
    calibrated on ``calibration``; tf_keras float32 models). Returns ``({name:
    tf_stdprune.disk_size(...)}, notes)``, the notes saying which forms were not written."""
    world = world_of(model)
    backend = keras_module(world).backend.backend() if world == KERAS3 else "tensorflow"
    notes = [] if backend == "tensorflow" else [
        f"note: no SavedModel on the {backend} backend of Keras 3 (exports need "
        "KERAS_BACKEND=tensorflow); final/saved_model/ is not written."]
    mixed = any(getattr(getattr(layer, "dtype_policy", None), "name", "").startswith("mixed")
                for layer in model.layers)
    if tflite and (world == KERAS3 or mixed):
        notes.append("note: no TFLite files for a Keras 3 model (the TFLite export takes "
                     "tf_keras models)." if world == KERAS3 else "note: no TFLite files for "
                     "a mixed-precision model (the converter takes float32 models).")
        tflite = False
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    exports = [("model.keras", True, lambda p: write_atomically(p, model.save)),
               ("model.h5", world != KERAS3, lambda p: write_atomically(p, model.save)),
               ("saved_model", backend == "tensorflow",
                lambda p: tf_stdprune.export_dense_saved_model(model, p, overwrite=True)),
               ("sparse_saved_model", sparse and backend == "tensorflow",
                lambda p: tf_stdprune.export_sparse_saved_model(model, p, overwrite=True)),
               ("model.tfspz", compress, lambda p: tf_stdprune.compress(model, p, overwrite=True)),
               ("model.tflite", tflite,
                lambda p: tf_stdprune.export_tflite(model, p, sparse=True, overwrite=True)),
               ("model_int8.tflite", tflite, lambda p: tf_stdprune.export_tflite(
                   model, p, sparse=True, int8=True, representative_data=calibration,
                   overwrite=True))]
    written = []
    for name, wanted, export in exports:
        if wanted:
            export(path(name))
            written.append(name)
    return {name: tf_stdprune.disk_size(path(name)) for name in written}, notes


def dense_classes(run_dir):
    """``(predicted, labels)``: the dense model's validation top-1 classes that the
    iterative procedure saved in ``run_dir`` (`BASELINE_PREDICTIONS`), or None."""
    path = os.path.join(run_dir, BASELINE_PREDICTIONS)
    if not os.path.exists(path):
        return None
    with np.load(path) as saved:
        return saved["predicted"], saved["labels"]


def finish(pruned, train, test, out_dir, dense_metrics, *, title, jit_compile=False,
           quantize=None, exports=None, scope=contextlib.nullcontext, chief=True,
           write_dir=None, latency_threads=(1, 2)):
    """The last stages: strips ``pruned``, optionally shares weights (``quantize = (bits,
    epochs, Adam learning rate)``, `share_weights`), writes every form to ``final/``
    (`export_final` with ``exports``), compares them (`tf_stdprune.compare_forms`, latency
    at each of ``latency_threads``; none: no latency) and returns summary.md's text (the
    models compiled by `compile_classifier`). The top-1 changes are against the dense
    classes the procedure saved in ``out_dir/run`` (run with ``validation_data=test``);
    the pruned model's is its last iteration's ``val_top1_change``."""
    started, run_dir = time.time(), os.path.join(out_dir, "run")
    x, y = arrays(test)
    dense = dense_classes(run_dir)
    reference = dense[0] if dense is not None and np.array_equal(dense[1], y) else None
    history = read_history(run_dir)
    change = history[-1].get("val_top1_change") if history and reference is not None else None

    def compile_model(model, optimizer=None):
        return compile_classifier(model, jit_compile, optimizer)
    with scope():
        final = compile_model(tf_stdprune.strip_pruning(pruned))
    final_metrics = evaluate(final, test)
    report = tf_stdprune.sparsity_report(final)
    print(report)
    stages = {}
    if quantize:
        adam = keras_module(world_of(final)).optimizers.Adam
        final, stages = share_weights(final, quantize[0], train, test, quantize[1],
                                      compile_model, lambda: adam(quantize[2]), scope)
    final_dir = os.path.join(write_dir or out_dir, "final")
    sizes, notes = export_final(final, final_dir, calibration=train.take(4), **(exports or {}))
    for note in notes:
        print(note)
    if "model.tfspz" in sizes and chief:
        storage = tf_stdprune.compression_report(os.path.join(final_dir, "model.tfspz"))
        print(storage.table())
        tf_stdprune.plot_compression_stages(
            storage, os.path.join(final_dir, "compression_stages.png"))
    extra = target_rows(os.path.join(out_dir, "run")) + [
        (f"top-1 {stage} (%)", f"{100 * top1:.2f}") for stage, top1 in stages.items()]
    table = tf_stdprune.forms_markdown(tf_stdprune.compare_forms(
        final_dir, x, y, reference, latency_threads), len(y)) if chief else ""
    extra.append(("wall time (s)", f"{wall_seconds(out_dir) + time.time() - started:.0f}"))
    return markdown_table(title, summary_rows(dense_metrics["top1"], final_metrics["top1"],
                                              change, report, sizes, extra)) + table


def arrays(data):
    """``(x, y)`` numpy arrays of a dataset of ``(x, y)`` batches."""
    x, y = (np.concatenate(part) for part in zip(*data.as_numpy_iterator()))
    return x.astype(np.float32), y


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


def summary_rows(dense_top1, pruned_top1, change, report, sizes, extra=()):
    """summary.md's main rows: top-1 of both (fractions), the paired change
    (`tf_stdprune.accuracy_change` as a dict, or None), the sparsity report's counts,
    ``extra`` rows and each file's size."""
    rate = report.to_dict()["compression_rate"]
    return [("dense top-1 (%)", f"{100 * dense_top1:.2f}"),
            ("pruned top-1 (%)", f"{100 * pruned_top1:.2f}"),
            ("top-1 change, pruned - dense (points, exact McNemar 95 % interval)",
             "not known (no dense classes of the test images)" if change is None else
             f"{change['change']:+.2f} [{change['low']:+.2f}, {change['high']:+.2f}], p = "
             f"{change['p_value']:.3g}, {change['dense_only']} images only dense gets right, "
             f"{change['pruned_only']} only pruned, of {change['images']}"),
            ("total parameters", str(report.total_parameters)),
            ("total weights", str(report.total_weights)),
            ("zero weights", str(report.zero_weights)),
            ("zero weights rate (%)", f"{report.zero_weights_rate:.4f}"),
            ("zero parameters rate (%)", f"{report.zero_parameters_rate:.4f}"),
            ("compression rate", "all weights pruned" if rate is None
             else f"x{report.compression_rate:.4f}")] + list(extra) + [
        (f"size of final/{name} (bytes, gzip bytes)", f"{size['bytes']}, {size['gzip_bytes']}")
        for name, size in sizes.items()]


def markdown_table(title, rows):
    """``# title`` and a two-column ``| measure | value |`` table."""
    return (f"# {title}\n\n| measure | value |\n|---|---|\n"
            + "".join(f"| {name} | {value} |\n" for name, value in rows))


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

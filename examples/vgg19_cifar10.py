"""The reference experiment end to end: VGG19-BN, a dense baseline, then iterative std pruning.

    python examples/vgg19_cifar10.py                         # quick preset: digits, offline
    python examples/vgg19_cifar10.py --preset=paper --data_dir=~/tensorflow_datasets
    python examples/vgg19_cifar10.py --preset=paper --strategy=mirrored --mixed_precision --jit_compile
    python examples/vgg19_cifar10.py --layer_quality=auto    # per-layer q from a sensitivity scan
    python examples/vgg19_cifar10.py --target_drop=0.5 --q_step=0.1 --iterations=10
    KERAS_BACKEND=jax python examples/vgg19_cifar10.py --keras=3   # Keras 3 (or tensorflow)

Every setting is a field of `vgg19_config.Config` and a flag of the same name: a preset
fills them, each flag given replaces its field, and every flag is checked before anything
trains. Running the same command again resumes bit for bit (--keras=2): the dense baseline
is reloaded and pruning goes on from the last finished iteration; a resume with other
settings is refused, except more --iterations. The stages and the files they write in
--out_dir are those of `tf_stdprune.procedure.experiment`; summary.md compares dense and
pruned top-1 (with the exact McNemar interval of the change) and every exported form
(`tf_stdprune.compression.forms`: size, top-1, latency at 1 and 2 threads).

--keras=3 runs on Keras 3 on the backend KERAS_BACKEND names, without tf_keras or tfmot:
no model.h5 and no TFLite files, SavedModels on the tensorflow backend only, and a resumed
iteration sees other batches than an uninterrupted one (its checkpoints hold no data
generator). Log lines are printed plainly; --alsologtostderr shows absl's prefixes, and
TF_CPP_MIN_LOG_LEVEL=0 TensorFlow's start-up lines.
"""
import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
import warnings

from absl import app, flags

from tf_stdprune.console import plain_logs, quiet_start

with quiet_start() if __name__ == "__main__" else contextlib.nullcontext():
    import tensorflow as tf

    import vgg19_config
    from vgg19_config import PRESETS, Config, config, validate  # noqa: F401

    import tf_stdprune
    from tf_stdprune import data, models
    from tf_stdprune.compression import forms
    from tf_stdprune.dispatch import keras_module, world_of
    from tf_stdprune.io import atomic_write
    from tf_stdprune.procedure import experiment
    from tf_stdprune.procedure.experiment import make_strategy, split_cpu  # noqa: F401
    from tf_stdprune.procedure.run_directory import check_writable, release_lock
    if __name__ == "__main__":
        tf.config.list_physical_devices()  # the device probing logs its lines here
        tf.get_logger().setLevel("WARNING")  # no INFO lines from savers and converters

FLAGS = flags.FLAGS
vgg19_config.define_flags(FLAGS)
flags.adopt_module_key_flags(vgg19_config)  # --helpshort lists them


def claim_out_dir(cfg, chief):
    """--out_dir's lock and settings check (`experiment.claim_out_dir`)."""
    try:
        experiment.claim_out_dir(cfg.out_dir, cfg.run_settings(), chief)
    except experiment.SettingsError as error:
        raise app.UsageError(str(error)) from error


def load_data(cfg):
    """``(train, test, info)`` of ``cfg.dataset``."""
    if cfg.dataset == "digits":
        return data.digits(batch_size=cfg.batch_size, augment=cfg.augment, seed=cfg.seed,
                           max_train_examples=cfg.max_train_examples)
    return data.cifar10(cfg.data_dir, batch_size=cfg.batch_size, augment=cfg.augment,
                        max_train_examples=cfg.max_train_examples, seed=cfg.seed)


def compile_model(model, jit_compile, optimizer=None):
    """``optimizer`` (default a new SGD with momentum 0.9, the rate set per epoch by the
    callbacks), cross-entropy, top-1/top-5, in ``model``'s Keras; Keras 3 compiles with
    ``jit_compile="auto"``. Every pruned model gets a new optimizer (its pruning step)."""
    keras = keras_module(world_of(model))
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1"),
                 keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")],
        jit_compile="auto" if world_of(model) == "keras3" else jit_compile)
    return model


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
    return experiment.dense_baseline(
        model, *train_test, cfg.out_dir, epochs=cfg.baseline_epochs, lr=cfg.baseline_lr,
        lr_drops=cfg.baseline_lr_drops, recalibration_batches=cfg.recalibration_batches,
        resume=cfg.resume, write_dir=write_dir, fix="lower --baseline_lr")


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
    --keras=2 every checkpoint also holds the data pipeline's generator."""
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


def notes(cfg):
    """Why some forms are not written; the SavedModel's note first (or None)."""
    backend = cfg.keras_module().backend.backend() if cfg.keras == "3" else "tensorflow"
    saved_model = None if backend == "tensorflow" else (
        f"note: no SavedModel on the {backend} backend of Keras 3 (exports need "
        "KERAS_BACKEND=tensorflow); final/saved_model/ is not written.")
    tflite = [cfg.keras == "3" and "note: no TFLite files with --keras=3 (the TFLite export "
              "takes tf_keras models); run with --keras=2 for final/model.tflite.",
              cfg.mixed_precision and "note: no TFLite files with --mixed_precision (the "
              "converter takes float32 models); run without it for final/model.tflite."]
    return saved_model, [text for text in tflite if text and cfg.tflite][:1]


def finish(cfg, pruned, strategy, dense, data_and_dir):
    """Strips, shares weights, saves every form; returns summary.md's text. ``dense`` =
    ``(metrics, predictions, (x, y))`` of the dense baseline on the test data."""
    (train, test), write_dir = data_and_dir
    dense_metrics, dense_predictions, (x, y) = dense
    started = time.time()  # the iterations' and the baseline's times are in their records
    with strategy.scope():
        final = compile_model(tf_stdprune.strip_pruning(pruned), cfg.jit_compile)
    final_metrics = experiment.evaluate(final, test)
    report = tf_stdprune.sparsity_report(final)
    print(report)
    change = tf_stdprune.accuracy_change(dense_predictions,
                                         final.predict(x, batch_size=256, verbose=0), y)
    stages = {}
    if cfg.quantize_bits is not None:
        adam = lambda: keras_module(world_of(final)).optimizers.Adam(cfg.quantize_lr)  # noqa: E731
        final, stages = experiment.share_weights(
            final, cfg.quantize_bits, train, test, cfg.quantize_epochs,
            lambda m, optimizer=None: compile_model(m, cfg.jit_compile, optimizer), adam,
            strategy.scope)
    saved_model_note, tflite_notes = notes(cfg)
    for text in [saved_model_note, *tflite_notes]:
        if text:
            print(text)
    final_dir = os.path.join(write_dir, "final")
    sizes = experiment.export_final(
        final, final_dir, h5=cfg.keras == "2", saved_model=not saved_model_note,
        sparse=cfg.export_sparse, compress=cfg.compress,
        tflite=cfg.tflite and not tflite_notes, calibration=train.take(4))
    chief = strategy.extended.should_checkpoint
    if cfg.compress and chief:
        storage = tf_stdprune.compression_report(os.path.join(final_dir, "model.tfspz"))
        print(storage.table())
        tf_stdprune.plot_compression_stages(
            storage, os.path.join(final_dir, "compression_stages.png"))
    extra = experiment.target_rows(os.path.join(cfg.out_dir, "run")) + [
        (f"top-1 {stage} (%)", f"{100 * top1:.2f}") for stage, top1 in stages.items()]
    table = forms.forms_markdown(forms.compare_forms(final_dir, x, y, dense_predictions),
                                 len(y)) if chief else ""
    extra.append(("wall time (s)", f"{experiment.wall_seconds(cfg.out_dir) + time.time() - started:.0f}"))
    q = (f"q from {cfg.qualities[0]} by {cfg.q_step} while top-1 drops <= {cfg.target_drop} "
         "points" if cfg.target_drop is not None else f"q {list(cfg.qualities)}")
    keras = (f", Keras 3 ({cfg.keras_module().backend.backend()} backend)"
             if cfg.keras == "3" else "")
    title = (f"{cfg.dataset}: VGG19-BN width {cfg.width}, {cfg.iterations} iterations x "
             f"{cfg.epochs_per_iteration} epochs, {q}, std_mode {cfg.std_mode}{keras}")
    return experiment.markdown_table(title, experiment.summary_rows(
        dense_metrics["top1"], final_metrics["top1"], change, report, sizes, extra)) + table


def run(cfg, strategy, build_model=models.vgg19_bn):
    """Baseline, (sensitivity,) iterative pruning, stripped model and its exported forms,
    summary; returns (pruned model, summary text). ``build_model(num_classes, width=,
    input_shape=)`` makes the dense model."""
    # Every worker of a multi-worker strategy saves (saving may run collectives) and
    # resumes from --out_dir (a shared filesystem), but only the chief writes there.
    chief = strategy.extended.should_checkpoint
    claim_out_dir(cfg, chief)
    write_dir = cfg.out_dir if chief else tempfile.mkdtemp(prefix="vgg19-worker-")
    check_writable(write_dir)
    keras = cfg.keras_module()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.keras == "2":
        # Dropout draws from tf.random.Generator objects, which the checkpoints save.
        keras.backend.experimental.enable_tf_random_generator()
    train, test, info = load_data(cfg)
    try:
        dense = build_dense(cfg, strategy, info, build_model)
    except app.UsageError:
        release_lock(cfg.out_dir)
        raise
    dense_metrics = dense_baseline(cfg, dense, (train, test), write_dir)
    print(f"dense baseline: top-1 {100 * dense_metrics['top1']:.2f} %")
    x, y = experiment.arrays(test)  # the pruned model will share the dense one's layers
    dense_predictions = dense.predict(x, batch_size=256, verbose=0)
    layer_quality = cfg.layer_quality
    if cfg.sensitivity or layer_quality == "auto":
        suggestion = experiment.sensitivity_stage(
            dense, test, cfg.out_dir, cfg.sensitivity_qualities, cfg.sensitivity_max_drop,
            cfg.resume, write_dir)
        layer_quality = suggestion if layer_quality == "auto" else layer_quality
    resolved = dataclasses.replace(cfg, layer_quality=layer_quality)
    pruned = pruned_model(resolved, dense, strategy, info.steps_per_epoch)
    prune_iteratively(cfg, pruned, (train, test, info), os.path.join(cfg.out_dir, "run"))
    text = finish(cfg, pruned, strategy, (dense_metrics, dense_predictions, (x, y)),
                  ((train, test), write_dir))
    if chief:
        atomic_write(os.path.join(write_dir, "summary.md"), text)
        print(text)
        release_lock(cfg.out_dir)
    else:
        shutil.rmtree(write_dir)
    return pruned, text


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    verbose = FLAGS.alsologtostderr or FLAGS.logtostderr or FLAGS["verbosity"].present
    plain_logs(keep_prefixes=verbose)
    if not verbose:
        warnings.filterwarnings("ignore", message=r"\s*Warning: tf.lite.Interpreter is deprecated")
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
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"
        cfg.keras_module().mixed_precision.set_global_policy(policy)
        print("mixed precision policy:", policy)
    try:
        run(cfg, make_strategy(cfg.strategy))
    except data.DatasetUnavailableError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)

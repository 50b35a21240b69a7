"""The reference experiment end to end: VGG19-BN, a dense baseline, then iterative std pruning.

    python examples/vgg19_cifar10.py                         # quick preset: digits, offline
    python examples/vgg19_cifar10.py --preset=paper --data_dir=~/tensorflow_datasets
    python examples/vgg19_cifar10.py --preset=paper --strategy=mirrored --mixed_precision --jit_compile
    python examples/vgg19_cifar10.py --layer_quality=auto    # per-layer q from a sensitivity scan
    python examples/vgg19_cifar10.py --target_drop=0.5 --q_step=0.1 --iterations=10
    KERAS_BACKEND=jax python examples/vgg19_cifar10.py --keras=3   # Keras 3 (or tensorflow)

Every setting is a field of `vgg19_config.Config` and a flag of the same name, checked
before anything trains. The same command again resumes (bit for bit with --keras=2);
other settings are refused, except more --iterations. The stages and their files in
--out_dir: `tf_stdprune.procedure.experiment`. Log lines come plain (--alsologtostderr:
absl's prefixes; TF_CPP_MIN_LOG_LEVEL=0: TensorFlow's start-up lines).
"""
import contextlib
import dataclasses
import os
import shutil
import tempfile

from absl import app, flags

from tf_stdprune.console import plain_logs, quiet_start

with quiet_start() if __name__ == "__main__" else contextlib.nullcontext():
    import tensorflow as tf

    import vgg19_config
    from vgg19_config import PRESETS, Config, config, validate  # noqa: F401

    import tf_stdprune
    from tf_stdprune import data, models
    from tf_stdprune.io import atomic_write
    from tf_stdprune.procedure import experiment
    from tf_stdprune.procedure.experiment import make_strategy, split_cpu  # noqa: F401
    from tf_stdprune.procedure.run_directory import check_writable, release_lock

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


def build_dense(cfg, strategy, info, build_model):
    """The compiled, untrained dense model; refuses --layer_quality names it lacks."""
    keras3 = {"keras_module": cfg.keras_module()} if cfg.keras == "3" else {}
    with strategy.scope():
        model = experiment.compile_classifier(build_model(
            info.num_classes, width=cfg.width, input_shape=info.image_shape, **keras3),
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
        return experiment.compile_classifier(tf_stdprune.prune_low_std(
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


def finish(cfg, pruned, strategy, dense, data_and_dir):
    """Strips, shares weights, saves and compares every form (`experiment.finish`);
    returns summary.md's text."""
    (train, test), write_dir = data_and_dir
    q = (f"q from {cfg.qualities[0]} by {cfg.q_step} while top-1 drops <= {cfg.target_drop} "
         "points" if cfg.target_drop is not None else f"q {list(cfg.qualities)}")
    keras = (f", Keras 3 ({cfg.keras_module().backend.backend()} backend)"
             if cfg.keras == "3" else "")
    return experiment.finish(
        pruned, train, test, cfg.out_dir, dense, title=(
            f"{cfg.dataset}: VGG19-BN width {cfg.width}, {cfg.iterations} iterations x "
            f"{cfg.epochs_per_iteration} epochs, {q}, std_mode {cfg.std_mode}{keras}"),
        jit_compile=cfg.jit_compile,
        quantize=cfg.quantize_bits and (cfg.quantize_bits, cfg.quantize_epochs, cfg.quantize_lr),
        exports=dict(sparse=cfg.export_sparse, compress=cfg.compress, tflite=cfg.tflite),
        scope=strategy.scope, chief=strategy.extended.should_checkpoint, write_dir=write_dir,
        latency_threads=cfg.latency_threads)


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
    # A fresh Keras state: layer names (which run.json and sensitivity.json record) are the
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
        release_lock(cfg.out_dir)
        raise
    dense_metrics = dense_baseline(cfg, dense, (train, test), write_dir)
    print(f"dense baseline: top-1 {100 * dense_metrics['top1']:.2f} %")
    resolved = dataclasses.replace(cfg, layer_quality=experiment.resolve_layer_quality(
        cfg.layer_quality, cfg.sensitivity, dense, test, cfg.out_dir, cfg.sensitivity_qualities,
        cfg.sensitivity_max_drop, cfg.resume, write_dir))
    pruned = pruned_model(resolved, dense, strategy, info.steps_per_epoch)
    prune_iteratively(cfg, pruned, (train, test, info), os.path.join(cfg.out_dir, "run"))
    text = finish(cfg, pruned, strategy, dense_metrics, ((train, test), write_dir))
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
    plain_logs()  # no absl prefixes unless --alsologtostderr
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
        print("mixed precision policy:", experiment.set_mixed_precision(cfg.keras_module()))
    try:
        run(cfg, make_strategy(cfg.strategy))
    except data.DatasetUnavailableError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    app.run(main)

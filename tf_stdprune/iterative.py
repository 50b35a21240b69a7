"""The reference experiment's iterative procedure as callbacks for ONE ``model.fit`` call.

One *iteration* = a pruning stage (``|w| < q_i * sigma`` with that iteration's ``q_i``)
followed by ``E`` epochs of retraining. With ``I`` iterations::

    schedule = StdPruningSchedule(qualities, steps_per_iteration=E * steps_per_epoch)
    model = prune_low_std(model, pruning_schedule=schedule)
    model.compile(...)
    initial_epoch = restore_run(model, run_dir)         # 0 for a new run
    model.fit(data, epochs=I * E, initial_epoch=initial_epoch,
              callbacks=iterative_callbacks(run_dir, E, initial_lrs, ...))

`IterativePruning` prunes at the start of each iteration's first epoch, BEFORE any
retraining step (the wrapper records the step as pruned, so its own schedule does not
prune again inside the first batch), zeroes the optimizer slots at pruned positions,
recalibrates BatchNormalization, evaluates (before retraining), and at the iteration's
end recalibrates and evaluates again (after retraining), appends a line to
``history.jsonl``, writes TensorBoard scalars and an atomic checkpoint. At the end of
training it writes ``report.json`` and the figures. A new run (epoch 0) first evaluates
the still dense model into ``baseline.json`` (the figures' 0 % point).
"""
import json
import math
import numbers
import os
import time

from absl import logging
import tensorflow as tf

from tf_stdprune import plots
from tf_stdprune._keras import keras
from tf_stdprune.callbacks import DropoutRescaling, IterationLearningRate, UpdatePruningStep
from tf_stdprune.prune import all_layers
from tf_stdprune.recalibration import BATCHNORM_LAYERS, recalibrate_batchnorm
from tf_stdprune.report import sparsity_report
from tf_stdprune.io import atomic_write, clean_temporaries
from tf_stdprune.run_state import (
    HISTORY_FILE, STATE_FILE, NonFiniteError, acquire_lock, check_run_settings, check_writable,
    non_finite_weights, read_history, release_lock, run_settings, save_iteration)
from tf_stdprune.target import TargetAccuracy
from tf_stdprune.wrapper import PruneLowStd

# Names Keras gives a compiled top-1 accuracy; the history calls it ``top1``.
_TOP1_NAMES = {"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy"}


def _as_dataset(data, batch_size, argument):
    """``data`` as batches: a `tf.data.Dataset` as it is, ``(x, y[, w])`` arrays batched."""
    if data is None or isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, tuple) and 1 <= len(data) <= 3:
        return tf.data.Dataset.from_tensor_slices(data).batch(batch_size)
    raise TypeError(
        f"{argument} must be a batched tf.data.Dataset or a tuple (x, y) of arrays, got "
        f"{type(data).__name__}."
    )


def _saved_epoch(run_dir):
    """The epoch of ``run_dir``'s last checkpoint, or ``None`` if it has none."""
    path = os.path.join(run_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["epoch"]


class IterativePruning(keras.callbacks.Callback):
    """Prune, recalibrate, evaluate, retrain, log and checkpoint, iteration by iteration.

    Args:
      run_dir: directory of history, checkpoints, report and figures.
      epochs_per_iteration: ``E``; the wrappers' schedule must have
        ``steps_per_iteration = E * steps_per_epoch``.
      train_eval_data / validation_data: evaluated before and after retraining with
        ``model.evaluate``: the loss and the compiled metrics are logged, Keras's
        ``accuracy`` names renamed ``top1`` (compile
        ``SparseTopKCategoricalAccuracy(5, name="top5")`` to log top-5).
      recalibration_data: training batches for BN recalibration.
      recalibration_batches: ``K``, the number of batches it uses; ``0`` switches it off.
        On by default: a model with BatchNormalization needs ``recalibration_data``.
      batch_size: batch size of data given as ``(x, y)`` arrays.
      figures: write the figures at the end of training.
      acceptance: target mode's judge (`target.TargetAccuracy`): its
        ``accept(self, record)`` sees each finished iteration before it is checkpointed;
        an iteration it rejects is neither appended nor checkpointed here.
      checkpoint_extras: more trackables saved with every checkpoint, e.g.
        ``{"data": iterator}``; pass the same to `restore_run`.

    ``fit`` must start where the model and ``run_dir`` stand: at an iteration boundary, at
    ``epoch = pruning_step / steps_per_epoch``, and at the epoch of ``run_dir``'s last
    checkpoint if it has one (``initial_epoch=restore_run(model, run_dir)``); anything
    else raises ``ValueError`` before a file is touched. Under a multi-worker strategy
    only the chief writes files.

    The chief owns ``run_dir`` from the start of ``fit`` to its end (`acquire_lock`), and
    refuses a directory whose ``run.json`` records other settings (`check_run_settings`
    with `run_settings`), before writing anything. A NaN or infinite weight or loss after
    the baseline or an iteration raises `NonFiniteError` naming the layer and the
    iteration; that iteration is neither recorded nor checkpointed.
    """

    def __init__(self, run_dir, epochs_per_iteration, train_eval_data=None,
                 validation_data=None, recalibration_data=None, recalibration_batches=20,
                 batch_size=32, figures=True, checkpoint_extras=None, acceptance=None):
        super().__init__()
        self.acceptance = acceptance  # target mode: a `target.TargetAccuracy`, or None
        if not isinstance(epochs_per_iteration, numbers.Integral) or epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be an integer >= 1, got {epochs_per_iteration!r}.")
        if not isinstance(recalibration_batches, numbers.Integral) or recalibration_batches < 0:
            raise ValueError("recalibration_batches must be an integer >= 0 (0 switches BN "
                             f"recalibration off), got {recalibration_batches!r}.")
        self.run_dir, self.epochs_per_iteration = run_dir, epochs_per_iteration
        self.train_eval_data = _as_dataset(train_eval_data, batch_size, "train_eval_data")
        self.validation_data = _as_dataset(validation_data, batch_size, "validation_data")
        self.recalibration_data = _as_dataset(recalibration_data, batch_size, "recalibration_data")
        self.recalibration_batches = recalibration_batches
        self.figures = figures
        self.checkpoint_extras = checkpoint_extras

    def on_train_begin(self, logs=None):
        self.wrappers = [l for l in all_layers(self.model) if isinstance(l, PruneLowStd)]
        if not self.wrappers:
            raise ValueError("IterativePruning needs a model returned by tf_stdprune.prune_low_std.")
        self.steps = self.params.get("steps")
        if self.steps is None:
            raise ValueError(
                "model.fit does not know the number of steps per epoch (a dataset of unknown "
                "size): repeat the dataset and pass steps_per_epoch to model.fit, so that "
                "every epoch runs the same number of steps."
            )
        expected = self.epochs_per_iteration * self.steps
        for layer in self.wrappers:
            steps = getattr(layer.pruning_schedule, "steps_per_iteration", expected)
            if steps != expected:
                raise ValueError(
                    f"{layer.name}: the schedule's steps_per_iteration is {steps} but one "
                    f"iteration is epochs_per_iteration * steps_per_epoch = {expected} steps; "
                    "build StdPruningSchedule(qualities, steps_per_iteration=E * steps_per_epoch)."
                )
        if self.recalibration_batches and self.recalibration_data is None and any(
                isinstance(getattr(l, "layer", l), BATCHNORM_LAYERS) for l in all_layers(self.model)):
            raise ValueError(
                "The model has BatchNormalization layers, whose statistics go stale after "
                "pruning: pass recalibration_data=<batches of the training data>, or "
                "recalibration_batches=0 to switch recalibration off."
            )
        if self.params["epochs"] % self.epochs_per_iteration:
            logging.warning("fit runs %d epochs, not a multiple of epochs_per_iteration=%d: the "
                            "last, incomplete iteration is neither logged nor checkpointed.",
                            self.params["epochs"], self.epochs_per_iteration)
        self.iterations = self.params["epochs"] // self.epochs_per_iteration
        self.chief = self.model.distribute_strategy.extended.should_checkpoint
        if self.chief:
            self._claim_run_dir()
            check_writable(self.run_dir)
            self.writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))
        self.history, self.started = None, None

    def _start(self, epoch):
        """Checks that ``fit`` starts where the model and ``run_dir`` stand; the baseline."""
        step = int(self.wrappers[0].pruning_step.numpy())
        saved_epoch = _saved_epoch(self.run_dir)
        if (epoch % self.epochs_per_iteration or step != epoch * self.steps
                or saved_epoch not in (None, epoch)):
            if self.chief:
                release_lock(self.run_dir)
            where = (f"{self.run_dir} holds a run finished up to epoch {saved_epoch}"
                     if saved_epoch is not None else f"{self.run_dir} holds no checkpoint")
            raise ValueError(
                f"model.fit starts at epoch {epoch} but the model's pruning step is {step} "
                f"({self.steps} steps per epoch) and {where}. To continue a run, pass "
                "initial_epoch=tf_stdprune.restore_run(model, run_dir) to model.fit; to start "
                "anew, use a new run_dir (or delete this one) and a freshly pruned model."
            )
        self.history = [r for r in read_history(self.run_dir)
                        if r["iteration"] <= epoch // self.epochs_per_iteration]
        if self.chief:
            check_run_settings(self.run_dir, self.settings)
        if epoch == 0:
            baseline = self._evaluate()
            self._check_finite("the dense baseline", baseline)
            if self.chief:
                atomic_write(os.path.join(self.run_dir, HISTORY_FILE), "")
                atomic_write(os.path.join(self.run_dir, "baseline.json"), json.dumps(baseline, indent=2))

    def on_epoch_begin(self, epoch, logs=None):
        if self.history is None:
            self._start(epoch)
        if epoch % self.epochs_per_iteration:
            return
        self.started, self.learning_rates = time.time(), []
        step = int(self.wrappers[0].pruning_step.numpy())
        self.quality = None
        for layer in self.wrappers:
            should_prune, quality = layer.pruning_schedule(step + 1)  # the next call's step
            if bool(should_prune):
                layer.pruning_obj.update_masks(quality)
                layer.mask_optimizer_slots(self.model.optimizer)
                self.quality = float(quality)
        self.before = self._recalibrate_and_evaluate()

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.wrappers[0].pruning_step.numpy())
        if step != (epoch + 1) * self.steps:
            raise ValueError(
                f"After epoch {epoch} the pruning step is {step}, not (epoch + 1) * "
                f"steps_per_epoch = {(epoch + 1) * self.steps}: every epoch must run exactly "
                "steps_per_epoch steps, or pruning drifts away from the iteration starts."
            )
        self.learning_rates.append(float(keras.backend.get_value(self.model.optimizer.learning_rate)))
        if (epoch + 1) % self.epochs_per_iteration:
            return
        after = self._recalibrate_and_evaluate()
        report = sparsity_report(self.model)
        iteration = (epoch + 1) // self.epochs_per_iteration
        record = {
            "iteration": iteration,
            "q": self.quality,
            "learning_rates": self.learning_rates,
            "before": self.before,
            "after": after,
            "fit_logs": {k: float(v) for k, v in (logs or {}).items()},
            "zero_weights": report.zero_weights,
            "zero_weights_rate": report.zero_weights_rate,
            "zero_parameters_rate": report.zero_parameters_rate,
            "compression_rate": report.to_dict()["compression_rate"],  # null: all pruned
            "total_parameters": report.total_parameters,
            "layer_zeros": {l.name: l.zeros for l in report.layers},
            "wall_time_s": time.time() - self.started,
        }
        self._check_finite(f"iteration {iteration}", dict(after, **record["fit_logs"]))
        if self.acceptance is not None and not self.acceptance.accept(self, record):
            return  # rejected: the acceptance restored the last kept state and stops fit
        self.history.append(record)
        save_iteration(self.model, self.run_dir, iteration, epoch + 1, self.history, self.chief,
                       self.checkpoint_extras)
        self._log(record)

    def on_train_end(self, logs=None):
        report = sparsity_report(self.model)
        logging.info("\n%s\n%s", report, report.table())
        if not self.chief:
            return
        self.writer.close()
        atomic_write(os.path.join(self.run_dir, "report.json"), report.to_json())
        if self.figures:
            plots.write_figures(self.run_dir)
        release_lock(self.run_dir)

    def _claim_run_dir(self):
        """Takes ``run_dir``'s lock and checks its ``run.json``; changes nothing else."""
        self.settings = run_settings(self.model, self.epochs_per_iteration)
        took = acquire_lock(self.run_dir)
        try:
            check_run_settings(self.run_dir, self.settings, write=False)
            clean_temporaries(self.run_dir)
            clean_temporaries(os.path.join(self.run_dir, "checkpoints"))
        except BaseException:
            if took:
                release_lock(self.run_dir)
            raise

    def _check_finite(self, where, losses):
        """Raises `NonFiniteError` if a weight or one of ``losses`` is NaN or infinite."""
        bad = [f"weight {name}" for name in non_finite_weights(self.model)]
        bad += [f"{name} = {value}" for name, value in losses.items()
                if "loss" in name and not math.isfinite(value)]
        if bad:
            if self.chief:
                release_lock(self.run_dir)
            raise NonFiniteError(
                f"Training diverged: after {where}, {', '.join(bad[:5])}"
                f"{' and more' if len(bad) > 5 else ''} is not finite. Nothing of it was "
                f"recorded; {self.run_dir} still holds the last good checkpoint. Lower the "
                "learning rate (initial_lrs) or q, then resume.")

    def _recalibrate_and_evaluate(self):
        if self.recalibration_data is not None and self.recalibration_batches:
            recalibrate_batchnorm(self.model, self.recalibration_data, self.recalibration_batches)
        return self._evaluate()

    def _evaluate(self):
        results = {}
        for split, data in (("train", self.train_eval_data), ("val", self.validation_data)):
            if data is not None:
                for name, value in self.model.evaluate(data, verbose=0, return_dict=True).items():
                    name = "top1" if name in _TOP1_NAMES else name
                    results[f"{split}_{name}"] = float(value)
        self.model.reset_metrics()  # fit's epoch metrics must not include the evaluation
        if results and not any(key.endswith("_top1") for key in results):
            logging.warning("No accuracy among the compiled metrics (%s): compile with "
                            "metrics=['accuracy'] to log top-1.", sorted(results))
        return results

    def _log(self, record):
        before, after = record["before"].get("val_top1"), record["after"].get("val_top1")
        accuracy = (f"  val {100 * before:.2f} % -> {100 * after:.2f} %"
                    if before is not None and after is not None else "")
        quality = f"{record['q']:.3g}" if record["q"] is not None else "-"
        rate = record["compression_rate"]
        logging.info("iteration %d/%d  q=%s  zeros %.1f %%  %s%s", record["iteration"],
                     self.iterations, quality, record["zero_parameters_rate"],
                     "all weights pruned" if rate is None else f"x{rate:.2f}", accuracy)
        if not self.chief:
            return
        with self.writer.as_default():
            scalars = {"q": record["q"], "zero_weights_rate": record["zero_weights_rate"],
                       "zero_parameters_rate": record["zero_parameters_rate"],
                       "compression_rate": record["compression_rate"]}
            scalars.update({f"before/{k}": v for k, v in record["before"].items()})
            scalars.update({f"after/{k}": v for k, v in record["after"].items()})
            for name, value in scalars.items():
                if value is not None:
                    tf.summary.scalar(name, value, step=record["iteration"])
        self.writer.flush()


def warn_unreachable_drops(lr_drops, epochs_per_iteration):
    """Logs a warning naming the drops at or beyond ``epochs_per_iteration``: epochs
    inside an iteration run from 0 to ``E - 1``, so such a drop never lowers the rate.
    Returns them."""
    unreachable = sorted(d for d in lr_drops
                         if isinstance(d, numbers.Real) and d >= epochs_per_iteration)
    if unreachable:
        logging.warning(
            "lr_drops %s never take effect: an iteration has epochs 0..%d "
            "(epochs_per_iteration=%d). Give drops below %d, or more epochs per iteration.",
            unreachable, epochs_per_iteration - 1, epochs_per_iteration, epochs_per_iteration)
    return unreachable


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, lr_drops=(3, 10, 16),
                        lr_drop_factor=0.1, rescale_dropout=True, target_accuracy_drop=None,
                        q_step=0.1, **kwargs):
    """The callbacks of the reference experiment's procedure, in the order they must run.

    `UpdatePruningStep`, `IterationLearningRate(initial_lrs, E, lr_drops, lr_drop_factor)`
    and `IterativePruning(run_dir, E, **kwargs)`; then, unless ``rescale_dropout`` is
    false, `callbacks.DropoutRescaling` (Han et al. 2015's ``D_r = D_o sqrt(C_ir / C_io)``
    after each pruning). With ``target_accuracy_drop`` (points of validation top-1) the
    run is in target mode (`target.TargetAccuracy`): q rises by ``q_step`` per iteration
    until an iteration drops more than that below dense; that iteration is rejected, the
    last accepted state restored, and training stops. Drops that can never fire (at or
    beyond ``E``) are named in a warning (`warn_unreachable_drops`).
    """
    if isinstance(epochs_per_iteration, numbers.Integral):
        warn_unreachable_drops(lr_drops, epochs_per_iteration)
    callbacks = [
        UpdatePruningStep(),
        IterationLearningRate(initial_lrs, epochs_per_iteration, lr_drops, lr_drop_factor),
    ]
    if target_accuracy_drop is not None:
        if kwargs.get("validation_data") is None:
            raise ValueError("target_accuracy_drop compares validation top-1 with the dense "
                             "model: pass validation_data=(x, y) or a dataset.")
        target = TargetAccuracy(run_dir, target_accuracy_drop, q_step)
        kwargs["acceptance"] = target
    callbacks.append(IterativePruning(run_dir, epochs_per_iteration, **kwargs))
    if target_accuracy_drop is not None:
        # After IterativePruning: run.json records the schedule as given, which a resumed
        # run is built with again; the raised q list is derived from it at every start.
        callbacks.append(target)
    if rescale_dropout:
        callbacks.append(DropoutRescaling())
    return callbacks

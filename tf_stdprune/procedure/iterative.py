"""The reference experiment's iterative procedure, for either Keras: the logic, no Keras.

One *iteration* = a pruning stage (``|w| < q_i * sigma`` with that iteration's ``q_i``)
followed by ``E`` epochs of retraining. With ``I`` iterations::

    schedule = StdPruningSchedule(qualities, steps_per_iteration=E * steps_per_epoch)
    model = prune_low_std(model, pruning_schedule=schedule)
    model.compile(...)
    initial_epoch = restore_run(model, run_dir)         # 0 for a new run
    model.fit(data, epochs=I * E, initial_epoch=initial_epoch,
              callbacks=iterative_callbacks(run_dir, E, initial_lrs, ...))

The classes here hold what both worlds share (when to prune, what to record, when to
check, write and refuse); each Keras's callback derives from one of them and from its own
``keras.callbacks.Callback``, and supplies the few operations that differ (how masks are
recomputed, how BatchNormalization is recalibrated, how data is evaluated, how a
checkpoint is written): `keras2.iterative` for tf_keras, `keras3.iterative` for Keras 3. This
module imports no Keras.
"""
import json
import math
import numbers
import os
import time

from absl import logging
import numpy as np

from tf_stdprune import dispatch

from tf_stdprune import plots
from tf_stdprune.accuracy import accuracy_change
from tf_stdprune.procedure.dropout import dropout_sources, rescale_dropout, restore_dropout
from tf_stdprune.io import atomic_write, clean_temporaries, write_atomically
from tf_stdprune.report import sparsity_report
from tf_stdprune.procedure.run_directory import (
    CHECKPOINTS, HISTORY_FILE, NonFiniteError, acquire_lock, check_run_settings,
    check_writable, read_history, release_lock, run_settings, saved_epoch)
from tf_stdprune.validate import check_int, check_nonnegative, check_positive

BASELINE_PREDICTIONS = "baseline_predictions.npz"  # the dense model's validation classes


def _save_classes(path, predicted, labels):
    with open(path, "wb") as f:
        np.savez(f, predicted=predicted, labels=labels)


def predicted_classes(model, data):
    """``(top-1 classes, labels)`` of ``model`` on ``data``: ``(x, y[, w])`` arrays or
    batches of them (a `tf.data.Dataset`). The batches' inputs are gathered with their
    own labels (a reshuffled dataset stays paired) and predicted in one ``predict`` call.
    None when the inputs are not one array or the labels are not class indices (or one-hot
    rows)."""
    batches = [data[:2]] if isinstance(data, tuple) else [batch[:2] for batch in data]
    if not batches or any(isinstance(x, (dict, list, tuple)) for x, _ in batches):
        return None
    x = np.concatenate([np.asarray(x) for x, _ in batches])
    y = np.concatenate([np.asarray(y) for _, y in batches])
    if y.ndim == 2 and y.shape[1] > 1:
        y = np.argmax(y, axis=1)
    scores = np.asarray(model.predict(x, batch_size=len(batches[0][0]), verbose=0))
    if scores.ndim != 2 or y.reshape(-1).shape[0] != scores.shape[0]:
        return None
    return np.argmax(scores, axis=1), y.reshape(-1)


# Names Keras gives a compiled top-1 accuracy; the history calls it ``top1``.
TOP1_NAMES = {"accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy"}


def check_data(data, argument):
    """Raises `TypeError` unless ``data`` is None, a tuple ``(x, y[, w])`` of arrays, or
    an iterable of batches (a `tf.data.Dataset`, a ``keras.utils.PyDataset``, ...)."""
    if data is None or (isinstance(data, tuple) and 1 <= len(data) <= 3):
        return data
    if isinstance(data, (tuple, list, dict, str, bytes)) or not hasattr(data, "__iter__"):
        raise TypeError(
            f"{argument} must be a batched tf.data.Dataset or a tuple (x, y) of arrays, got "
            f"{type(data).__name__}."
        )
    return data


class IterativePruningLogic:
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
      acceptance: target mode's judge (`target.TargetAccuracyLogic`): its
        ``accept(self, record)`` sees each finished iteration before it is checkpointed;
        an iteration it rejects is neither appended nor checkpointed here.
      checkpoint_extras: more objects saved with every checkpoint (tf_keras: trackables,
        e.g. ``{"data": iterator}``); pass the same to `restore_run`.

    The iteration starts at its first epoch's start: the masks shrink with that
    iteration's ``q`` BEFORE any retraining step, the optimizer slots are zeroed at pruned
    positions, BatchNormalization is recalibrated and the model evaluated (``before``).
    At the iteration's end it is recalibrated and evaluated again (``after``), a line is
    appended to ``history.jsonl`` and an atomic checkpoint written. At the end of
    training ``report.json`` and the figures are written. A new run (epoch 0) first
    evaluates the still dense model into ``baseline.json`` (the figures' 0 % point) and
    its validation classes into `BASELINE_PREDICTIONS`; each record's ``val_top1_change``
    is then the validation top-1 change against dense with its exact McNemar 95 %
    interval (`tf_stdprune.accuracy_change`; None without validation class labels).

    ``fit`` must start where the model and ``run_dir`` stand: at an iteration boundary, at
    ``epoch = pruning_step / steps_per_epoch``, and at the epoch of ``run_dir``'s last
    checkpoint if it has one (``initial_epoch=restore_run(model, run_dir)``); anything
    else raises ``ValueError`` before a file is touched. Only the chief writes files.

    The chief owns ``run_dir`` from the start of ``fit`` to its end (`acquire_lock`), and
    refuses a directory whose ``run.json`` records other settings (`check_run_settings`
    with `run_settings`), before writing anything. A NaN or infinite weight or loss after
    the baseline or an iteration raises `NonFiniteError` naming the layer and the
    iteration; that iteration is neither recorded nor checkpointed.

    A world's subclass supplies: ``convert_data(data, batch_size)``, ``find_wrappers()``,
    ``has_batchnorm()``, ``is_chief()``, ``pruning_step()``, ``prune_iteration(step)``
    (returns the ``q`` it pruned with, or None), ``recalibrate()``,
    ``evaluate_data(data)``, ``learning_rate()``, ``non_finite_weights()``,
    ``save_checkpoint(iteration, epoch)`` and ``write_scalars(scalars, iteration)``.
    """

    def __init__(self, run_dir, epochs_per_iteration, train_eval_data=None,
                 validation_data=None, recalibration_data=None, recalibration_batches=20,
                 batch_size=32, figures=True, checkpoint_extras=None, acceptance=None):
        super().__init__()
        self.acceptance = acceptance  # target mode: a `target.TargetAccuracyLogic`, or None
        if not isinstance(epochs_per_iteration, numbers.Integral) or epochs_per_iteration < 1:
            raise ValueError(f"epochs_per_iteration must be an integer >= 1, got {epochs_per_iteration!r}.")
        if not isinstance(recalibration_batches, numbers.Integral) or recalibration_batches < 0:
            raise ValueError("recalibration_batches must be an integer >= 0 (0 switches BN "
                             f"recalibration off), got {recalibration_batches!r}.")
        self.run_dir, self.epochs_per_iteration = run_dir, epochs_per_iteration
        self.train_eval_data = self.convert_data(
            check_data(train_eval_data, "train_eval_data"), batch_size)
        self.validation_data = self.convert_data(
            check_data(validation_data, "validation_data"), batch_size)
        self.recalibration_data = self.convert_data(
            check_data(recalibration_data, "recalibration_data"), batch_size)
        self.recalibration_batches, self.batch_size = recalibration_batches, batch_size
        self.figures = figures
        self.checkpoint_extras = checkpoint_extras

    # ------------------------------------------------------------------ fit's hooks

    def on_train_begin(self, logs=None):
        self.wrappers = self.find_wrappers()
        if not self.wrappers:
            raise ValueError("IterativePruning needs a model returned by tf_stdprune.prune_low_std.")
        self._check_fit_parameters()
        self.iterations = self.params["epochs"] // self.epochs_per_iteration
        self.chief = self.is_chief()
        if self.chief:
            self._claim_run_dir()
            check_writable(self.run_dir)
            self.open_writer()
        self.history, self.started = None, None

    def on_epoch_begin(self, epoch, logs=None):
        if self.history is None:
            self._start(epoch)
        if epoch % self.epochs_per_iteration:
            return
        self.started, self.learning_rates = time.time(), []
        self.quality = self.prune_iteration(self.pruning_step() + 1)  # the next call's step
        self.before = self._recalibrate_and_evaluate()

    def on_epoch_end(self, epoch, logs=None):
        step = self.pruning_step()
        if step != (epoch + 1) * self.steps:
            raise ValueError(
                f"After epoch {epoch} the pruning step is {step}, not (epoch + 1) * "
                f"steps_per_epoch = {(epoch + 1) * self.steps}: every epoch must run exactly "
                "steps_per_epoch steps, or pruning drifts away from the iteration starts."
            )
        self.learning_rates.append(self.learning_rate())
        if (epoch + 1) % self.epochs_per_iteration:
            return
        iteration = (epoch + 1) // self.epochs_per_iteration
        record = self._record(iteration, self._recalibrate_and_evaluate(), logs)
        self._check_finite(f"iteration {iteration}", dict(record["after"], **record["fit_logs"]))
        if self.acceptance is not None and not self.acceptance.accept(self, record):
            return  # rejected: the acceptance restored the last kept state and stops fit
        self.history.append(record)
        self.save_checkpoint(iteration, epoch + 1)
        self._log(record)

    def on_train_end(self, logs=None):
        report = sparsity_report(self.model)
        logging.info("\n%s\n%s", report, report.table())
        if not self.chief:
            return
        self.close_writer()
        atomic_write(os.path.join(self.run_dir, "report.json"), report.to_json())
        if self.figures:
            plots.write_figures(self.run_dir)
        release_lock(self.run_dir)

    # ------------------------------------------------------------------ checks

    def _check_fit_parameters(self):
        """Raises unless every epoch has a known number of steps that matches the
        schedules, and BatchNormalization has recalibration data (or it is switched off)."""
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
        if self.recalibration_batches and self.recalibration_data is None and self.has_batchnorm():
            raise ValueError(
                "The model has BatchNormalization layers, whose statistics go stale after "
                "pruning: pass recalibration_data=<batches of the training data>, or "
                "recalibration_batches=0 to switch recalibration off."
            )
        if self.params["epochs"] % self.epochs_per_iteration:
            logging.warning("fit runs %d epochs, not a multiple of epochs_per_iteration=%d: the "
                            "last, incomplete iteration is neither logged nor checkpointed.",
                            self.params["epochs"], self.epochs_per_iteration)

    def _claim_run_dir(self):
        """Takes ``run_dir``'s lock and checks its ``run.json``; changes nothing else."""
        self.settings = run_settings(self.model, self.epochs_per_iteration)
        took = acquire_lock(self.run_dir)
        try:
            check_run_settings(self.run_dir, self.settings, write=False)
            clean_temporaries(self.run_dir)
            clean_temporaries(os.path.join(self.run_dir, CHECKPOINTS))
        except BaseException:
            if took:
                release_lock(self.run_dir)
            raise

    def _start(self, epoch):
        """Checks that ``fit`` starts where the model and ``run_dir`` stand; the baseline."""
        step = self.pruning_step()
        saved = saved_epoch(self.run_dir)
        if epoch % self.epochs_per_iteration or step != epoch * self.steps \
                or saved not in (None, epoch):
            if self.chief:
                release_lock(self.run_dir)
            where = (f"{self.run_dir} holds a run finished up to epoch {saved}"
                     if saved is not None else f"{self.run_dir} holds no checkpoint")
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
        path = os.path.join(self.run_dir, BASELINE_PREDICTIONS)
        self.dense_classes = None
        if epoch == 0:
            baseline = self._evaluate()
            self._check_finite("the dense baseline", baseline)
            self.dense_classes = self._validation_classes()
            if self.chief:
                atomic_write(os.path.join(self.run_dir, HISTORY_FILE), "")
                atomic_write(os.path.join(self.run_dir, "baseline.json"), json.dumps(baseline, indent=2))
                if self.dense_classes is not None:
                    write_atomically(path, lambda p: _save_classes(p, *self.dense_classes))
        elif os.path.exists(path):
            with np.load(path) as saved:
                self.dense_classes = saved["predicted"], saved["labels"]

    def _check_finite(self, where, losses):
        """Raises `NonFiniteError` if a weight or one of ``losses`` is NaN or infinite."""
        bad = [f"weight {name}" for name in self.non_finite_weights()]
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

    # ------------------------------------------------------------------ records

    def _validation_classes(self):
        if self.validation_data is None:
            return None
        return predicted_classes(self.model, self.validation_data)

    def _change_vs_dense(self):
        """`accuracy_change` of the validation top-1 against the dense baseline's, as a
        dict, or None (no validation data, or labels that are not classes)."""
        now = self._validation_classes() if self.dense_classes is not None else None
        if now is None or not np.array_equal(now[1], self.dense_classes[1]):
            return None
        return accuracy_change(self.dense_classes[0], now[0], now[1]).to_dict()

    def _record(self, iteration, after, logs):
        """The iteration's line of ``history.jsonl``."""
        report = sparsity_report(self.model)
        return {
            "val_top1_change": self._change_vs_dense(),
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

    def _recalibrate_and_evaluate(self):
        if self.recalibration_data is not None and self.recalibration_batches:
            self.recalibrate()
        return self._evaluate()

    def _evaluate(self):
        results = {}
        for split, data in (("train", self.train_eval_data), ("val", self.validation_data)):
            if data is not None:
                for name, value in self.evaluate_data(data).items():
                    name = "top1" if name in TOP1_NAMES else name
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
        change = record.get("val_top1_change")
        if change:
            accuracy += (f" ({change['change']:+.2f} points vs dense, 95 % "
                         f"[{change['low']:+.2f}, {change['high']:+.2f}])")
        quality = f"{record['q']:.3g}" if record["q"] is not None else "-"
        rate = record["compression_rate"]
        logging.info("iteration %d/%d  q=%s  zeros %.1f %%  %s%s", record["iteration"],
                     self.iterations, quality, record["zero_parameters_rate"],
                     "all weights pruned" if rate is None else f"x{rate:.2f}", accuracy)
        if not self.chief:
            return
        scalars = {"q": record["q"], "zero_weights_rate": record["zero_weights_rate"],
                   "zero_parameters_rate": record["zero_parameters_rate"],
                   "compression_rate": record["compression_rate"]}
        scalars.update({f"before/{k}": v for k, v in record["before"].items()})
        scalars.update({f"after/{k}": v for k, v in record["after"].items()})
        self.write_scalars({k: v for k, v in scalars.items() if v is not None},
                           record["iteration"])

    # ------------------------------------------------------------------ optional hooks

    def convert_data(self, data, batch_size):
        """``data`` in the form ``evaluate_data`` and ``recalibrate`` take (as given by
        default)."""
        return data

    def open_writer(self):
        """Opens the TensorBoard writer, if the world writes one (nothing by default)."""

    def write_scalars(self, scalars, iteration):
        """Writes ``{name: value}`` for ``iteration`` to TensorBoard (nothing by default)."""

    def close_writer(self):
        """Closes the TensorBoard writer (nothing by default)."""


def _as_list(value, where, what, empty_ok=False):
    """``value`` as a list (a single number becomes ``[value]``); raises unless it is a
    sequence of numbers (non-empty unless ``empty_ok``)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [value]
    try:
        items = None if isinstance(value, (str, bytes, dict)) else list(value)
    except TypeError:
        items = None
    if items is None or not (items or empty_ok):
        raise ValueError(f"{where} must be a non-empty list of {what}, got {value!r}.")
    return items


class IterationLearningRateLogic:
    """The reference experiment's learning rate: a per-iteration initial rate, dropped inside each iteration.

    For epoch ``e`` (0-based) with ``E`` epochs per iteration, ``i = e // E``, ``j = e % E``::

        lr(e) = initial_lrs[min(i, len(initial_lrs) - 1)] * factor ** #{d in drops : d <= j}

    so with drops ``(3, 10, 16)`` the rate falls 10x at the 4th, 11th and 17th epoch of
    every iteration (epochs counted from 0). Set on the optimizer at each epoch's start
    (by the world's ``set_learning_rate(value)``).
    """

    def __init__(self, initial_lrs, epochs_per_iteration, drops=(3, 10, 16), factor=0.1):
        super().__init__()
        initial_lrs = _as_list(initial_lrs, "initial_lrs", "rates > 0, e.g. [0.01, 0.001]")
        initial_lrs = [check_positive(lr, f"initial_lrs[{i}]", "a learning rate")
                       for i, lr in enumerate(initial_lrs)]
        epochs_per_iteration = check_int(epochs_per_iteration, "epochs_per_iteration", 1)
        drops = [check_int(d, f"drops[{i}]", 0, "an epoch inside an iteration")
                 for i, d in enumerate(_as_list(drops, "drops", "epochs, e.g. (3, 10, 16)", True))]
        factor = check_positive(factor, "factor", "0.1: a 10x drop")
        self.initial_lrs, self.drops, self.factor = initial_lrs, sorted(drops), factor
        self.epochs_per_iteration = epochs_per_iteration

    def on_train_begin(self, logs=None):
        if isinstance(self.model.optimizer.get_config().get("learning_rate"), dict):  # a schedule
            raise TypeError(
                "IterationLearningRate sets the learning rate at every epoch, but the optimizer "
                "has a LearningRateSchedule: compile with a float learning rate instead."
            )

    def rate(self, epoch):
        iteration, epoch_in_iteration = divmod(epoch, self.epochs_per_iteration)
        initial = self.initial_lrs[min(iteration, len(self.initial_lrs) - 1)]
        return initial * self.factor ** sum(d <= epoch_in_iteration for d in self.drops)

    def on_epoch_begin(self, epoch, logs=None):
        self.set_learning_rate(self.rate(epoch))


class DropoutRescalingLogic:
    """Rescales the Dropout rates to the surviving connections at each epoch's start.

    Placed after the callback that prunes (`IterativePruning` prunes at an iteration's
    first epoch start), it sees each pruning before the retraining that follows it: each
    rate becomes ``D_o * sqrt(C_ir / C_io)`` (Han et al. 2015, `dropout`). When a rate
    changes, the training function is re-traced so that the new rate is used. At the end
    of training the original rates are restored (`dropout.restore_dropout`).
    """

    def on_train_begin(self, logs=None):
        self.sources = dropout_sources(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        if rescale_dropout(self.model, self.sources):
            self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        if restore_dropout(self.model):
            self.model.make_train_function(force=True)  # a later fit traces D_o again


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


def check_target_arguments(target_accuracy_drop, q_step):
    """``(target_accuracy_drop, q_step)`` as floats; raises unless the budget is a finite
    number >= 0 (points of top-1) and the step a finite number > 0."""
    return (check_nonnegative(target_accuracy_drop, "target_accuracy_drop",
                              "points of top-1, e.g. 0.5"),
            check_positive(q_step, "q_step", "the increase of q per iteration, e.g. 0.1"))


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, lr_drops=(3, 10, 16),
                        lr_drop_factor=0.1, rescale_dropout=True, target_accuracy_drop=None,
                        q_step=0.1, classes=None, **kwargs):
    """The callbacks of the reference experiment's procedure, in the order they must run.

    `UpdatePruningStep`, `IterationLearningRate(initial_lrs, E, lr_drops, lr_drop_factor)`
    and `IterativePruning(run_dir, E, **kwargs)`; then, unless ``rescale_dropout`` is
    false, `DropoutRescaling` (Han et al. 2015's ``D_r = D_o sqrt(C_ir / C_io)`` after
    each pruning). With ``target_accuracy_drop`` (points of validation top-1) the run is
    in target mode (`target.TargetAccuracyLogic`): q rises by ``q_step`` per
    iteration until an iteration drops more than that below dense; that iteration is
    rejected, the last accepted state restored, and training stops. Drops that can never
    fire (at or beyond ``E``) are named in a warning (`warn_unreachable_drops`).

    ``classes`` is the module (or any object) whose attributes ``UpdatePruningStep``,
    ``IterationLearningRate``, ``IterativePruning``, ``DropoutRescaling`` and
    ``TargetAccuracy`` are the callbacks to build: one Keras's, or by default
    `dispatch.procedure_callbacks`, which become the right Keras's when ``fit`` hands
    them the model.
    """
    classes = dispatch.procedure_callbacks if classes is None else classes
    if isinstance(epochs_per_iteration, numbers.Integral):
        warn_unreachable_drops(lr_drops, epochs_per_iteration)
    callbacks = [
        classes.UpdatePruningStep(),
        classes.IterationLearningRate(initial_lrs, epochs_per_iteration, lr_drops, lr_drop_factor),
    ]
    if target_accuracy_drop is not None:
        if kwargs.get("validation_data") is None:
            raise ValueError("target_accuracy_drop compares validation top-1 with the dense "
                             "model: pass validation_data=(x, y) or a dataset.")
        target = classes.TargetAccuracy(run_dir, *check_target_arguments(target_accuracy_drop,
                                                                         q_step))
        kwargs["acceptance"] = target
    callbacks.append(classes.IterativePruning(run_dir, epochs_per_iteration, **kwargs))
    if target_accuracy_drop is not None:
        # After IterativePruning: run.json records the schedule as given, which a resumed
        # run is built with again; the raised q list is derived from it at every start.
        callbacks.append(target)
    if rescale_dropout:
        callbacks.append(classes.DropoutRescaling())
    return callbacks

"""The seed's iterative procedure as callbacks for ONE ``model.fit`` call.

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
training it writes ``report.json`` and the figures.
"""
import os
import time

from absl import logging
import tensorflow as tf

from tf_stdprune import plots
from tf_stdprune._keras import keras
from tf_stdprune.callbacks import IterationLearningRate, UpdatePruningStep
from tf_stdprune.prune import all_layers
from tf_stdprune.recalibration import recalibrate_batchnorm
from tf_stdprune.report import sparsity_report
from tf_stdprune.run_state import atomic_write, check_writable, read_history, save_iteration
from tf_stdprune.wrapper import PruneLowStd


class IterativePruning(keras.callbacks.Callback):
    """Prune, recalibrate, evaluate, retrain, log and checkpoint, iteration by iteration.

    Args:
      run_dir: directory of history, checkpoints, report and figures.
      epochs_per_iteration: ``E``; the wrappers' schedule must have
        ``steps_per_iteration = E * steps_per_epoch``.
      train_eval_data / validation_data: datasets evaluated before and after retraining
        (``model.evaluate``; the compiled metrics are logged, e.g. ``top1``/``top5``).
      recalibration_data: training batches for BN recalibration; ``None`` switches it off.
      recalibration_batches: ``K``, the number of batches it uses.
    """

    def __init__(self, run_dir, epochs_per_iteration, train_eval_data=None,
                 validation_data=None, recalibration_data=None, recalibration_batches=20,
                 figures=True):
        super().__init__()
        self.run_dir, self.epochs_per_iteration = run_dir, epochs_per_iteration
        self.train_eval_data, self.validation_data = train_eval_data, validation_data
        self.recalibration_data, self.recalibration_batches = recalibration_data, recalibration_batches
        self.figures = figures

    def on_train_begin(self, logs=None):
        check_writable(self.run_dir)
        self.wrappers = [l for l in all_layers(self.model) if isinstance(l, PruneLowStd)]
        if not self.wrappers:
            raise ValueError("IterativePruning needs a model returned by tf_stdprune.prune_low_std.")
        expected = self.epochs_per_iteration * self.params["steps"]
        for layer in self.wrappers:
            steps = getattr(layer.pruning_schedule, "steps_per_iteration", expected)
            if steps != expected:
                raise ValueError(
                    f"{layer.name}: the schedule's steps_per_iteration is {steps} but one "
                    f"iteration is epochs_per_iteration * steps_per_epoch = {expected} steps; "
                    "build StdPruningSchedule(qualities, steps_per_iteration=E * steps_per_epoch)."
                )
        self.history = read_history(self.run_dir)
        self.iterations = self.params["epochs"] // self.epochs_per_iteration
        self.writer = tf.summary.create_file_writer(os.path.join(self.run_dir, "tensorboard"))

    def on_epoch_begin(self, epoch, logs=None):
        if epoch % self.epochs_per_iteration:
            return
        self.started, self.learning_rates = time.time(), []
        step = int(self.wrappers[0].pruning_step.numpy())
        self.quality = None
        for layer in self.wrappers:
            should_prune, quality = layer.pruning_schedule(step)
            if bool(should_prune):
                layer.pruning_obj.update_masks(quality)
                layer.mask_optimizer_slots(self.model.optimizer)
                self.quality = float(quality)
        self.before = self._recalibrate_and_evaluate()

    def on_epoch_end(self, epoch, logs=None):
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
            "compression_rate": report.compression_rate,
            "total_parameters": report.total_parameters,
            "layer_zeros": {l.name: l.zeros for l in report.layers},
            "wall_time_s": time.time() - self.started,
        }
        self.history.append(record)
        save_iteration(self.model, self.run_dir, iteration, epoch + 1, self.history)
        self._log(record)

    def on_train_end(self, logs=None):
        report = sparsity_report(self.model)
        logging.info("\n%s\n%s", report, report.table())
        atomic_write(os.path.join(self.run_dir, "report.json"), report.to_json())
        if self.figures:
            plots.write_figures(self.run_dir)

    def _recalibrate_and_evaluate(self):
        if self.recalibration_data is not None:
            recalibrate_batchnorm(self.model, self.recalibration_data, self.recalibration_batches)
        results = {}
        for split, data in (("train", self.train_eval_data), ("val", self.validation_data)):
            if data is not None:
                for name, value in self.model.evaluate(data, verbose=0, return_dict=True).items():
                    results[f"{split}_{name}"] = float(value)
        self.model.reset_metrics()  # fit's epoch metrics must not include the evaluation
        return results

    def _log(self, record):
        before, after = record["before"].get("val_top1"), record["after"].get("val_top1")
        accuracy = (f"  val {100 * before:.2f} % -> {100 * after:.2f} %"
                    if before is not None and after is not None else "")
        quality = f"{record['q']:.3g}" if record["q"] is not None else "-"
        logging.info("iteration %d/%d  q=%s  zeros %.1f %%  x%.2f%s", record["iteration"],
                     self.iterations, quality, record["zero_weights_rate"],
                     record["compression_rate"], accuracy)
        with self.writer.as_default():
            scalars = {"q": record["q"], "zero_weights_rate": record["zero_weights_rate"],
                       "compression_rate": record["compression_rate"]}
            scalars.update({f"before/{k}": v for k, v in record["before"].items()})
            scalars.update({f"after/{k}": v for k, v in record["after"].items()})
            for name, value in scalars.items():
                if value is not None:
                    tf.summary.scalar(name, value, step=record["iteration"])
        self.writer.flush()


def iterative_callbacks(run_dir, epochs_per_iteration, initial_lrs, lr_drops=(3, 10, 16),
                        lr_drop_factor=0.1, **kwargs):
    """The callbacks of the seed's procedure, in the order they must run.

    `UpdatePruningStep`, `IterationLearningRate(initial_lrs, E, lr_drops, lr_drop_factor)`
    and `IterativePruning(run_dir, E, **kwargs)`.
    """
    return [
        UpdatePruningStep(),
        IterationLearningRate(initial_lrs, epochs_per_iteration, lr_drops, lr_drop_factor),
        IterativePruning(run_dir, epochs_per_iteration, **kwargs),
    ]


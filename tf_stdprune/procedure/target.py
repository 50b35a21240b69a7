"""Target mode: prune as far as the accuracy allows.

With a budget ``delta`` (points of validation top-1) and a step ``q_step``, iteration
``i = 1, 2, ...`` prunes with::

    q_i = q_1 + (i - 1) * q_step

(``q_1`` is the schedule's first quality) and retrains as usual. After retraining the
iteration is judged against the dense baseline of the run::

    drop_i = 100 * (baseline_val_top1 - val_top1_i)      accepted while drop_i <= delta

The first iteration with ``drop_i > delta`` is rejected: the model (weights, masks,
sigmas, steps, BatchNormalization statistics) and the optimizer (slots, iteration count)
get back the exact values they had after the last accepted iteration (the dense model
if none was accepted), no checkpoint is written for it, ``history.jsonl`` keeps the
accepted records and the rejected one marked ``"rejected": true``, ``target.json``
reports the kept q, zeros and compression, and training stops.

The judge is used through ``iterative_callbacks(..., target_accuracy_drop=...,
q_step=...)``, which hooks it into `IterativePruning`. `TargetAccuracyLogic` is its
logic, for either Keras (this module imports no Keras); each world's callback
(`keras2.iterative.TargetAccuracy`, `tf_stdprune.keras3.iterative.TargetAccuracy`) adds how to find the
pruning wrappers and whether this process writes files.
"""
import json
import os

from absl import logging
from tf_stdprune.io import atomic_write, write_atomically
from tf_stdprune.procedure.iterative import check_target_arguments
from tf_stdprune.report import sparsity_report
from tf_stdprune.procedure.run_directory import HISTORY_FILE, read_history
from tf_stdprune.schedule import StdPruningSchedule

TARGET_FILE = "target.json"
TARGET_FIGURE = "target_accuracy_vs_zero_parameters.png"


def raised_qualities(start, q_step, iterations):
    """``[start + k * q_step for k in range(iterations)]``: target mode's list of q.

    Examples:
      >>> raised_qualities(0.5, 0.25, 3)
      [0.5, 0.75, 1.0]
    """
    return [float(start) + k * float(q_step) for k in range(iterations)]


def _optimizer_variables(optimizer):
    variables = optimizer.variables
    return list(variables() if callable(variables) else variables)


def _state_variables(model):
    optimizer = model.optimizer
    if hasattr(optimizer, "build") and not getattr(optimizer, "built", False):
        optimizer.build(model.trainable_variables)
    return list(model.variables) + _optimizer_variables(optimizer)


class TargetAccuracyLogic:
    """Raises q by ``q_step`` per iteration until the accuracy drop exceeds the budget.

    Args:
      run_dir: the run directory of `IterativePruning` (``baseline.json`` is read there,
        ``history.jsonl`` and ``target.json`` are written there).
      target_accuracy_drop: ``delta``, the largest accepted drop of validation top-1
        below the dense baseline, in points (0.5 = half a percentage point).
      q_step: the increase of q from one iteration to the next.

    At the start of training every `PruneLowStd` layer's schedule is replaced by one
    with the same steps and the qualities `raised_qualities(q_1, q_step, n)`, ``n``
    covering every iteration of the ``fit`` call. The exact state
    after the last accepted iteration is kept in memory (one copy of the model's and
    the optimizer's variables). `IterativePruning` calls `accept` with each finished
    iteration's record before it checkpoints it.

    A world's subclass supplies ``find_wrappers()`` (the pruning wrappers of the model)
    and ``is_chief()`` (whether this process writes files).
    """

    def __init__(self, run_dir, target_accuracy_drop, q_step):
        super().__init__()
        self.run_dir = run_dir
        self.target_accuracy_drop, self.q_step = check_target_arguments(
            target_accuracy_drop, q_step)
        self.rejected = None

    def on_train_begin(self, logs=None):
        total_steps = self.params["epochs"] * self.params["steps"]
        for layer in self.find_wrappers():
            self._raise_schedule(layer, total_steps)
        if self.model.train_function is not None:
            self.model.make_train_function(force=True)  # traced with the old schedule
        self.variables = _state_variables(self.model)
        self._snapshot()
        self.rejected = None
        path = os.path.join(self.run_dir, TARGET_FILE)
        if os.path.exists(path):
            with open(path) as f:
                rejected = json.load(f).get("rejected_iteration")
            if rejected is not None:
                logging.warning("%s holds a finished target run (iteration %d was rejected): "
                                "going on repeats that iteration.", self.run_dir, rejected)

    def _raise_schedule(self, layer, total_steps):
        """Replaces the layer's schedule by one with the same steps and the raised q list
        (one q per iteration that fit can reach), which serializes like any list."""
        schedule = layer.pruning_schedule
        if not isinstance(schedule, StdPruningSchedule):
            raise TypeError(f"{layer.name}: target mode needs a StdPruningSchedule, got "
                            f"{type(schedule).__name__}.")
        qualities = schedule.qualities
        start = float(qualities[0]) if isinstance(qualities, list) else float(schedule.quality(0))
        iterations = max(1, (total_steps + 1 - schedule.first_step) // schedule.steps_per_iteration + 1)
        layer.pruning_schedule = StdPruningSchedule(
            raised_qualities(start, self.q_step, iterations), schedule.steps_per_iteration,
            schedule.begin_step, schedule.end_step)

    def _snapshot(self):
        self.saved = [v.numpy().copy() for v in self.variables]

    def _restore(self):
        for variable, value in zip(self.variables, self.saved):
            variable.assign(value)

    def _baseline_top1(self):
        path = os.path.join(self.run_dir, "baseline.json")
        if not os.path.exists(path):
            raise ValueError(f"Target mode needs the dense baseline {path}: start the run at "
                             "epoch 0 with validation_data.")
        with open(path) as f:
            baseline = json.load(f).get("val_top1")
        if baseline is None:
            raise ValueError("Target mode compares validation top-1 with the dense baseline: "
                             "pass validation_data and compile with metrics=['accuracy'].")
        return baseline

    def accept(self, pruning, record):
        """True (and a new kept state) if ``record`` stays within the budget; otherwise
        restores the kept state, records the rejection, stops training, returns False."""
        top1 = record["after"].get("val_top1")
        if top1 is None:
            raise ValueError("Target mode needs val_top1 after retraining: pass "
                             "validation_data and compile with metrics=['accuracy'].")
        record["accuracy_drop"] = 100.0 * (self._baseline_top1() - top1)
        if record["accuracy_drop"] <= self.target_accuracy_drop:
            self._snapshot()
            return True
        record["rejected"] = True
        self._restore()
        self.model.stop_training = True
        self.rejected = record
        if pruning.chief:
            atomic_write(os.path.join(self.run_dir, HISTORY_FILE),
                         "".join(json.dumps(r) + "\n" for r in pruning.history + [record]))
        return False

    def summary(self):
        """The run's outcome (``target.json``): budget, kept iteration and its q, top-1,
        zeros and compression of the model as it is now, the rejected iteration if any."""
        accepted = [r for r in read_history(self.run_dir) if not r.get("rejected")]
        report = sparsity_report(self.model)
        rejected = self.rejected or {}
        return {
            "target_accuracy_drop": self.target_accuracy_drop,
            "q_step": self.q_step,
            "baseline_val_top1": self._baseline_top1(),
            "kept_iteration": accepted[-1]["iteration"] if accepted else 0,
            "kept_q": accepted[-1]["q"] if accepted else None,
            "kept_val_top1": accepted[-1]["after"]["val_top1"] if accepted else None,
            "rejected_iteration": rejected.get("iteration"),
            "rejected_q": rejected.get("q"),
            "rejected_accuracy_drop": rejected.get("accuracy_drop"),
            "zero_weights_rate": report.zero_weights_rate,
            "zero_parameters_rate": report.zero_parameters_rate,
            "compression_rate": report.compression_rate,
        }

    def on_train_end(self, logs=None):
        if not self.is_chief() or not os.path.exists(os.path.join(self.run_dir, "baseline.json")):
            return
        summary = self.summary()
        atomic_write(os.path.join(self.run_dir, TARGET_FILE), json.dumps(summary, indent=2))
        if self.rejected is None:
            logging.info("Target mode: every iteration stayed within %.2f points of dense; "
                         "give more iterations to prune further.", self.target_accuracy_drop)
        else:
            logging.info("Target mode: iteration %d (q=%.3g) dropped %.2f points > %.2f.",
                         summary["rejected_iteration"], summary["rejected_q"],
                         summary["rejected_accuracy_drop"], self.target_accuracy_drop)
        logging.info("Target mode keeps iteration %d (q=%s): zeros %.1f %% of parameters, "
                     "x%.2f.", summary["kept_iteration"], summary["kept_q"],
                     summary["zero_parameters_rate"], summary["compression_rate"])
        write_target_figure(self.run_dir, self.target_accuracy_drop)


def draw_rejected(ax, history, x_key="zero_parameters_rate", stage="after", metric="val_top1"):
    """Draws the rejected records of ``history`` on ``ax`` as red crosses (x: ``x_key``,
    y: ``100 * record[stage][metric]``). Returns the number drawn."""
    points = [(r[x_key], 100 * r[stage][metric]) for r in history
              if r.get("rejected") and r[stage].get(metric) is not None]
    if points:
        xs, ys = zip(*points)
        ax.plot(xs, ys, "X", color="tab:red", markersize=10, linestyle="none",
                label="rejected (beyond the accuracy budget)")
    return len(points)


def write_target_figure(run_dir, target_accuracy_drop=None):
    """Validation top-1 vs zero parameters (%): accepted iterations as a line, rejected
    ones as red crosses, the dense baseline and the budget line. Writes
    ``run_dir/figures/TARGET_FIGURE`` atomically and returns its path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = read_history(run_dir)
    with open(os.path.join(run_dir, "baseline.json")) as f:
        baseline = 100 * json.load(f)["val_top1"]
    kept = [r for r in history if not r.get("rejected")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([0.0] + [r["zero_parameters_rate"] for r in kept],
            [baseline] + [100 * r["after"]["val_top1"] for r in kept], "o-", label="accepted")
    draw_rejected(ax, history)
    if target_accuracy_drop is not None:
        ax.axhline(baseline - target_accuracy_drop, linestyle="--", color="gray",
                   label=f"dense - {target_accuracy_drop:g} points")
    ax.set_xlabel("zero weights / all parameters (%)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.path.join(run_dir, "figures", TARGET_FIGURE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=120, format="png"))
    plt.close(fig)
    return path

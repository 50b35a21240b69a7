"""The reference experiment's figures, drawn from a run directory's ``history.jsonl`` and ``report.json``.

* Figure 1: validation top-1 vs ``zero_weights / all_parameters`` (%).
* Figure 2: the same with train and validation curves, before and after retraining.
* Figure 3: top-1 vs compression rate ``all_parameters / nonzero_weights`` (log x).
* Figure 4: per-layer zero weights (%) and weight counts (all, nonzero; log) of the final
  model in layer order, conv / bn / dense coloured.
* Figure 5: the quality parameter q and the zero-weights rate per iteration.

A compression rate recorded as ``null`` (every parameter pruned: unbounded) is left out
of Figure 3. Every PNG is written atomically (`tf_stdprune.io`). Only matplotlib (Agg),
json and numpy: it runs without TensorFlow.
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
from matplotlib.patches import Patch  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from tf_stdprune.io import write_atomically  # noqa: E402

KIND_COLOURS = {"conv": "tab:blue", "bn": "tab:orange", "dense": "tab:green",
                "embedding": "tab:purple", "rnn": "tab:brown", "attention": "tab:pink",
                "other": "tab:gray"}
# Legend names of the report's kinds ("dense" alone reads as "the dense model").
KIND_LABELS = {"conv": "Convolution layers", "bn": "BatchNorm gammas", "dense": "Dense layers",
               "embedding": "Embeddings", "rnn": "Recurrent layers",
               "attention": "Attention projections", "other": "Other layers"}
FIGURES = ("fig1_accuracy_vs_zero_parameters.png", "fig2_train_val_before_after.png",
           "fig3_accuracy_vs_compression_rate.png", "fig4_layer_compression.png",
           "fig5_quality_and_sparsity.png")


def _read_json_lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _optional_json(path):
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _series(history, stage, key):
    return [100 * r[stage][key] if r[stage].get(key) is not None else None for r in history]


def new_figure(*args, **kwargs):
    """``(figure, axes)`` of ``matplotlib.pyplot.subplots(*args, **kwargs)`` (Agg)."""
    return plt.subplots(*args, **kwargs)


def save_figure(fig, path):
    """Writes ``fig`` as a PNG to ``path`` atomically (`tf_stdprune.io.write_atomically`)
    and closes it; returns the absolute path."""
    fig.tight_layout()
    try:
        return write_atomically(path, lambda temporary: fig.savefig(temporary, dpi=120,
                                                                   format="png"))
    finally:
        plt.close(fig)


def _accuracy_axes(title, xlabel):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    return fig, ax


def _with_dense(xs, ys, baseline, key, dense_x):
    """Prepends the dense baseline's point (0 % zeros, compression x1) when known."""
    if baseline and baseline.get(key) is not None:
        return [dense_x] + xs, [100 * baseline[key]] + ys
    return xs, ys


def _figure_1(history, baseline):
    zeros = [r["zero_parameters_rate"] for r in history]
    fig, ax = _accuracy_axes("Figure 1: compression vs accuracy",
                             "zero weights / all parameters (%)")
    ax.plot(*_with_dense(zeros, _series(history, "after", "val_top1"), baseline, "val_top1", 0.0),
            "o-", label="validation, after retraining")
    ax.legend()
    return fig


def _figure_2(history, baseline):
    zeros = [r["zero_parameters_rate"] for r in history]
    fig, ax = _accuracy_axes("Figure 2: train and validation, before and after retraining",
                             "zero weights / all parameters (%)")
    for split, colour in (("train", "tab:blue"), ("val", "tab:red")):
        key = f"{split}_top1"
        ax.plot(*_with_dense(zeros, _series(history, "after", key), baseline, key, 0.0),
                "o-", color=colour, label=f"{split}, after retraining")
        ax.plot(zeros, _series(history, "before", key), "x--", color=colour, alpha=0.6,
                label=f"{split}, right after pruning")
    ax.legend()
    return fig


def _figure_3(history, baseline):
    rates = [r["compression_rate"] for r in history]  # None: unbounded, left out of the plot
    fig, ax = _accuracy_axes("Figure 3: compression rate vs accuracy",
                             "compression rate: all parameters / nonzero weights (x)")
    ax.plot(*_with_dense(rates, _series(history, "after", "val_top1"), baseline, "val_top1", 1.0),
            "o-", label="validation, after retraining")  # matplotlib skips None points
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"x{value:g}"))
    ax.legend()
    return fig


def _figure_4(report):
    layers = (report or {}).get("layers", [])
    colours = [KIND_COLOURS.get(l["kind"], "tab:gray") for l in layers]
    positions = range(len(layers))
    fig, (ax, counts) = plt.subplots(2, 1, sharex=True,
                                     figsize=(max(7, 0.3 * len(layers) + 2.5), 7))
    ax.bar(positions, [l["rate"] for l in layers], color=colours)
    ax.set_ylabel("zero weights (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Figure 4: compression in each layer")
    ax.legend(handles=[Patch(color=colour, label=KIND_LABELS[kind])
                       for kind, colour in KIND_COLOURS.items()
                       if any(l["kind"] == kind for l in layers)],
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    counts.bar(positions, [l["total"] for l in layers], color=colours, alpha=0.25)
    counts.bar(positions, [l["total"] - l["zeros"] for l in layers], color=colours)
    counts.set_yscale("log")
    counts.set_ylabel("weights: all (light), nonzero (dark)")
    counts.set_xticks(positions)
    counts.set_xticklabels([l["name"] for l in layers], rotation=90, fontsize=7)
    return fig


def _figure_q(history):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    iterations = [r["iteration"] for r in history]
    ax.plot(iterations, [r["q"] for r in history], "o-", color="tab:purple")
    ax.set_xlabel("iteration")
    ax.set_ylabel("quality parameter q", color="tab:purple")
    other = ax.twinx()
    other.plot(iterations, [r["zero_weights_rate"] for r in history], "s-", color="tab:green")
    other.set_ylabel("zero weights (%)", color="tab:green")
    ax.set_title("q and sparsity per iteration")
    return fig


def write_figures(run_dir):
    """Writes the five PNGs into ``run_dir/figures`` and returns their paths.

    Iterations that target mode rejected (``"rejected": true``) are left out of the
    curves; target mode draws them in its own figure.
    """
    history = [r for r in _read_json_lines(os.path.join(run_dir, "history.jsonl"))
               if not r.get("rejected")]
    report = _optional_json(os.path.join(run_dir, "report.json"))
    baseline = _optional_json(os.path.join(run_dir, "baseline.json"))
    out = os.path.join(run_dir, "figures")
    os.makedirs(out, exist_ok=True)
    figures = [_figure_1(history, baseline), _figure_2(history, baseline),
               _figure_3(history, baseline), _figure_4(report), _figure_q(history)]
    paths = [os.path.join(out, name) for name in FIGURES]
    for fig, path in zip(figures, paths):
        save_figure(fig, path)
    return paths

"""A run directory written without training: history.jsonl, report.json, baseline.json.

The numbers are made up but self-consistent (rates from counts, as `SparsityReport`
computes them), so figures and the CLI can be tested in a second.
"""
import json
import os

from tf_stdprune.report import LayerSparsity, SparsityReport

# name, kind, prunable weights; parameters = weights + biases / BN beta and moving stats
LAYERS = [("conv2d", "conv", 432, 16), ("batch_normalization", "bn", 16, 48),
          ("conv2d_1", "conv", 4608, 32), ("batch_normalization_1", "bn", 32, 96),
          ("dense", "dense", 5120, 10)]


def sparsity(fraction):
    """The `SparsityReport` of the model with ``fraction`` of every layer's weights at 0."""
    layers = [LayerSparsity(name, kind, total, int(fraction * total) if kind != "bn" else 0)
              for name, kind, total, _ in LAYERS]
    parameters = sum(total + extra for _, _, total, extra in LAYERS)
    return SparsityReport(parameters, sum(l.total for l in layers),
                          sum(l.zeros for l in layers), layers)


def write(run_dir, qualities=(0.5, 1.0, 1.5, 0.0), fractions=(0.38, 0.68, 0.86, 0.86)):
    """Writes the files and returns ``(history, report)``."""
    os.makedirs(run_dir, exist_ok=True)
    history = []
    for i, (q, fraction) in enumerate(zip(qualities, fractions), start=1):
        report = sparsity(fraction)
        metrics = lambda acc: {"train_loss": 1 - acc, "train_top1": acc + 0.02,  # noqa: E731
                               "val_loss": 1.1 - acc, "val_top1": acc, "val_top5": 0.99}
        history.append({
            "iteration": i, "q": q, "learning_rates": [0.01, 0.001],
            "before": metrics(0.9 - 0.1 * fraction), "after": metrics(0.95 - 0.02 * fraction),
            "fit_logs": {"loss": 0.1}, "zero_weights": report.zero_weights,
            "zero_weights_rate": report.zero_weights_rate,
            "zero_parameters_rate": report.zero_parameters_rate,
            "compression_rate": report.compression_rate,
            "total_parameters": report.total_parameters,
            "layer_zeros": {l.name: l.zeros for l in report.layers}, "wall_time_s": 1.0,
        })
    with open(os.path.join(run_dir, "history.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in history)
    with open(os.path.join(run_dir, "report.json"), "w") as f:
        f.write(report.to_json())
    with open(os.path.join(run_dir, "baseline.json"), "w") as f:
        json.dump({"val_top1": 0.96, "train_top1": 0.99, "val_loss": 0.2}, f)
    return history, report

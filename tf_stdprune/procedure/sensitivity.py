"""Sensitivity analysis: prune one layer at a time and measure the accuracy (Han et al.
2015, Figure 5).

For every analysed layer ``l`` and quality ``q``, with every other layer untouched and no
retraining::

    w_l  <-  w_l * [|w_l| >= q * sigma_l]        (the rule of `mask_rule`, ``std_mode``)
    accuracy(l, q) = the compiled accuracy metric of model.evaluate(data)

after which ``w_l`` gets back its exact previous value (also when evaluation fails).
On a model returned by `prune_low_std`, the rule starts from the layer's current mask
and stored sigma, and its ``q`` is the layer's whole q (its ``layer_quality`` factor is
not applied). The result is a `SensitivityTable`; `suggest_layer_quality` turns it into
the ``layer_quality`` dict that `prune_low_std` takes.
"""
import dataclasses
import math
import numbers

import numpy as np
import tensorflow as tf

from tf_stdprune.io import write_atomically
from tf_stdprune.mask_rule import STD_MODES, UNSET_SIGMA, std_prune
from tf_stdprune.registry import get_tensor, layer_kind, prunable_attributes

ROUNDING = 1e-9  # points: float error of 100 * (baseline - accuracy) is not a drop
DEFAULT_QUALITIES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
ACCURACY_NAMES = ("accuracy", "acc", "sparse_categorical_accuracy", "categorical_accuracy",
                  "top1", "binary_accuracy")


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
    layer: str
    kind: str
    q: float
    zero_fraction: float  # zeros / entries of the layer's pruned tensors
    accuracy: float       # the metric, as Keras reports it (a fraction for accuracies)


@dataclasses.dataclass
class SensitivityTable:
    """Accuracy of the model with one layer pruned at a time, per layer and q.

    ``baseline`` is the accuracy of the model as given; ``metric`` the metric's name.
    """
    rows: list
    baseline: float
    metric: str

    def layers(self):
        """Layer names, in the order they were analysed."""
        return list(dict.fromkeys(row.layer for row in self.rows))

    def drop(self, row):
        """``100 * (baseline - accuracy)``: the drop in points."""
        return 100.0 * (self.baseline - row.accuracy)

    def to_dict(self):
        return {"metric": self.metric, "baseline": self.baseline,
                "rows": [dataclasses.asdict(row) for row in self.rows]}

    def __str__(self):
        lines = [f"Sensitivity ({self.metric}, dense {100 * self.baseline:.2f} %)",
                 f"{'layer':<24} {'kind':<10} {'q':>6} {'zeros %':>8} {self.metric[:10]:>10} "
                 f"{'drop':>7}"]
        lines += [f"{r.layer:<24} {r.kind:<10} {r.q:>6.3g} {100 * r.zero_fraction:>8.2f} "
                  f"{100 * r.accuracy:>10.2f} {self.drop(r):>7.2f}" for r in self.rows]
        return "\n".join(lines)

    def plot(self, path):
        """Accuracy (%) vs q, one line per layer; conv layers and the others (dense, ...)
        in separate panels. Writes the PNG at ``path`` atomically; returns its path."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        groups = {}
        for name in self.layers():
            kind = next(r.kind for r in self.rows if r.layer == name)
            groups.setdefault("conv" if kind == "conv" else "fully connected", []).append(name)
        fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
        for ax, (title, names) in zip(axes[0], sorted(groups.items())):
            for name in names:
                rows = [r for r in self.rows if r.layer == name]
                ax.plot([r.q for r in rows], [100 * r.accuracy for r in rows], "o-", label=name)
            ax.axhline(100 * self.baseline, color="gray", linestyle="--", linewidth=1)
            ax.set_title(f"{title} layers pruned one at a time")
            ax.set_xlabel("quality parameter q (threshold = q * std)")
            ax.set_ylabel(f"{self.metric} (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.tight_layout()
        try:
            return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
        finally:
            plt.close(fig)


def _all_layers(model):
    """Every layer of ``model``, nested models' layers included (either Keras)."""
    for layer in model.layers:
        yield layer
        if isinstance(getattr(layer, "layers", None), list):
            yield from _all_layers(layer)


def pruning_state(layer):
    """``{id(variable): (mask, stored sigma)}`` of a pruning wrapper's pruned tensors
    (either Keras's `PruneLowStd`); empty for a layer that is not one."""
    if hasattr(layer, "pruning_vars"):  # tf_keras: (weight, mask, threshold) triples
        return {id(w): (m, s) for (w, m, _), s in zip(layer.pruning_vars,
                                                       getattr(layer, "sigmas", []))}
    if hasattr(layer, "masks") and hasattr(layer, "pruned_weights"):  # Keras 3
        return {id(w): (m, s) for w, m, s in zip(layer.pruned_weights, layer.masks, layer.sigmas)}
    return {}


def _accuracy(model, data, batch_size):
    if isinstance(data, tuple):
        x, y, *weights = data
        results = model.evaluate(x, y, batch_size=batch_size, sample_weight=weights[0] if weights
                                 else None, verbose=0, return_dict=True)
    else:
        results = model.evaluate(data, verbose=0, return_dict=True)
    model.reset_metrics()
    for name in ACCURACY_NAMES:
        if name in results:
            return name, float(results[name])
    raise ValueError(f"sensitivity_analysis needs an accuracy among the compiled metrics, got "
                     f"{sorted(results)}: compile with metrics=['accuracy'].")


def _targets(model, layers):
    """``[(name, layer, [(variable, mask or None, stored sigma or None)])]`` to analyse,
    named as in the model before `prune_low_std` (the names ``layer_quality`` takes)."""
    found = {}
    for layer in _all_layers(model):
        inner = getattr(layer, "layer", layer)
        paths = prunable_attributes(inner, prune_batchnorm=layers is not None)
        if not paths or isinstance(getattr(layer, "layers", None), list):
            continue
        state = pruning_state(layer)
        variables = [get_tensor(inner, path) for path in paths]
        tensors = [(v, *state.get(id(v), (None, None))) for v in variables]
        found[inner.name] = (layer, tensors)
    if layers is None:
        names = [name for name, (layer, _) in found.items()
                 if layer_kind(getattr(layer, "layer", layer)) != "bn"]
    else:
        names = list(layers)
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"layers names {unknown}, which are not prunable layers of the "
                             f"model; choose among {sorted(found)}.")
    return [(name, *found[name]) for name in names]


def _check_qualities(qualities):
    qualities = [qualities] if isinstance(qualities, numbers.Real) else list(qualities)
    if not qualities or any(not isinstance(q, numbers.Real) or isinstance(q, bool)
                            or not math.isfinite(q) or q < 0 for q in qualities):
        raise ValueError(f"qualities must be a non-empty list of finite numbers >= 0, e.g. "
                         f"(0, 0.5, 1.0), got {qualities!r}.")
    return sorted(float(q) for q in qualities)


def _pruned_values(tensors, quality, std_mode):
    values, zeros, total = [], 0, 0
    for variable, mask, sigma in tensors:
        weights = tf.convert_to_tensor(variable)
        mask = tf.ones_like(weights, tf.float32) if mask is None else tf.convert_to_tensor(mask)
        stored = tf.constant(UNSET_SIGMA) if sigma is None else tf.convert_to_tensor(sigma)
        *_, pruned = std_prune(weights, mask, tf.constant(quality, tf.float32), std_mode, stored)
        pruned = tf.cast(pruned, variable.dtype)
        values.append(pruned)
        zeros += int(np.sum(pruned.numpy() == 0))
        total += int(np.prod(pruned.shape))
    return values, zeros / max(total, 1)


def sensitivity_analysis(model, data, qualities=DEFAULT_QUALITIES, layers=None,
                         std_mode="initial", batch_size=None):
    """Prunes each layer alone at each q, evaluates, and restores it (module docstring).

    Args:
      model: a compiled tf_keras model, dense or returned by `prune_low_std`, with an
        accuracy among its metrics.
      data: evaluation data: a dataset of batches or a tuple ``(x, y[, sample_weight])``.
      qualities: the q values tried for every layer.
      layers: names of the layers to analyse; default every layer with connections
        (conv, dense, embedding, recurrent, attention; BatchNormalization only by name).
      std_mode: the ``sigma`` of the rule, one of `mask_rule.STD_MODES`.
      batch_size: evaluation batch size when ``data`` is a tuple of arrays.

    Returns:
      a `SensitivityTable`. The model's weights are bit-identical afterwards.

    Examples:
      >>> table = sensitivity_analysis(model, (x_val, y_val), qualities=(0, 0.5, 1, 1.5))
      >>> print(table); table.plot("sensitivity.png")
      >>> layer_quality = suggest_layer_quality(table, max_drop=0.5)
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}.")
    qualities = _check_qualities(qualities)
    metric, baseline = _accuracy(model, data, batch_size)
    rows = []
    for name, layer, tensors in _targets(model, layers):
        kind = layer_kind(getattr(layer, "layer", layer))
        originals = [variable.numpy().copy() for variable, _, _ in tensors]
        try:
            for quality in qualities:
                values, zero_fraction = _pruned_values(tensors, quality, std_mode)
                for (variable, _, _), value in zip(tensors, values):
                    variable.assign(value)
                rows.append(SensitivityRow(name, kind, quality, zero_fraction,
                                           _accuracy(model, data, batch_size)[1]))
                for (variable, _, _), original in zip(tensors, originals):
                    variable.assign(original)
        finally:
            for (variable, _, _), original in zip(tensors, originals):
                variable.assign(original)
    return SensitivityTable(rows, baseline, metric)


def suggest_layer_quality(table, max_drop, base_quality=1.0):
    """``{layer: factor}`` for ``prune_low_std(layer_quality=...)`` from a sensitivity table.

    For each layer, ``q_l`` is the largest tested q such that it and every smaller
    tested q drop at most ``max_drop`` points (plus ``ROUNDING``) below the table's
    baseline (0 if even the smallest does not); ``factor = q_l / base_quality``, so that
    pruning with quality ``base_quality`` prunes each layer at its ``q_l``.

    Examples:
      >>> suggest_layer_quality(table, max_drop=0.5, base_quality=1.0)
      {'conv1': 0.75, 'fc1': 1.5}
    """
    if not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop) or max_drop < 0:
        raise ValueError(f"max_drop must be a number of points >= 0, e.g. 0.5, got {max_drop!r}.")
    if not isinstance(base_quality, numbers.Real) or not math.isfinite(base_quality) \
            or base_quality <= 0:
        raise ValueError(f"base_quality must be a number > 0 (the q the factors multiply), "
                         f"got {base_quality!r}.")
    suggestion = {}
    for name in table.layers():
        kept = 0.0
        for row in sorted((r for r in table.rows if r.layer == name), key=lambda r: r.q):
            if table.drop(row) > max_drop + ROUNDING:
                break
            kept = row.q
        suggestion[name] = kept / base_quality
    return suggestion

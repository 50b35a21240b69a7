"""`sparsity_report`: the reference experiment's "Final Parameters" block, with exact integers.

Counts, over the model's own tensors (pruning masks and counters excluded)::

    total_parameters     = sum of the sizes of all weights (BN moving statistics included)
    total_weights        = sum of the sizes of prunable tensors (kernels + BN gammas)
    zero_weights         = number of entries equal to 0.0 in those tensors
    zero_weights_rate    = 100 * zero_weights / total_weights
    zero_parameters_rate = 100 * zero_weights / total_parameters
    compression_rate     = total_parameters / (total_parameters - zero_weights)

Every form of a model gives the same counts: wrapped by `prune_low_std` or
`prune_low_magnitude` (masks and step counters are not parameters), stripped, quantized by
`quantize_weights` (a wrapper with an ``effective_tensors()`` method counts as the layer it
wraps, with the shared values it computes with; centroids and cluster indices are not
parameters) and decompressed.

A model with NaN or infinite parameters (a diverged run) is not a compressed model:
``non_finite_parameters`` counts them, ``compression_rate`` is NaN (``null`` in JSON) and
the text says "not finite" instead of a rate. A NaN weight is never counted as a zero.

When every parameter is a pruned zero the compression rate is unbounded: the property
is ``inf``, the JSON forms (`SparsityReport.to_dict`, ``report.json``) hold ``null``
(strict JSON has no infinity) and the text forms say "all weights pruned".
"""
import dataclasses
import json

import numpy as np

from tf_stdprune.registry import get_tensor, layer_kind, prunable_attributes

# Pruning wrappers whose inner layer the report counts in their place (either Keras);
# a quantization wrapper stays, and counts through its ``effective_tensors()``.
WRAPPERS = ("PruneLowStd", "PruneLowMagnitude")

@dataclasses.dataclass
class LayerSparsity:
    name: str
    kind: str
    total: int
    zeros: int

    @property
    def rate(self):
        """Zero weights of this layer, in %."""
        return 100.0 * self.zeros / self.total if self.total else 0.0


@dataclasses.dataclass
class SparsityReport:
    total_parameters: int
    total_weights: int
    zero_weights: int
    layers: list
    non_finite_parameters: int = 0

    @property
    def zero_weights_rate(self):
        return 100.0 * self.zero_weights / self.total_weights if self.total_weights else 0.0

    @property
    def zero_parameters_rate(self):
        return 100.0 * self.zero_weights / self.total_parameters if self.total_parameters else 0.0

    @property
    def finite(self):
        """False when a parameter is NaN or infinite: the model is not a compressed model."""
        return self.non_finite_parameters == 0

    @property
    def compression_rate(self):
        """``total_parameters / (total_parameters - zero_weights)``; 1 if there are no
        parameters, inf if every parameter is a pruned zero, NaN if a parameter is not
        finite."""
        if not self.finite:
            return float("nan")
        nonzero = self.total_parameters - self.zero_weights
        if nonzero == 0:
            return 1.0 if self.total_parameters == 0 else float("inf")
        return self.total_parameters / nonzero

    @property
    def all_pruned(self):
        """True when every parameter is a pruned zero (unbounded compression rate)."""
        return self.total_parameters > 0 and self.zero_weights == self.total_parameters

    def to_dict(self):
        """Strict-JSON dict: the reference experiment's fields and the per-layer list (with rates);
        ``compression_rate`` is None (``null``) when every parameter is pruned or one is
        not finite."""
        return {
            "total_parameters": self.total_parameters,
            "total_weights": self.total_weights,
            "zero_weights": self.zero_weights,
            "zero_weights_rate": self.zero_weights_rate,
            "zero_parameters_rate": self.zero_parameters_rate,
            "compression_rate": (None if self.all_pruned or not self.finite
                                 else self.compression_rate),
            "non_finite_parameters": self.non_finite_parameters,
            "layers": [dict(dataclasses.asdict(l), rate=l.rate) for l in self.layers],
        }

    @classmethod
    def from_dict(cls, data):
        layers = [LayerSparsity(l["name"], l["kind"], l["total"], l["zeros"])
                  for l in data["layers"]]
        return cls(data["total_parameters"], data["total_weights"], data["zero_weights"], layers,
                   data.get("non_finite_parameters", 0))

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def __str__(self):
        """`summary` then, after a blank line, the per-layer `table` (if there are layers)."""
        return self.summary() + (f"\n\n{self.table()}" if self.layers else "")

    def summary(self):
        """The model totals in the reference experiment's "Final Parameters" format."""
        if not self.finite:
            rate = (f"not finite: {self.non_finite_parameters} parameters are NaN or infinite "
                    "(training diverged), so the model is not compressed")
        elif self.all_pruned:
            rate = "all weights pruned"
        else:
            rate = f"x{self.compression_rate:.8f} times"
        return (
            "Final Parameters:\n"
            f"total parameters: {self.total_parameters},\n"
            f"Total weights: {self.total_weights},\n"
            f"Zero weights: {self.zero_weights},\n"
            f"Zero weights rate (%): {self.zero_weights_rate:.10f},\n"
            f"Zero parameters rate in model (%): {self.zero_parameters_rate:.10f}\n"
            f"Compression rate: {rate}"
        )

    def table(self):
        """The per-layer table as text (Figure 4 in numbers)."""
        rows = [f"{'layer':<32} {'kind':<6} {'weights':>11} {'zeros':>11} {'rate %':>7}"]
        rows += [f"{l.name:<32} {l.kind:<6} {l.total:>11} {l.zeros:>11} {l.rate:>7.2f}"
                 for l in self.layers]
        return "\n".join(rows)


def is_model(layer):
    """True for a (nested) Keras model of either Keras: it has layers and inputs."""
    return hasattr(layer, "layers") and hasattr(layer, "inputs")


def unwrapped(layer):
    """``layer`` with our and tfmot's wrappers (`WRAPPERS`) taken off."""
    while type(layer).__name__ in WRAPPERS and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def leaf_layers(model):
    """The layers of ``model`` with nested models flattened and pruning wrappers replaced
    by the layers they wrap."""
    for layer in model.layers:
        if is_model(layer):
            yield from leaf_layers(layer)
        else:
            yield unwrapped(layer)


def counted_tensors(layer):
    """``(layer holding the parameters, arrays of the prunable tensors)`` of a leaf layer:
    a wrapper with ``effective_tensors()`` counts as its inner layer with the tensors it
    computes with (see the module docstring)."""
    effective = getattr(layer, "effective_tensors", None)
    if hasattr(layer, "layer") and callable(effective):
        return layer.layer, list(effective().values())
    attributes = prunable_attributes(layer, prune_batchnorm=True) or []
    return layer, [np.asarray(get_tensor(layer, a)) for a in attributes]


def prunable_layers(model):
    """``(layer, attribute paths)`` of every distinct leaf layer with prunable tensors."""
    seen = set()
    for layer in leaf_layers(model):
        attributes = prunable_attributes(layer, prune_batchnorm=True)
        if attributes and id(layer) not in seen:
            seen.add(id(layer))
            yield layer, attributes


def sparsity_report(model):
    """The `SparsityReport` of a tf_keras or Keras 3 model (see the module docstring)."""
    total_parameters, non_finite, layers, seen = 0, 0, [], set()
    for leaf in leaf_layers(model):
        if id(leaf) in seen:  # a layer shared between branches counts once
            continue
        seen.add(id(leaf))
        layer, values = counted_tensors(leaf)
        total_parameters += sum(int(np.prod(w.shape)) for w in layer.weights)
        non_finite += sum(int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                          for a in (np.asarray(w, dtype=np.float64) for w in layer.weights))
        if values:
            layers.append(LayerSparsity(
                layer.name, layer_kind(layer),
                total=sum(v.size for v in values),
                zeros=sum(int(np.count_nonzero(v == 0)) for v in values),
            ))
    return SparsityReport(
        total_parameters=total_parameters,
        total_weights=sum(l.total for l in layers),
        zero_weights=sum(l.zeros for l in layers),
        layers=layers,
        non_finite_parameters=non_finite,
    )

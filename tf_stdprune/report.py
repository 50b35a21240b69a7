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

from tf_stdprune.mask_rule import check_m_by_n, m_by_n_groups
from tf_stdprune.registry import PRUNING_STATE, QUANTIZATION_STATE, get_tensor, layer_kind, \
    prunable_attributes

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


def sublayers(layer):
    """The layers ``layer`` tracks directly (either Keras's own layer tree)."""
    flatten = getattr(layer, "_flatten_layers", None)
    return list(flatten(include_self=False, recursive=False)) if flatten else []


def layer_paths(model):
    """``(path, layer)`` of every layer the report counts, pruning wrappers replaced by the
    layers they wrap. Nested models are flattened (their layers keep their own names);
    a layer that is neither a model nor prunable itself but holds sublayers (a KerasHub
    transformer block, a custom layer of Dense sublayers) comes first, then its sublayers
    under ``its/path/child``."""
    def walk(layers, prefix):
        for layer in layers:
            if is_model(layer):
                yield from walk(layer.layers, prefix)
                continue
            layer = unwrapped(layer)
            path = f"{prefix}/{layer.name}" if prefix else layer.name
            yield path, layer
            counts_itself = prunable_attributes(layer, prune_batchnorm=True) or callable(
                getattr(layer, "effective_tensors", None))  # a quantization wrapper
            if not counts_itself:
                yield from walk(sublayers(layer), path)

    yield from walk(model.layers, "")


def leaf_layers(model):
    """The layers of `layer_paths`, without their paths."""
    for _, layer in layer_paths(model):
        yield layer


def attached_state_variables(model):
    """Ids of the state attached in place to layers (`registry.PRUNING_STATE`: masks,
    thresholds, sigmas; `registry.QUANTIZATION_STATE`: centroids, indices)."""
    return {id(v) for layer in leaf_layers(model)
            for attribute in (PRUNING_STATE, QUANTIZATION_STATE)
            for v in getattr(getattr(layer, attribute, None), "state_variables", ())}


def counted_tensors(layer):
    """``(layer holding the parameters, arrays of the prunable tensors)`` of a leaf layer:
    a wrapper with ``effective_tensors()`` counts as its inner layer with the tensors it
    computes with, and so does a layer quantized in place (see the module docstring)."""
    effective = getattr(layer, "effective_tensors", None)
    if hasattr(layer, "layer") and callable(effective):
        return layer.layer, list(effective().values())
    shared = getattr(layer, QUANTIZATION_STATE, None)
    if shared is not None:
        return layer, list(shared.effective_tensors().values())
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
    """The `SparsityReport` of a tf_keras or Keras 3 model (see the module docstring);
    each layer's row is named by its path (`layer_paths`)."""
    counted = attached_state_variables(model)  # never parameters
    total_parameters, non_finite, layers, seen = 0, 0, [], set()
    for path, leaf in layer_paths(model):
        if id(leaf) in seen:  # a layer shared between branches counts once
            continue
        seen.add(id(leaf))
        layer, values = counted_tensors(leaf)
        for weight in layer.weights:
            if id(weight) not in counted:
                counted.add(id(weight))
                total_parameters += int(np.prod(weight.shape))
                value = np.asarray(weight, dtype=np.float64)
                non_finite += int(value.size - np.count_nonzero(np.isfinite(value)))
        if values:
            parent = path.rpartition("/")[0]  # named by the layer counted, not its wrapper
            layers.append(LayerSparsity(
                f"{parent}/{layer.name}" if parent else layer.name, layer_kind(layer),
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


def m_by_n_holds(values, m, n):
    """True iff every group of ``n`` consecutive entries of the rank-2 or rank-4 array
    ``values`` along its input dimension (grouping of `mask_rule.m_by_n_groups`) has at
    least ``m`` zeros; a partial last group of ``r`` entries may keep ``min(r, n - m)``."""
    values = np.asarray(values)
    perm, rows, inputs, pad = m_by_n_groups(values.shape, n)
    nonzero = np.transpose(values, perm).reshape(rows, inputs) != 0
    nonzero = np.pad(nonzero, [(0, 0), (0, pad)]).reshape(rows, -1, n)
    return bool((nonzero.sum(axis=-1) <= n - m).all())


def check_m_by_n_sparsity(tensor_or_model, m=2, n=4):
    """Whether a kernel, or every Dense and Conv2D kernel of a model, has N:M sparsity:
    at least ``m`` zeros in every ``n`` consecutive weights along the input dimension.

    ``tensor_or_model``: an array or tensor of rank 2 (``[in, out]``) or 4
    (``[h, w, in, out]``), or a model of either Keras, wrapped or stripped. For a model,
    every prunable tensor of rank 2 or 4 of its layers is checked (a wrapped layer's
    inner layer; layers kept dense count too, so ``skip``-ped layers give False).

    Raises:
      ValueError: a tensor of another rank, ``not 0 <= m < n``, or a model without such
        a tensor.

    Examples:
      >>> pruned = tf_stdprune.prune_low_std(model, sparsity_m_by_n=(2, 4),
      ...                                    prune_batchnorm=False)
      >>> pruned.fit(x, y, epochs=2, callbacks=[tf_stdprune.UpdatePruningStep()])
      >>> tf_stdprune.check_m_by_n_sparsity(tf_stdprune.strip_pruning(pruned), 2, 4)
      True
    """
    check_m_by_n((m, n), "(m, n)")
    if not is_model(tensor_or_model):
        return m_by_n_holds(tensor_or_model, m, n)
    tensors = [(layer.name, np.asarray(get_tensor(layer, path)))
               for layer, paths in prunable_layers(tensor_or_model) for path in paths]
    tensors = [(name, value) for name, value in tensors if value.ndim in (2, 4)]
    if not tensors:
        raise ValueError(f"Model {tensor_or_model.name!r} has no Dense or Conv2D kernel "
                         "(rank 2 or 4) to check for N:M sparsity.")
    return all(m_by_n_holds(value, m, n) for _, value in tensors)

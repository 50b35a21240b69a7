"""`export_sparse_saved_model`: a SavedModel that stores pruned tensors sparsely.

Every prunable tensor (kernels, BN gammas; see `wrapper.prunable_attributes`) of ``N``
entries with ``n`` nonzeros is stored as variables

    gaps:   uint8, the relative positions of the nonzeros (`coding.relative_gaps`, span
            256: one byte per nonzero plus one filler per 255 zeros in a row);
    values: float32 [n], or, when the tensor has at most 256 distinct nonzero values (a
            quantized model), ``codebook`` float32 [K] and ``indices`` uint8 [n].

The serving function rebuilds ``w = scatter(positions, values, [N])`` and calls the Keras
model with the rebuilt tensors substituted for its variables; the other variables
(biases, BN beta and moving statistics) are stored as they are. Storage per prunable
tensor: ``5 n`` bytes (``2 n + 4 K`` quantized) against ``4 N`` dense. The result needs
only TensorFlow: ``tf.saved_model.load(path).signatures["serving_default"]``.
"""
import contextlib
import io
import os
import shutil
import tarfile
import tempfile

import numpy as np
import tensorflow as tf

from tf_stdprune import coding
from tf_stdprune.registry import get_tensor
from tf_stdprune.quantize import plain_model, prunable_layers
from tf_stdprune.wrapper import substituted

GAP_SPAN = 256
MAX_CODEBOOK = 256


class SparseTensor(tf.Module):
    """The variables of one sparse tensor and its rebuild (module docstring)."""

    def __init__(self, array):
        super().__init__()
        flat = np.asarray(array, np.float32).ravel()
        self.shape = tuple(int(d) for d in array.shape)
        positions = np.flatnonzero(flat)
        self.gaps = tf.Variable(coding.relative_gaps(positions, GAP_SPAN), trainable=False)
        codebook, indices = np.unique(flat[positions], return_inverse=True)
        if len(codebook) <= MAX_CODEBOOK:
            self.codebook = tf.Variable(codebook, trainable=False)
            self.indices = tf.Variable(indices.ravel().astype(np.uint8), trainable=False)
        else:
            self.values = tf.Variable(flat[positions], trainable=False)

    def dense(self):
        """``w = reshape(scatter(positions, values, [N]), shape)``."""
        gaps = tf.cast(self.gaps, tf.int32)
        advance = tf.where(gaps == 0, GAP_SPAN - 1, gaps)
        positions = tf.boolean_mask(tf.cumsum(advance) - 1, gaps != 0)
        if hasattr(self, "codebook"):
            values = tf.gather(self.codebook, tf.cast(self.indices, tf.int32))
        else:
            values = tf.convert_to_tensor(self.values)
        flat = tf.scatter_nd(positions[:, None], values, [int(np.prod(self.shape))])
        return tf.reshape(flat, self.shape)


class _Serving(tf.Module):
    """Holds the variables to save; `serving_function` calls the Keras model, which is
    kept out of the tracked state so that only these variables are saved."""

    def __init__(self, model, sparse):
        super().__init__()
        replaced, self.sparse_tensors = set(), []
        substitutions = []  # (layer, attributes, [SparseTensor])
        for layer, attributes in prunable_layers(model) if sparse else []:
            tensors = [SparseTensor(np.asarray(get_tensor(layer, a))) for a in attributes]
            substitutions.append((layer, attributes, tensors))
            self.sparse_tensors += tensors
            replaced |= {get_tensor(layer, a).ref() for a in attributes}
        self.dense_variables = [v for v in model.weights if v.ref() not in replaced]
        names = model.output_names

        def serve(*inputs):
            with contextlib.ExitStack() as stack:
                for layer, attributes, tensors in substitutions:
                    dense = [t.dense() for t in tensors]
                    stack.enter_context(substituted(layer, attributes, dense))
                outputs = model(list(inputs) if len(inputs) > 1 else inputs[0], training=False)
            return dict(zip(names, tf.nest.flatten(outputs)))

        specs = [tf.TensorSpec(i.shape, i.dtype, name=f"input_{k}")
                 for k, i in enumerate(model.inputs)]
        # Left for tf.saved_model.save to trace: under a multi-worker strategy it then reads
        # each distributed variable's primary copy instead of tracing collectives.
        self.serving_function = tf.function(serve, input_signature=specs, autograph=False)


def _check_target(path, overwrite):
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
        raise FileExistsError(f"{path!r} exists and is not an empty directory; pass "
                              "overwrite=True to replace it.")


def _replace_directory(source, path):
    """Moves directory ``source`` to ``path`` (same filesystem), replacing what is there."""
    if not os.path.lexists(path):
        os.replace(source, path)
        return
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old.", dir=os.path.dirname(path))
    os.replace(path, os.path.join(trash, "old"))
    os.replace(source, path)
    shutil.rmtree(trash)


def _export(model, path, overwrite, sparse):
    path = os.path.abspath(os.fspath(path))
    _check_target(path, overwrite)
    model = plain_model(model)
    if not model.inputs:
        raise ValueError("The model has no defined inputs; build it with an input shape "
                         "(e.g. keras.Input) before exporting.")
    module = _Serving(model, sparse)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp.", dir=parent)
    os.chmod(temporary, 0o755)  # mkdtemp's 0o700 would survive the rename
    try:
        tf.saved_model.save(module, temporary,
                            signatures={"serving_default": module.serving_function})
        _replace_directory(temporary, path)
    finally:
        if os.path.exists(temporary):
            shutil.rmtree(temporary)
    return path


def export_sparse_saved_model(model, path, overwrite=False):
    """Writes ``model`` (stripped, or with pruning/quantization wrappers) as a SavedModel
    whose prunable tensors are sparse (module docstring); returns the absolute path.

    Written to a temporary directory next to ``path``, then renamed. Raises
    `FileExistsError` if ``path`` is a file or a non-empty directory, unless ``overwrite``.
    """
    return _export(model, path, overwrite, sparse=True)


def export_dense_saved_model(model, path, overwrite=False):
    """The baseline: the same serving function and signature with every tensor dense."""
    return _export(model, path, overwrite, sparse=False)


def disk_size(path):
    """``{"bytes": size of the file or sum over the directory's files, "gzip_bytes": size
    of it as a .tar.gz}`` (tfmot's guide compares gzip sizes)."""
    total = os.path.getsize(path) if os.path.isfile(path) else sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        archive.add(path, arcname=os.path.basename(path))
    return {"bytes": total, "gzip_bytes": buffer.tell()}

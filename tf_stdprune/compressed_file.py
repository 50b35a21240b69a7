"""`compress` / `decompress`: a pruned (and quantized) model in one Huffman-coded file.

Every prunable tensor (kernels, BN gammas) is stored sparsely: its gap symbols
(`coding.relative_gaps`, span ``2^k`` with ``k`` index bits: 8 for conv and BN, 5 for
dense, as Deep Compression) are Huffman coded; its nonzero values are either a float32
codebook of the ``K <= 2^12`` distinct nonzero values plus Huffman-coded indices into it
(a quantized model), or raw float32 values. All other tensors (biases, BN beta and moving
statistics) are raw bytes. Lossless: a zero is stored as +0.0 (so -0.0 reads back as +0.0),
every other float32 bit for bit.

File layout (version 1, little-endian)::

    0   8 bytes   magic  b"\\x89TFSPZ\\r\\n"
    8   uint16    format version
    10  uint16    reserved, 0
    12  uint64    payload length
    20  32 bytes  SHA-256 of the payload
    52  payload:  uint64 metadata length, metadata (zlib-compressed UTF-8 JSON: the Keras
                  model JSON and one entry per tensor in ``model.get_weights()`` order),
                  binary sections
                  (referenced from the metadata as ``[offset, length]``).
"""
import hashlib
import json
import os
import struct
import tempfile
import zlib

import numpy as np

from tf_stdprune import coding
from tf_stdprune._keras import keras
from tf_stdprune.quantize import plain_model, prunable_layers
from tf_stdprune.registry import get_tensor, layer_kind

MAGIC = b"\x89TFSPZ\r\n"
VERSION = 1
_HEADER = struct.Struct("<8sHHQ32s")
HEADER_BYTES = _HEADER.size
_LENGTH = struct.Struct("<Q")
MAX_CODEBOOK_BITS = 12
DEFAULT_INDEX_BITS = {"conv": 8, "dense": 5, "bn": 8}


class CompressedFileError(ValueError):
    """The file is not a valid compressed model: wrong magic or version, truncated,
    corrupted (checksum mismatch) or inconsistent."""


class _Sections:
    """Binary sections appended one after the other, referenced as ``[offset, length]``."""

    def __init__(self, blob=b""):
        self.parts, self.size, self.blob = [], 0, blob

    def add(self, data):
        data = bytes(data)
        self.parts.append(data)
        self.size += len(data)
        return [self.size - len(data), len(data)]

    def get(self, ref, dtype=np.uint8):
        offset, length = ref
        if offset < 0 or offset + length > len(self.blob):
            raise CompressedFileError("A section points outside the file.")
        return np.frombuffer(self.blob, dtype, length // np.dtype(dtype).itemsize, offset)


def _stream(symbols, alphabet, sections):
    """Huffman-codes ``symbols`` (in ``[0, alphabet)``) into sections; returns its entry."""
    lengths = coding.code_lengths(np.bincount(symbols, minlength=alphabet))
    data, bits, offsets = coding.huffman_encode(symbols, lengths)
    return {"count": len(symbols), "bits": int(bits),
            "lengths": sections.add(lengths.astype(np.uint8).tobytes()),
            "offsets": sections.add(offsets.astype("<i8").tobytes()),
            "data": sections.add(data)}


def _encode_sparse(array, index_bits, sections):
    """The entry of a prunable tensor (module docstring)."""
    flat = np.ascontiguousarray(array, np.float32).ravel()
    if not np.all(np.isfinite(flat)):
        raise ValueError("Cannot compress non-finite (NaN/inf) weights.")
    positions = np.flatnonzero(flat)
    gaps = coding.relative_gaps(positions, 2 ** index_bits)
    entry = {"encoding": "sparse", "size": flat.size, "nonzeros": len(positions),
             "index_bits": int(index_bits), "gaps": _stream(gaps, 2 ** index_bits, sections)}
    codebook, indices = np.unique(flat[positions], return_inverse=True)
    if len(codebook) <= 2 ** MAX_CODEBOOK_BITS:
        entry["codebook"] = sections.add(codebook.astype("<f4").tobytes())
        entry["indices"] = _stream(indices.ravel(), max(len(codebook), 1), sections)
    else:
        entry["values"] = sections.add(flat[positions].astype("<f4").tobytes())
    return entry


def _check_index_bits(index_bits):
    for kind, bits in index_bits.items():
        if not (isinstance(bits, (int, np.integer)) and 1 <= bits <= 16):
            raise ValueError(f"{kind}_index_bits must be an integer in [1, 16], got {bits!r}.")


def serialize(model, conv_index_bits=8, dense_index_bits=5, bn_index_bits=8):
    """``(metadata, payload bytes)`` of ``model`` (see `compress`)."""
    model = plain_model(model)
    index_bits = {"conv": conv_index_bits, "dense": dense_index_bits, "bn": bn_index_bits}
    _check_index_bits(index_bits)
    prunable = {}
    for layer, attributes in prunable_layers(model):
        for attribute in attributes:
            prunable[get_tensor(layer, attribute).ref()] = (layer.name, layer_kind(layer))
    sections, tensors = _Sections(), []
    for variable in model.weights:
        array = np.asarray(variable)
        entry = {"name": variable.name, "shape": list(array.shape), "dtype": array.dtype.str}
        if variable.ref() in prunable and array.dtype == np.float32:
            layer, kind = prunable[variable.ref()]
            entry.update(layer=layer, kind=kind, **_encode_sparse(
                array, index_bits.get(kind, conv_index_bits), sections))
        else:
            entry.update(encoding="raw", data=sections.add(np.ascontiguousarray(array).tobytes()))
        tensors.append(entry)
    metadata = {"model_config": model.to_json(), "tensors": tensors}
    text = zlib.compress(json.dumps(metadata).encode("utf-8"), 9)
    return metadata, _LENGTH.pack(len(text)) + text + b"".join(sections.parts)


def _write_atomically(path, write, overwrite=True):
    """Calls ``write(file object)`` on a temporary file next to ``path``, then renames it
    to ``path`` (`FileExistsError` if it exists and not ``overwrite``)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it.")
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                             suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(descriptor, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def compress(model, path, overwrite=False, conv_index_bits=8, dense_index_bits=5,
             bn_index_bits=8):
    """Writes ``model`` (stripped, or with pruning/quantization wrappers) to one file.

    ``*_index_bits`` = ``k``, the gap symbol width per layer kind (span ``2^k``). Written
    to a temporary file in the same directory, then renamed; an existing ``path`` raises
    `FileExistsError` unless ``overwrite``. Returns the absolute path.
    """
    _, payload = serialize(model, conv_index_bits, dense_index_bits, bn_index_bits)
    header = _HEADER.pack(MAGIC, VERSION, 0, len(payload), hashlib.sha256(payload).digest())
    return _write_atomically(path, lambda f: f.write(header + payload), overwrite)


def _read(path):
    """``(metadata, sections)`` of a verified file; `CompressedFileError` otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < _HEADER.size:
        raise CompressedFileError(f"{path}: truncated ({len(data)} bytes, shorter than the "
                                  f"{_HEADER.size}-byte header).")
    magic, version, _, length, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CompressedFileError(f"{path}: not a tf_stdprune compressed model (bad magic).")
    if version != VERSION:
        raise CompressedFileError(f"{path}: format version {version}; this tf_stdprune reads "
                                  f"version {VERSION} only.")
    payload = data[_HEADER.size:]
    if len(payload) != length:
        raise CompressedFileError(f"{path}: truncated or padded: the payload has "
                                  f"{len(payload)} bytes, the header says {length}.")
    if hashlib.sha256(payload).digest() != digest:
        raise CompressedFileError(f"{path}: corrupted: the SHA-256 checksum does not match.")
    (size,) = _LENGTH.unpack_from(payload)
    try:
        text = zlib.decompress(payload[_LENGTH.size:_LENGTH.size + size])
        metadata = json.loads(text.decode("utf-8"))
    except (ValueError, zlib.error) as error:
        raise CompressedFileError(f"{path}: unreadable metadata ({error}).") from None
    return metadata, _Sections(payload[_LENGTH.size + size:])


def read_metadata(path):
    """The verified metadata of a compressed file (model JSON, per-tensor entries)."""
    return _read(path)[0]


def _stream_input(entry, sections):
    return (sections.get(entry["data"]).tobytes(), sections.get(entry["lengths"]),
            sections.get(entry["offsets"], "<i8"), entry["count"])


def _decode(metadata, sections):
    tensors = metadata["tensors"]
    streams = [_stream_input(t[key], sections) for t in tensors if t["encoding"] == "sparse"
               for key in ("gaps", "indices") if key in t]
    decoded = iter(coding.huffman_decode(streams))
    weights = []
    for entry in tensors:
        if entry["encoding"] == "raw":
            array = sections.get(entry["data"], np.dtype(entry["dtype"]))
            weights.append(array.reshape(entry["shape"]).copy())
            continue
        positions = coding.positions_from_gaps(next(decoded), 2 ** entry["index_bits"])
        if "codebook" in entry:
            values = sections.get(entry["codebook"], "<f4")[next(decoded)]
        else:
            values = sections.get(entry["values"], "<f4")
        flat = np.zeros(entry["size"], np.float32)
        flat[positions] = values
        weights.append(flat.reshape(entry["shape"]))
    return weights


def _read_weights(path):
    metadata, sections = _read(path)
    try:
        return metadata, _decode(metadata, sections)
    except CompressedFileError:
        raise
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise CompressedFileError(f"{path}: inconsistent contents ({error!r}).") from None


def read_weights(path):
    """The model's weights (``model.get_weights()`` order) as numpy arrays."""
    return _read_weights(path)[1]


def decompress(path, custom_objects=None):
    """The tf_keras model rebuilt from the stored JSON with `read_weights` set."""
    metadata, weights = _read_weights(path)
    model = keras.models.model_from_json(metadata["model_config"], custom_objects=custom_objects)
    model.set_weights(weights)
    return model

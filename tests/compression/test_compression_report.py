"""compression_report: every count and stage size recomputed independently."""
import json
import math
import os

import numpy as np
import pytest
from matplotlib import image

from tf_stdprune.keras2.engine import keras
from tf_stdprune.compression.compressed_file import compress
from tf_stdprune.compression.stages import (CompressionReport, compression_report,
                                            plot_compression_stages)
from tf_stdprune.keras2.quantize import quantize_weights, strip_quantization

from conftest import tiny_cnn
from test_coding import optimal_cost, reference_gap_count
from conftest import zero_out


def _counts(array, index_bits):
    """Nonzeros, gap symbols, distinct values and optimal Huffman bits, counted by loops."""
    flat = array.ravel()
    positions = np.flatnonzero(flat)
    gaps, previous = [], -1
    for p in positions:
        gap = p - previous
        while gap > 2 ** index_bits - 1:
            gaps.append(0)
            gap -= 2 ** index_bits - 1
        gaps.append(gap)
        previous = p
    assert len(gaps) == reference_gap_count(positions, 2 ** index_bits)
    _, counts = np.unique(flat[positions], return_counts=True)
    return dict(n=len(positions), entries=len(gaps), k=len(counts), h_idx=optimal_cost(counts),
                h_gap=optimal_cost(np.bincount(gaps, minlength=2 ** index_bits)))


def _expected_bits(array, index_bits):
    """Stage bits of a quantized tensor: the Deep Compression formulas of the docstring."""
    c = _counts(array, index_bits)
    b = max(1, math.ceil(math.log2(max(c["k"], 1))))
    gaps = index_bits * c["entries"]
    return {"dense": 32 * array.size, "pruning": 32 * c["n"] + gaps,
            "pruning+quantization": b * c["n"] + gaps + 32 * c["k"],
            "pruning+quantization+huffman": c["h_idx"] + c["h_gap"] + 32 * c["k"]}


def test_stage_sizes_follow_the_formulas(tmp_path):
    model = strip_quantization(quantize_weights(zero_out(tiny_cnn(), 0.8), bits=3))
    report = compression_report(model)
    index_bits = {"conv2d/kernel:0": 8, "batch_normalization/gamma:0": 8, "dense/kernel:0": 5}
    totals = {s: 0 for s in report.stage_bytes()}
    other = 0
    for variable in model.weights:
        if variable.name in index_bits:
            for stage, bits in _expected_bits(variable.numpy(), index_bits[variable.name]).items():
                totals[stage] += bits
        else:
            other += int(np.prod(variable.shape))
    assert [t.name for t in report.tensors] == list(index_bits)
    assert report.other_parameters == other
    for stage, bits in totals.items():
        assert report.stage_bytes()[stage] == (bits + 32 * other) / 8, stage
    dense = report.stage_bytes()["dense"]
    assert report.ratios()["pruning+quantization+huffman"] == (
        dense / report.stage_bytes()["pruning+quantization+huffman"])
    path = compress(model, tmp_path / "model.tfsp")
    from_file = compression_report(path)
    assert from_file.to_dict() == report.to_dict()
    assert from_file.file_bytes == os.path.getsize(path)
    assert CompressionReport.from_dict(report.to_dict()).to_dict() == report.to_dict()


def test_raw_tensors_cost_32_bits_per_value():
    model = keras.Sequential([keras.Input((80,)), keras.layers.Dense(80)])
    kernel = model.layers[0].kernel.numpy()
    kernel[:, ::4] = 0.0  # 4800 distinct nonzeros: more than a 2^12 codebook
    model.layers[0].kernel.assign(kernel)
    (tensor,) = compression_report(model, dense_index_bits=4).tensors
    c = _counts(kernel, 4)
    assert tensor.codebook == 0 and tensor.cluster_bits == 32 and c["k"] > 4096
    assert tensor.stage_bits() == {
        "dense": 32 * 6400, "pruning": 32 * 4800 + 4 * c["entries"],
        "pruning+quantization": 32 * 4800 + 4 * c["entries"],
        "pruning+quantization+huffman": 32 * 4800 + c["h_gap"]}


def test_plot_writes_a_png_with_one_bar_per_stage(tmp_path):
    model = strip_quantization(quantize_weights(zero_out(tiny_cnn(), 0.8), bits=3))
    report = compression_report(model)
    path = plot_compression_stages(report, tmp_path / "stages.png")
    pixels = image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert os.listdir(tmp_path) == ["stages.png"]
    assert "pruning+quantization+huffman" in report.table()


def test_a_fully_pruned_model_has_unbounded_ratios_not_a_division_by_zero(tmp_path):
    """Every weight pruned and no other parameter: the compressed stages hold 0 bytes, so
    their ratios are None (null in JSON) and the table says "all weights pruned"."""
    model = keras.Sequential([keras.Input((6,)),
                              keras.layers.Dense(4, use_bias=False, kernel_initializer="zeros")])
    report = compression_report(model)
    assert report.stage_bytes() == {"dense": 96.0, "pruning": 0.0,
                                    "pruning+quantization": 0.0,
                                    "pruning+quantization+huffman": 0.0}
    ratios = report.ratios()
    assert ratios["pruning"] is None and ratios["pruning+quantization+huffman"] is None
    assert ratios["file"] == 96.0 / report.file_bytes
    data = json.loads(report.to_json(), parse_constant=lambda name: pytest.fail(name))
    assert data["ratios"]["pruning"] is None
    assert CompressionReport.from_dict(data).ratios() == ratios
    assert report.table().count("all weights pruned") == 3
    plot_compression_stages(report, tmp_path / "stages.png")
    assert image.imread(tmp_path / "stages.png").ndim == 3

"""`compression_report`: storage per stage as in Deep Compression's tables (Han, Mao and Dally 2016).

Per prunable tensor (kernel or BN gamma) with ``N`` weights, ``n`` nonzeros, ``E`` gap
symbols (``n`` plus fillers) of ``k`` index bits, ``K`` shared values (``b =
max(1, ceil(log2 K))`` bits per cluster index) and Huffman streams of ``H_gap`` and
``H_idx`` bits, in bits::

    dense                      = 32 N
    pruning                    = 32 n + k E                  (float32 values + k-bit gaps)
    pruning + quantization     = b n + k E + 32 K
    pruning + quant. + Huffman = H_idx + H_gap + 32 K

A tensor stored with raw values (more than 2^12 distinct values: not quantized) costs
``32 n`` instead of ``b n + 32 K`` and ``32 n`` instead of ``H_idx + 32 K``. Every other
parameter (biases, BN beta and moving statistics) costs 32 bits in every stage. Each
ratio is ``dense total / stage total``; ``file_bytes`` is the size of the actual file,
which adds the Huffman code lengths, block offsets and the model's JSON. A stage of 0
bytes (every weight pruned, no other parameter) has an unbounded ratio: None in
`CompressionReport.ratios` and ``null`` in the JSON, "all weights pruned" in the table.
"""
import dataclasses
import json
import math
import os

import numpy as np

from tf_stdprune.compression import compressed_file

STAGES = ("dense", "pruning", "pruning+quantization", "pruning+quantization+huffman")


@dataclasses.dataclass
class TensorCompression:
    name: str
    kind: str
    weights: int
    nonzeros: int
    entries: int
    index_bits: int
    codebook: int  # K; 0 when the values are stored raw
    gap_huffman_bits: int
    index_huffman_bits: int  # 0 when the values are stored raw

    @property
    def density(self):
        return self.nonzeros / self.weights if self.weights else 0.0

    @property
    def cluster_bits(self):
        """``b = max(1, ceil(log2 K))``; 32 for raw float32 values."""
        return max(1, math.ceil(math.log2(self.codebook))) if self.codebook else 32

    def stage_bits(self):
        """Bits of this tensor in each of `STAGES` (module docstring)."""
        gaps = self.index_bits * self.entries
        if self.codebook:
            quantized = self.cluster_bits * self.nonzeros + 32 * self.codebook
            huffman = self.index_huffman_bits + 32 * self.codebook
        else:
            quantized = huffman = 32 * self.nonzeros
        return dict(zip(STAGES, (32 * self.weights, 32 * self.nonzeros + gaps,
                                 quantized + gaps, huffman + self.gap_huffman_bits)))


@dataclasses.dataclass
class CompressionReport:
    tensors: list
    other_parameters: int
    file_bytes: int

    def stage_bytes(self):
        """Total bytes per stage, other parameters at 32 bits included."""
        totals = {s: 32 * self.other_parameters for s in STAGES}
        for tensor in self.tensors:
            for stage, bits in tensor.stage_bits().items():
                totals[stage] += bits
        return {s: bits / 8 for s, bits in totals.items()}

    def ratios(self):
        """``dense / stage`` for every stage, and ``dense / file_bytes`` as ``"file"``;
        None for a stage of 0 bytes (unbounded: every weight pruned)."""
        stages = self.stage_bytes()
        sizes = dict(stages, file=self.file_bytes)
        return {s: stages["dense"] / b if b else None for s, b in sizes.items() if s != "dense"}

    def to_dict(self):
        return {"tensors": [dataclasses.asdict(t) for t in self.tensors],
                "other_parameters": self.other_parameters, "file_bytes": self.file_bytes,
                "stage_bytes": self.stage_bytes(), "ratios": self.ratios()}

    @classmethod
    def from_dict(cls, data):
        return cls([TensorCompression(**t) for t in data["tensors"]],
                   data["other_parameters"], data["file_bytes"])

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def table(self):
        """Per-tensor table (Deep Compression Table 1 style), then the totals."""
        rows = [f"{'tensor':<36} {'kind':<5} {'weights':>10} {'dens %':>7} {'b':>3} {'k':>3} "
                f"{'H idx':>6} {'H gap':>6} {'bytes':>10} {'ratio':>7}"]
        for t in self.tensors:
            stages = t.stage_bits()
            final = stages[STAGES[-1]]
            rows.append(
                f"{t.name:<36} {t.kind:<5} {t.weights:>10} {100 * t.density:>7.2f} "
                f"{t.cluster_bits:>3} {t.index_bits:>3} "
                f"{t.index_huffman_bits / max(t.nonzeros, 1) if t.codebook else 32.0:>6.2f} "
                f"{t.gap_huffman_bits / max(t.entries, 1):>6.2f} {final / 8:>10.0f} "
                f"{stages['dense'] / max(final, 1):>7.1f}")
        stages, ratios = self.stage_bytes(), self.ratios()
        rows.append(f"other parameters (32 bits): {self.other_parameters}")
        rows += [f"{s:<30} {stages[s]:>12.0f} bytes  {_ratio_text(ratios.get(s, 1.0), 2)}"
                 for s in STAGES]
        rows.append(f"{'file':<30} {self.file_bytes:>12} bytes  "
                    f"{_ratio_text(ratios['file'], 2)}")
        return "\n".join(rows)

    __str__ = table


def _ratio_text(ratio, digits):
    return "all weights pruned" if ratio is None else f"x{ratio:.{digits}f}"


def compression_report(model_or_path, **index_bits):
    """The `CompressionReport` of a model (encoded in memory, as `compress` would with
    ``**index_bits``) or of a file written by `compress` (read without decoding)."""
    if isinstance(model_or_path, (str, os.PathLike)):
        metadata = compressed_file.read_metadata(model_or_path)
        file_bytes = os.path.getsize(model_or_path)
    else:
        metadata, payload = compressed_file.serialize(model_or_path, **index_bits)
        file_bytes = compressed_file.HEADER_BYTES + len(payload)
    tensors, other = [], 0
    for entry in metadata["tensors"]:
        if entry["encoding"] == "raw":
            other += int(np.prod(entry["shape"]))
            continue
        indices = entry.get("indices")
        tensors.append(TensorCompression(
            entry["name"], entry["kind"], entry["size"], entry["nonzeros"],
            entry["gaps"]["count"], entry["index_bits"],
            entry["codebook"][1] // 4 if indices else 0, entry["gaps"]["bits"],
            indices["bits"] if indices else 0))
    return CompressionReport(tensors, other, file_bytes)


def plot_compression_stages(report, path):
    """Bar chart of the bytes per stage (stacked by layer kind, fig4's colours) and of the
    actual file, each labelled with its ratio to dense; PNG written atomically."""
    from tf_stdprune import plots  # matplotlib (Agg) only when plotting

    per_kind = {kind: np.zeros(len(STAGES)) for kind in plots.KIND_COLOURS}
    for t in report.tensors:
        per_kind[t.kind if t.kind in per_kind else "other"] += np.array(
            [t.stage_bits()[s] for s in STAGES]) / 8
    per_kind["other"] += 4 * report.other_parameters
    labels = list(STAGES) + ["file"]
    figure, axes = plots.new_figure(figsize=(8, 4.5))
    bottom = np.zeros(len(labels))
    for kind, bytes_per_stage in per_kind.items():
        heights = np.append(bytes_per_stage, 0.0) / 1e6
        axes.bar(labels, heights, bottom=bottom, color=plots.KIND_COLOURS[kind], label=kind)
        bottom += heights
    bottom[-1] = report.file_bytes / 1e6
    axes.bar(labels[-1:], bottom[-1:], color="0.3", label="file (all included)")
    ratios = report.ratios()
    for x, (label, height) in enumerate(zip(labels, bottom)):
        axes.annotate(_ratio_text(ratios.get(label, 1.0), 1), (x, height), ha="center",
                      va="bottom")
    axes.set_ylabel("MB")
    axes.set_title("Storage per compression stage (32-bit dense = x1)")
    axes.tick_params(axis="x", labelrotation=15)
    axes.legend()
    return plots.save_figure(figure, os.fspath(path))

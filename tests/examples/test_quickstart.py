"""examples/quickstart.py, run as a user runs it: prune, report, compress, read back."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import tf_stdprune

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)


def _printed_int(name, text):
    return int(re.search(rf"^{name}: (\d+),", text, re.MULTILINE).group(1))


@pytest.mark.slow
def test_quickstart_prunes_most_weights_and_its_file_holds_exactly_the_printed_zeros(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    total, zeros = _printed_int("Total weights", done.stdout), _printed_int("Zero weights",
                                                                             done.stdout)
    assert zeros > 0.5 * total

    # Independent count: the kernels read back from the compressed file, counted by numpy.
    restored = tf_stdprune.decompress(str(tmp_path / "model.tfspz"))
    kernels = [np.asarray(layer.kernel) for layer in restored.layers if hasattr(layer, "kernel")]
    assert sum(k.size for k in kernels) == total
    assert sum(int(np.sum(k == 0.0)) for k in kernels) == zeros

    with open(tmp_path / "run" / "history.jsonl") as f:
        assert len([json.loads(line) for line in f if line.strip()]) == 3  # 3 iterations
    top1 = float(re.search(r"decompressed model: ([\d.]+) %", done.stdout).group(1))
    assert top1 > 85.0

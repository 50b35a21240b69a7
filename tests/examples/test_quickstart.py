"""examples/quickstart.py, run twice as a user runs it: the first run starts fresh, the
second resumes the finished run (and says so); no absl log prefixes on the terminal."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import tf_stdprune

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir)
# absl's prefix: severity, date, time, thread id, file:line]
ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.M)


def _printed_int(name, text):
    return int(re.search(rf"^{name}: (\d+),", text, re.MULTILINE).group(1))


def _run(out_dir):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_USE_LEGACY_KERAS")}  # as a user runs it
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "quickstart.py"),
                           f"--out_dir={out_dir}"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ABSL_PREFIX.findall(done.stdout + done.stderr) == []
    return done.stdout


@pytest.mark.slow
def test_quickstart_runs_twice_and_its_file_holds_exactly_the_printed_zeros(tmp_path):
    first = _run(tmp_path)
    assert first.startswith(f"starting a fresh run in {tmp_path / 'run'}")
    second = _run(tmp_path)
    assert second.startswith(f"resuming the run in {tmp_path / 'run'} after iteration 3 of 3")
    total, zeros = _printed_int("Total weights", second), _printed_int("Zero weights", second)
    assert zeros > 0.5 * total
    assert (total, zeros) == (_printed_int("Total weights", first),
                              _printed_int("Zero weights", first))  # resumed, not retrained

    # Independent count: the kernels read back from the compressed file, counted by numpy.
    restored = tf_stdprune.decompress(str(tmp_path / "model.tfspz"))
    assert type(restored).__module__.startswith("keras.")  # Keras 3 by default
    kernels = [np.asarray(layer.kernel) for layer in restored.layers if hasattr(layer, "kernel")]
    assert sum(k.size for k in kernels) == total
    assert sum(int(np.sum(k == 0.0)) for k in kernels) == zeros

    with open(tmp_path / "run" / "history.jsonl") as f:
        assert len([json.loads(line) for line in f if line.strip()]) == 3  # 3 iterations
    top1 = float(re.search(r"decompressed model: ([\d.]+) %", second).group(1))
    assert top1 > 85.0
    assert "top-1 change, pruned - dense:" in second and "exact McNemar" in second


def test_the_default_run_directory_is_ignored_by_git():
    """What the quickstart writes by default (runs/quickstart/) never shows as untracked."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probe = subprocess.run(["git", "-C", ROOT, "check-ignore", "-q",
                            "runs/quickstart/keras3/model.tfspz"], capture_output=True)
    if probe.returncode == 128:
        pytest.skip("not a git checkout")
    assert probe.returncode == 0

"""examples/vgg19_cifar10.py with its scale flags: --mixed_precision, --strategy=multi_worker.

Each run is the example script in a subprocess (the precision policy and TF_CONFIG must be
set before TensorFlow starts), on the tiny settings of tests/examples/test_example.py.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np

from example_runs import TINY_SCRIPT
from test_quickstart import ABSL_PREFIX
from conftest import free_port
from test_example import TINY  # the quick preset on tiny settings
from tf_stdprune import decompress, sparsity_report
from tf_stdprune.keras2.engine import keras
from tf_stdprune.keras2.run_state import read_history

TIMEOUT_S = 1200  # end-to-end runs of several processes share 2 cores


def _start(log, out_dir, *argv, env=None):
    """The example on ``TINY`` with the tiny model in a subprocess; stdout/stderr go to files ``log``.out/.err
    (not pipes, which fill up unread while another process is waited for)."""
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", TINY_SCRIPT, f"--out_dir={out_dir}", *TINY,
             "--latency_threads=", *argv],  # the forms' latency is tested in test_example.py
            stdout=stdout, stderr=stderr,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
                 **(env or {})})
    process.log = log
    return process


def _output(process, stream):
    with open(f"{process.log}.{stream}") as f:
        return f.read()


def _tail(process):
    return "".join(f"\n--- {process.log}.{stream} (rc {process.returncode}):\n"
                   + _output(process, stream)[-3000:] for stream in ("out", "err"))


def _finish(processes, grace_s=30):
    """Waits up to ``TIMEOUT_S`` for all; once one fails, the others get ``grace_s`` before
    they are killed (a worker whose peer died waits for its collectives). Returns stdouts."""
    deadline = time.time() + TIMEOUT_S
    while any(p.poll() is None for p in processes) and time.time() < deadline:
        if any(p.poll() not in (None, 0) for p in processes):
            deadline = min(deadline, time.time() + grace_s)
        time.sleep(0.5)
    for p in processes:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert all(p.returncode == 0 for p in processes), "".join(
        f"\nprocess {i}:" + _tail(p) for i, p in enumerate(processes))
    return [_output(p, "out") for p in processes]


def _kernels(model):
    return [(layer.name, layer.kernel.numpy()) for layer in model.layers
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def test_mixed_precision_run_saves_float32_shared_pruned_kernels(tmp_path):
    out = tmp_path / "out"
    process = _start(tmp_path / "run", out, "--mixed_precision", "--noexport_sparse")
    (stdout,) = _finish([process])
    assert "mixed precision policy: mixed_bfloat16" in stdout
    # The script's terminal output carries no absl prefixes (I1207 06:31:50.215672 ...]).
    assert ABSL_PREFIX.findall(stdout + _output(process, "err")) == []
    assert "iteration 2/2  q=1" in _output(process, "err")  # the procedure's lines, plain
    assert (out / "summary.md").exists()
    assert "no TFLite files for a mixed-precision model" in stdout  # the converter takes float32
    assert not (out / "final" / "model.tflite").exists()
    model = keras.models.load_model(out / "final" / "model.keras")
    kernels = _kernels(model)
    assert len(kernels) == 5  # the tiny plan: 2 conv + 3 dense
    for name, kernel in kernels:
        assert kernel.dtype == np.float32, name
        assert len(np.unique(kernel[kernel != 0])) <= 2 ** 4, name  # weight sharing ran
    zeros = sparsity_report(model).zero_weights
    assert zeros == read_history(str(out / "run"))[-1]["zero_weights"] > 0
    restored = decompress(out / "final" / "model.tfspz")
    assert [w.name for w in restored.weights] == [w.name for w in model.weights]
    for (name, kernel), (_, decoded) in zip(kernels, _kernels(restored)):
        # The file stores every zero as +0.0 (compressed_file docstring); + 0.0 maps -0.0 to it.
        np.testing.assert_array_equal((kernel + 0.0).view(np.uint32), decoded.view(np.uint32),
                                      err_msg=name)
    for saved, decoded in zip(model.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(saved, decoded)


def test_multi_worker_run_two_processes_one_shared_out_dir(tmp_path):
    out, scratch = tmp_path / "out", tmp_path / "tmp"
    scratch.mkdir()  # every worker's TMPDIR: the non-chief's vgg19-worker-* goes there
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    # Weight sharing runs in the mixed precision test; here the checkpoints and SavedModel
    # exports do (TFLite conversion has nothing particular to the strategy).
    processes = [
        _start(tmp_path / f"worker{i}", out, "--strategy=multi_worker", "--quantize_bits=0",
               "--notflite",
               env={"TMPDIR": str(scratch), "TF_CONFIG": json.dumps(
                   {"cluster": cluster, "task": {"type": "worker", "index": i}})})
        for i in range(2)]
    _finish(processes)
    summaries = [os.path.join(d, f) for d, _, files in os.walk(out) for f in files
                 if f == "summary.md"]
    assert summaries == [str(out / "summary.md")]
    history = read_history(str(out / "run"))
    assert [r["iteration"] for r in history] == [1, 2] and [r["q"] for r in history] == [0.5, 1.0]
    model = keras.models.load_model(out / "final" / "model.keras")
    assert sparsity_report(model).zero_weights == history[-1]["zero_weights"] > 0
    leftovers = [os.path.join(d, name) for d, dirs, files in os.walk(out) for name in dirs + files
                 if name.startswith((".tmp", "vgg19-worker-")) or name.endswith(".tmp")]
    assert leftovers == []
    assert [p for p in os.listdir(scratch) if p.startswith("vgg19-worker-")] == []

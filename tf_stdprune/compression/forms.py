"""Every exported form of one model side by side: size on disk, latency at batch 1 per
thread count, top-1, and the top-1 change against a reference model.

Latency is measured as ``benchmarks/serving.py`` measures it: the forms run in
interleaved rounds (`tf_stdprune.timing.interleaved_samples`), each round ``calls``
calls at batch 1 per form, and every form is reported by its median time per call and by
the median of its per-round ratios to the first form (the dense SavedModel) with the 95 %
sign-test interval (`tf_stdprune.timing.paired_ratio`): only an interval that excludes 1
shows a difference. TensorFlow fixes its thread pools when it starts, so each thread
count is measured in a fresh Python process whose TensorFlow intra- and inter-op pools
and TFLite interpreters get that many threads; the processes load their forms at the same
time and measure one after the other. Top-1 is computed here, in this process.
"""
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from tf_stdprune.accuracy import accuracy_change
from tf_stdprune.compression.serving import disk_size
from tf_stdprune.timing import interleaved_samples, paired_ratio
from tf_stdprune.validate import check_int

# The forms a run directory's ``final/`` may hold: (name, file or directory).
FORMS = (("dense SavedModel", "saved_model"), ("sparse SavedModel", "sparse_saved_model"),
         ("TFLite", "model.tflite"), ("TFLite int8", "model_int8.tflite"),
         ("compressed file (decompressed, then run as the Keras model)", "model.tfspz"))
EVAL_BATCH = 256
ROUNDS, CALLS = 7, 10  # interleaved rounds, and calls at batch 1 per form in each round


def predictor(path, threads=None):
    """``images -> logits`` (numpy) running the exported form at ``path``: a TFLite
    flatbuffer (``threads`` interpreter threads), a SavedModel's serving signature, or a
    compressed file, decompressed and run as the Keras model it holds."""
    import tensorflow as tf
    if path.endswith(".tflite"):
        interpreter = tf.lite.Interpreter(model_path=path, num_threads=threads)
        source = interpreter.get_input_details()[0]["index"]
        target = interpreter.get_output_details()[0]["index"]
        shape = []

        def predict(x):
            if list(x.shape) != shape:
                interpreter.resize_tensor_input(source, list(x.shape))
                interpreter.allocate_tensors()
                shape[:] = list(x.shape)
            interpreter.set_tensor(source, x)
            interpreter.invoke()
            return interpreter.get_tensor(target)
        return predict
    if path.endswith(".tfspz"):
        from tf_stdprune.compression.compressed_file import decompress
        from tf_stdprune.dispatch import KERAS3, world_of
        model = decompress(path)
        if world_of(model) == KERAS3:  # a jitted predict step on any backend
            return lambda x: np.asarray(model.predict_on_batch(x))
        call = tf.function(lambda x: model(x, training=False))
        return lambda x: call(tf.constant(x)).numpy()
    serve = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    return lambda x: next(iter(serve(**{name: tf.constant(x)}).values())).numpy()


def latency_samples(predictors, image, rounds, calls):
    """``{name: seconds per call in each round}`` of the forms ``{name: predictor}`` at
    batch 1 (``image`` is one input, batch axis included), in this process."""
    def timed(predict):
        def run():
            for _ in range(calls):
                predict(image)
        return run

    samples = interleaved_samples({n: timed(p) for n, p in predictors.items()}, rounds)
    return {name: [t / calls for t in times] for name, times in samples.items()}


def _measure_in_this_process():
    """The child's side of `latencies_by_threads`: set the thread pools, load, say
    ``ready``, wait for a line on stdin, measure, print the samples as JSON. A form that
    does not load here (e.g. a SavedModel whose functions name the devices of the
    cluster that wrote it) is left out, its error in ``unloadable``."""
    threads, paths, image_path, rounds, calls = json.loads(sys.argv[1])
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.get_logger().setLevel("ERROR")
    image = np.load(image_path)
    predictors, unloadable = {}, {}
    for name, path in paths.items():
        try:
            predictors[name] = predictor(path, threads)
            predictors[name](image)  # builds, traces or allocates
        except Exception as error:  # noqa: BLE001  (any loader's error: reported, not fatal)
            predictors.pop(name, None)
            unloadable[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    print("ready", flush=True)
    sys.stdin.readline()
    samples = latency_samples(predictors, image, rounds, calls) if predictors else {}
    print(json.dumps(dict(samples, unloadable=unloadable)), flush=True)


def latencies_by_threads(paths, image, threads=(1, 2), rounds=ROUNDS, calls=CALLS):
    """``{threads: {name: seconds per call in each round, "unloadable": {name: error}}}``:
    `latency_samples` in one fresh process per thread count (loaded in parallel, measured
    one after the other)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handle, image_path = tempfile.mkstemp(suffix=".npy")
    with os.fdopen(handle, "wb") as f:
        np.save(f, image)
    errors = {t: tempfile.TemporaryFile("w+") for t in threads}  # a pipe could fill unread
    children = {t: subprocess.Popen(
        [sys.executable, "-m", "tf_stdprune.compression.forms",
         json.dumps([t, paths, image_path, rounds, calls])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors[t], text=True,
        env=env) for t in threads}

    def failed(t):
        children[t].wait()
        errors[t].seek(0)
        return RuntimeError(f"the latency process for {t} threads failed:\n"
                            + errors[t].read()[-3000:])
    try:
        for t, child in children.items():
            if child.stdout.readline().strip() != "ready":
                raise failed(t)
        results = {}
        for t, child in children.items():
            out, _ = child.communicate("go\n")
            if child.returncode:
                raise failed(t)
            results[t] = json.loads(out.strip().splitlines()[-1])
        return results
    finally:
        for t, child in children.items():
            if child.poll() is None:
                child.kill()
                child.wait()
            errors[t].close()
        os.remove(image_path)


@dataclasses.dataclass
class FormRow:
    """One exported form: ``latency[threads] = (median ms, (ratio, low, high))`` with the
    per-round ratio to the first form measured, or the error that kept the form from
    loading in a fresh process; ``change`` the top-1 change vs the reference."""
    name: str
    file: str
    bytes: int
    top1: float
    change: object
    latency: dict


def compare_forms(directory, x, y, reference_predictions, threads=(1, 2), rounds=ROUNDS,
                  calls=CALLS, forms=FORMS):
    """The `FormRow` of every form of ``forms`` (``(name, file)``) present in
    ``directory``: size, top-1 (%) on ``(x, y)``, the top-1 change against
    ``reference_predictions`` (`tf_stdprune.accuracy_change`; None: not compared), and the
    latency at batch
    1 with each of ``threads`` threads (see the module docstring; none: no latency).

    Examples:
      >>> rows = compare_forms("runs/quick/final", x, y, dense.predict(x))
      >>> print(forms_markdown(rows, len(y)))
    """
    threads = [check_int(t, f"compare_forms(threads={threads!r}): each", 1) for t in threads]
    rounds, calls = check_int(rounds, "rounds", 1), check_int(calls, "calls", 1)
    present = [(name, file) for name, file in forms
               if os.path.exists(os.path.join(directory, file))]
    paths = {name: os.path.abspath(os.path.join(directory, file)) for name, file in present}
    if not paths:
        return []
    x = np.asarray(x, np.float32)
    samples = latencies_by_threads(paths, x[:1], threads, rounds, calls) if threads else {}
    rows = []
    for name, file in present:
        predict = predictor(paths[name])
        logits = np.concatenate([predict(x[i:i + EVAL_BATCH])
                                 for i in range(0, len(x), EVAL_BATCH)])
        latency = {}
        for t, s in samples.items():
            baseline = next((n for n in paths if n in s), None)  # the first form measured
            latency[t] = (1000 * float(np.median(s[name])), paired_ratio(s[name], s[baseline])
                          ) if name in s else s["unloadable"][name]
        rows.append(FormRow(name, file, disk_size(paths[name])["bytes"],
                            100 * float(np.mean(np.argmax(logits, 1) == y)),
                            None if reference_predictions is None
                            else accuracy_change(reference_predictions, logits, y), latency))
    return rows


def _latency_cell(latency):
    if isinstance(latency, str):
        return f" not measured: {latency.replace('|', '/')} |"
    ms, (q, low, high) = latency
    return f" {ms:.2f}, {q:.3f} [{low:.3f}, {high:.3f}] |"


def forms_markdown(rows, images, rounds=ROUNDS, calls=CALLS, reference="dense baseline"):
    """`compare_forms`' rows as a markdown table (``rounds`` and ``calls`` as measured,
    ``images`` the number of test images).

    Examples:
      >>> print(forms_markdown(compare_forms("runs/quick/final", x, y, dense.predict(x)), len(y)))
    """
    if not rows:
        return ""
    threads = list(rows[0].latency)
    measured = [r.name for r in rows if threads and not isinstance(r.latency[threads[0]], str)]
    baseline = (measured or [rows[0].name])[0]
    head = "".join(f" {t} thread{'s' * (t > 1)}: ms, x {baseline} per round [95 %] |"
                   for t in threads)
    lines = [f"| {r.name} | final/{r.file} | {r.bytes} | {r.top1:.2f} | "
             + ("n/a" if r.change is None else
                f"{r.change.change:+.2f} [{r.change.low:+.2f}, {r.change.high:+.2f}]") + " |"
             + "".join(_latency_cell(r.latency[t]) for t in threads) + "\n"
             for r in rows]
    return (f"\n## Exported forms (latency at batch 1: median per call over {rounds} interleaved "
            f"rounds of {calls} calls, and the per-round ratio to the {baseline}; top-1 on the "
            f"{images} test images, its change vs the {reference} with the exact McNemar 95 % "
            f"interval)\n\n| form | file | size (bytes) | top-1 (%) | change vs {reference} "
            f"(points) |{head}\n|---|---|---|---|---|" + "---|" * len(threads) + "\n"
            + "".join(lines))


if __name__ == "__main__":
    _measure_in_this_process()

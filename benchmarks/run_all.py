"""Runs the benchmarks and writes their latest results to ``benchmarks/RESULTS.md``.

Each benchmark script prints one JSON object per report, then a human-readable table.
This script runs the selected benchmarks one after the other (a subprocess each, so
their memory and TensorFlow state stay apart), parses the JSON objects out of each one's
standard output, keeps the rest as its table, and rewrites RESULTS.md with, for every
benchmark run, the exact command, the machine (CPU model, cores, library versions) and the
table. The section of a benchmark not selected is kept as the file had it (its latest
run); one the file lacks is listed as not run.

    python benchmarks/run_all.py                     # small settings, every benchmark
    python benchmarks/run_all.py --full              # the sizes quoted in the README
    python benchmarks/run_all.py --only=mask_update,compression   # the others kept
"""
import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "RESULTS.md")
sys.path.insert(0, ROOT)  # the package, also from a checkout that is not installed

from tf_stdprune.io import atomic_write  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """One benchmark: its script, flags for a small run and for the published sizes."""
    name: str
    script: str
    quick: tuple
    full: tuple
    env: tuple = ()  # extra (name, value) environment variables
    about: str = ""
    preimport: tuple = ("tensorflow",)  # imported before benchmarks/ is on sys.path

    def command(self, full):
        """The command line, as it would be typed in the repository root."""
        env = " ".join(f"{k}={v}" for k, v in self.env)
        args = " ".join(self.full if full else self.quick)
        script = os.path.join("benchmarks", self.script)  # an absolute script stays absolute
        return " ".join(p for p in (env, "python", script, args) if p)


BENCHMARKS = (
    Benchmark("overhead", "overhead.py",
              ("--width=0.25", "--batch_size=64", "--steps=2", "--rounds=8", "--clock=cpu"),
              ("--width=1.0", "--batch_size=8", "--steps=4", "--rounds=20", "--clock=cpu"),
              about="train step: dense vs tfmot prune_low_magnitude vs prune_low_std"),
    Benchmark("overhead_keras3", "overhead.py",
              ("--keras=3", "--width=0.25", "--batch_size=64", "--steps=2", "--rounds=5"),
              ("--keras=3", "--width=0.25", "--batch_size=64", "--steps=4", "--rounds=20"),
              env=(("KERAS_BACKEND", "jax"),),
              about="Keras 3 train step (JAX backend) pruned vs dense; mask update"),
    *(Benchmark(f"overhead_{model}_{short}", "overhead.py",
                ("--keras=3", f"--model={model}", "--batch_size=16", "--steps=4", "--rounds=15"),
                ("--keras=3", f"--model={model}", "--batch_size=16", "--steps=8", "--rounds=30"),
                env=(("KERAS_BACKEND", backend),),
                about=f"Keras 3 train step ({backend} backend) of a small KerasHub {model}, "
                      "pruned at every depth vs dense")
      for model in ("bert", "gpt2") for backend, short in (("jax", "jax"), ("tensorflow", "tf"))),
    Benchmark("memory_keras3", "memory_keras3.py", ("--hidden_dim=128", "--num_layers=2"),
              ("--hidden_dim=256", "--num_layers=4"), env=(("KERAS_BACKEND", "jax"),),
              about="Keras 3 GPT-2: variable bytes and peak RSS, pruned at every depth vs dense"),
    Benchmark("xla_copies", "xla_copies.py",
              ("--width=0.25", "--batch_size=8", "--with_kernels_only"),
              ("--width=0.25", "--batch_size=8", "--with_kernels_only"),
              about="elements copied by one XLA-compiled train step (deterministic)"),
    Benchmark("mask_update", "mask_update.py", ("--width=0.25", "--rounds=3"),
              ("--width=1.0", "--rounds=3"),
              about="recompute every mask of VGG19-BN: std rule vs tfmot's top-k"),
    Benchmark("std_mode", "std_mode.py",
              ("--seeds=1", "--baseline_epochs=5", "--epochs_per_iteration=1"),
              ("--seeds=2",),
              about="which std_mode gives the best zeros / accuracy trade-off (digits)"),
    Benchmark("compression", "compression_stages.py", ("--width=0.25", "--rounds=3"),
              ("--width=1.0", "--rounds=5"),
              about="bytes per Deep Compression stage, file and SavedModel sizes, serving"),
    Benchmark("serving", "serving.py", ("--width=0.25", "--rounds=3"),
              ("--width=0.25", "--rounds=7"),
              about="size, latency and top-1 of every exported form (SavedModels, TFLite)"),
    Benchmark("serving_full_width", "serving.py", ("--width=1.0", "--rounds=3"),
              ("--width=1.0", "--rounds=5"),
              about="the same at full width (38.97M parameters)"),
    Benchmark("sparse_matmul", "serving.py",
              ("--matmul", "--rounds=9", "--calls=20"), ("--matmul", "--rounds=20", "--calls=20"),
              about="one 4096x4096 Dense kernel: dense vs sparse products by zeros and batch"),
    Benchmark("xnnpack_sparse", "xnnpack_sparse.py",
              ("--model=mobilenet_v2", "--rounds=5", "--calls=3"),
              ("--model=mobilenet_v2", "--rounds=15", "--calls=5"),
              about="MobileNetV2, 1x1 convs at 70/80/90 % zeros: dense vs sparse TFLite, "
                    "tf.lite and ai-edge-litert, 1 and 2 threads, batch 1"),
    Benchmark("block_sparse_dense", "xnnpack_sparse.py",
              ("--model=dense4096,mlp", "--zeros=0.9", "--rounds=5", "--calls=10"),
              ("--model=dense4096,mlp", "--rounds=15", "--calls=20"),
              about="4096x4096 Dense and a 3x1024 MLP, 90 % zero blocks of 4: dense vs "
                    "sparse TFLite (block-sparse FullyConnected), 1 and 2 threads, batch 1"),
)


# Runs a benchmark script as ``__main__`` after importing ``preimport`` (argv[1], comma-
# separated) with benchmarks/ NOT on sys.path: a script there named like a package that a
# dependency tries to import (e.g. a ``compression.py`` vs the ``compression`` package jax
# looks for) would otherwise be imported in its place, in the middle of TensorFlow's import.
_BOOTSTRAP = """
import importlib, os, runpy, sys
preimport, script = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
for name in filter(None, preimport.split(",")):
    importlib.import_module(name)
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")
"""


def split_output(stdout):
    """``(json_objects, table)`` of a benchmark's standard output.

    A JSON object starts on a line whose first character is ``{`` and may span many
    lines; every other line belongs to the table, in order. A line that starts with
    ``{`` but does not begin a valid JSON object is kept as table text.
    """
    decoder = json.JSONDecoder()
    objects, table, position = [], [], 0
    while position < len(stdout):
        end = stdout.find("\n", position)
        end = len(stdout) if end < 0 else end + 1
        if stdout.startswith("{", position):
            try:
                value, stop = decoder.raw_decode(stdout, position)
            except json.JSONDecodeError:
                value = None
            if isinstance(value, dict):
                objects.append(value)
                newline = stdout.find("\n", stop)
                position = len(stdout) if newline < 0 else newline + 1
                continue
        table.append(stdout[position:end].rstrip("\n"))
        position = end
    return objects, "\n".join(table).strip("\n")


def _version(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_model(cpuinfo="/proc/cpuinfo"):
    """The CPU's model name from ``cpuinfo`` (Linux), else what `platform` knows."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine():
    """The machine a run measures: CPU, cores, OS, Python and library versions."""
    versions = {name: _version(name) for name in (
        "tensorflow", "tf-keras", "keras", "jax", "tensorflow-model-optimization",
        "ai-edge-litert")}
    return {"cpu": cpu_model(), "cores": os.cpu_count(),
            "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), **versions}


@dataclasses.dataclass
class Outcome:
    """What one benchmark run gave: its command, exit status, JSON reports and table."""
    benchmark: Benchmark
    command: str
    returncode: int
    reports: list
    table: str
    stderr_tail: str = ""
    seconds: float = 0.0


def run(benchmark, full=False, python=sys.executable, timeout=None):
    """Runs one benchmark in a subprocess from the repository root; returns its `Outcome`.

    ``benchmark.script`` is relative to ``benchmarks/`` (or absolute). The subprocess gets
    ``TF_CPP_MIN_LOG_LEVEL=2`` unless set, the benchmark's own variables and the
    repository root on ``PYTHONPATH``; ``benchmark.preimport`` is imported before the
    script's directory joins ``sys.path`` (see ``_BOOTSTRAP``). A run past ``timeout``
    seconds raises `subprocess.TimeoutExpired`.
    """
    env = dict(os.environ, **dict(benchmark.env))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    args = benchmark.full if full else benchmark.quick
    start = time.perf_counter()
    command = [python, "-c", _BOOTSTRAP, ",".join(benchmark.preimport),
               os.path.join(HERE, benchmark.script), *args]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    seconds = time.perf_counter() - start
    reports, table = split_output(done.stdout)
    tail = "\n".join(done.stderr.strip().splitlines()[-15:]) if done.returncode else ""
    return Outcome(benchmark, benchmark.command(full), done.returncode, reports, table,
                   tail, seconds)


def _section(outcome, machine_info):
    lines = [f"## {outcome.benchmark.name}", "", outcome.benchmark.about, "",
             f"`{outcome.command}` ({outcome.seconds:.0f} s)", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in machine_info.items()), ""]
    if outcome.returncode:
        lines += [f"Failed with exit status {outcome.returncode}; the end of its error output:",
                  "", "```", outcome.stderr_tail, "```", ""]
    if outcome.table:
        lines += ["```", outcome.table, "```", ""]
    if outcome.reports:
        lines += ["<details><summary>JSON</summary>", "", "```json",
                  json.dumps(outcome.reports, indent=1), "```", "", "</details>", ""]
    return lines


def previous_sections(text):
    """``{benchmark name: its section}`` of an earlier RESULTS.md: each ``## name`` header
    (of a benchmark in `BENCHMARKS`) up to the next ``## `` header."""
    known = {b.name for b in BENCHMARKS}
    sections, name, lines = {}, None, []
    for line in text.splitlines() + ["## "]:
        if line.startswith("## "):
            if name in known:
                sections[name] = "\n".join(lines).strip("\n") + "\n"
            name, lines = line[3:].strip(), []
        lines.append(line)
    return sections


def render(outcomes, machine_info, kept=None, full=False):
    """The text of RESULTS.md: a section per benchmark in `BENCHMARKS` order, from
    ``outcomes`` (measured on ``machine_info``) or, for one not run now, from ``kept``
    (``{name: section}`` of the earlier file); the rest are listed as not run."""
    kept = kept or {}
    ran = {o.benchmark.name: o for o in outcomes}
    lines = ["# Benchmark results", "",
             "Written by `python benchmarks/run_all.py`: a run rewrites the sections of the",
             "benchmarks it ran and keeps the others' latest run. Each section names its",
             "command and machine. Ratios come with the median of per-round ratios and its",
             "95 % sign-test interval (`benchmarks/common.py`): only an interval that",
             "excludes 1 shows a difference.", ""]
    not_run = []
    others = [o.benchmark for o in outcomes if o.benchmark not in BENCHMARKS]
    for benchmark in list(BENCHMARKS) + others:
        if benchmark.name in ran:
            lines += _section(ran[benchmark.name], machine_info)
        elif benchmark.name in kept:
            lines += kept[benchmark.name].splitlines() + [""]
        else:
            not_run.append(benchmark)
    if not_run:
        lines += ["## Not run yet", ""]
        lines += [f"- {b.name}: `{b.command(full)}` ({b.about})" for b in not_run]
        lines.append("")
    return "\n".join(lines)


def select(only):
    """The benchmarks named in ``only`` (comma-separated), all of them if empty."""
    if not only:
        return list(BENCHMARKS)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {b.name: b for b in BENCHMARKS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"--only names unknown benchmarks {unknown}; choose from "
                         f"{sorted(known)}.")
    return [known[n] for n in names]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the README's (published) sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--output", default=RESULTS, help="file to write (RESULTS.md)")
    args = parser.parse_args(argv)
    chosen = [b for b in select(args.only)
              if os.path.exists(os.path.join(HERE, b.script))]
    outcomes = []
    for benchmark in chosen:
        print(f"running {benchmark.command(args.full)}", flush=True)
        outcomes.append(run(benchmark, args.full))
        print(outcomes[-1].table or outcomes[-1].stderr_tail, flush=True)
    kept = {}
    if os.path.exists(args.output):
        with open(args.output) as f:
            kept = previous_sections(f.read())
    atomic_write(args.output, render(outcomes, machine(), kept, args.full))
    print(f"wrote {args.output}")
    return 1 if any(o.returncode for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m tf_stdprune report RUN_DIR`` (also ``tf-stdprune report RUN_DIR``).

Prints the reference experiment's "Final Parameters" block and the per-iteration table of a run directory
and regenerates its figures, without training anything. A damaged run directory is read
as far as it can be: an unreadable ``report.json`` or a bad ``history.jsonl`` line is
named on stderr and the rest is printed; figures are drawn from the readable lines, and
where the run directory cannot be written (read-only), none are written there (give
``--figures_dir``). The exit status is 1 when anything was skipped, else 0.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

from tf_stdprune import plots
from tf_stdprune.io import write_atomically
from tf_stdprune.report import SparsityReport
from tf_stdprune.procedure.run_directory import parse_history

def _print_report(run_dir):
    try:
        with open(os.path.join(run_dir, "report.json")) as f:
            report = SparsityReport.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"skipped {os.path.join(run_dir, 'report.json')}: unreadable ({error}).",
              file=sys.stderr)
        return False
    print(report)
    print()
    return True


def _print_history(records):
    nan = float("nan")
    print(f"{'iteration':>9} {'q':>7} {'zeros %':>8} {'x':>7} {'val before':>11} {'val after':>10}")
    for record in records:
        before = (record["before"].get("val_top1") or nan) * 100
        after = (record["after"].get("val_top1") or nan) * 100
        q = nan if record["q"] is None else record["q"]
        rate = record["compression_rate"]
        rate = "all" if rate is None else f"{rate:.2f}"  # null: every weight pruned
        print(f"{record['iteration']:>9} {q:>7.3g} {record['zero_weights_rate']:>8.2f} "
              f"{rate:>7} {before:>11.2f} {after:>10.2f}")


def _write_figures(run_dir, records, figures_dir):
    """Draws the figures from ``records`` in a scratch directory, then moves each into
    ``figures_dir`` atomically. Returns the paths, or None when it cannot write there."""
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, "history.jsonl"), "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in records)
        for name in ("report.json", "baseline.json"):
            try:
                with open(os.path.join(run_dir, name)) as f:
                    json.load(f)
                shutil.copyfile(os.path.join(run_dir, name), os.path.join(scratch, name))
            except (OSError, ValueError):
                pass
        drawn = plots.write_figures(scratch)
        try:
            os.makedirs(figures_dir, exist_ok=True)
            return [write_atomically(os.path.join(figures_dir, os.path.basename(path)),
                                     lambda target, path=path: shutil.copyfile(path, target))
                    for path in drawn]
        except OSError as error:
            print(f"wrote no figures: {figures_dir} cannot be written ({error.strerror}). Pass "
                  "--figures_dir=<a writable directory>.", file=sys.stderr)
            return None


def _report(run_dir, figures_dir=None):
    ok = _print_report(run_dir)
    records, bad = parse_history(run_dir)
    for number, text in bad:
        print(f"skipped {os.path.join(run_dir, 'history.jsonl')}, line {number}: not an "
              f"iteration record: {text!r}", file=sys.stderr)
    _print_history(records)
    paths = _write_figures(run_dir, records, figures_dir or os.path.join(run_dir, "figures"))
    for path in paths or []:
        print("wrote", path)
    return 0 if ok and not bad and paths is not None else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tf-stdprune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="report and figures of a run directory")
    report.add_argument("run_dir")
    report.add_argument("--figures_dir", help="where to write the figures (default: "
                        "RUN_DIR/figures)")
    args = parser.parse_args(argv)
    missing = [name for name in ("report.json", "history.jsonl")
               if not os.path.exists(os.path.join(args.run_dir, name))]
    if missing:
        parser.error(f"{args.run_dir} is not a finished run directory: missing {', '.join(missing)}.")
    return _report(args.run_dir, args.figures_dir)


if __name__ == "__main__":
    sys.exit(main())

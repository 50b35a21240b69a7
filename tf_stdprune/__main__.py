"""``python -m tf_stdprune report RUN_DIR`` (also ``tf-stdprune report RUN_DIR``).

Prints the seed's "Final Parameters" block and the per-iteration table of a run directory
and regenerates its figures, without training anything.
"""
import argparse
import json
import os
import sys

from tf_stdprune import plots
from tf_stdprune.report import SparsityReport


def _report(run_dir):
    with open(os.path.join(run_dir, "report.json")) as f:
        report = SparsityReport.from_dict(json.load(f))
    print(report)
    print()
    print(report.table())
    print()
    nan = float("nan")
    print(f"{'iteration':>9} {'q':>7} {'zeros %':>8} {'x':>7} {'val before':>11} {'val after':>10}")
    with open(os.path.join(run_dir, "history.jsonl")) as f:
        for record in map(json.loads, filter(str.strip, f)):
            before = record["before"].get("val_top1", nan) * 100
            after = record["after"].get("val_top1", nan) * 100
            print(f"{record['iteration']:>9} {nan if record['q'] is None else record['q']:>7.3g} "
                  f"{record['zero_weights_rate']:>8.2f} {record['compression_rate']:>7.2f} "
                  f"{before:>11.2f} {after:>10.2f}")
    for path in plots.write_figures(run_dir):
        print("wrote", path)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tf-stdprune", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="report and figures of a run directory")
    report.add_argument("run_dir")
    args = parser.parse_args(argv)
    missing = [name for name in ("report.json", "history.jsonl")
               if not os.path.exists(os.path.join(args.run_dir, name))]
    if missing:
        parser.error(f"{args.run_dir} is not a finished run directory: missing {', '.join(missing)}.")
    _report(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""benchmarks/run_all.py: parsing a benchmark's output, running it, writing RESULTS.md.

No real benchmark runs here: a fake benchmark script prints what the real ones print
(indented JSON objects, then a table)."""
import dataclasses
import json
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import run_all  # noqa: E402

FIRST = {"benchmark": "train step", "config": {"width": 0.25}, "results": {"dense": 1.5}}
SECOND = {"benchmark": "sizes", "results": {"bytes": [1, 2, {"nested": "}{"}]}}
TABLE_LINES = ["", "train step  (width=0.25)", "contender   median ms",
               "{not json, a table line", "dense            1.50"]


def _fake_stdout():
    return "\n".join([json.dumps(FIRST, indent=2), *TABLE_LINES[:3],
                      json.dumps(SECOND, indent=2), *TABLE_LINES[3:]]) + "\n"


def _fake_script(tmp_path, body):
    path = tmp_path / "fake_benchmark.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


def test_split_output_returns_every_json_object_and_keeps_the_rest_as_the_table():
    reports, table = run_all.split_output(_fake_stdout())
    assert reports == [FIRST, SECOND]
    assert table.splitlines() == [line for line in TABLE_LINES if line]


def test_split_output_of_a_run_that_printed_no_json_is_all_table():
    reports, table = run_all.split_output("only a table\n{broken\n")
    assert reports == [] and table == "only a table\n{broken"


def test_run_captures_the_reports_of_a_benchmark_subprocess_and_passes_its_flags(tmp_path):
    script = _fake_script(tmp_path, f"""
        import json, os, sys
        print(json.dumps({FIRST!r}, indent=2))
        print("table row", sys.argv[1:], os.environ["FAKE_ENV"])
    """)
    fake = run_all.Benchmark("fake", script, ("--small",), ("--big",), env=(("FAKE_ENV", "x"),),
                             preimport=("json",))
    outcome = run_all.run(fake, full=True)
    assert outcome.returncode == 0
    assert outcome.reports == [FIRST]
    assert outcome.table == "table row ['--big'] x"
    assert outcome.command == f"FAKE_ENV=x python {script} --big"


def test_a_failing_benchmark_is_reported_with_its_exit_status_and_error(tmp_path):
    script = _fake_script(tmp_path, """
        import sys
        print("partial table")
        sys.exit("the benchmark broke: out of memory")
    """)
    outcome = run_all.run(run_all.Benchmark("broken", script, (), (), preimport=()))
    text = run_all.render([outcome], {"cpu": "test cpu"})
    assert outcome.returncode == 1
    assert "Failed with exit status 1" in text
    assert "the benchmark broke: out of memory" in text
    assert "partial table" in text


def test_results_md_holds_command_machine_table_json_and_the_benchmarks_not_run(tmp_path):
    fake = run_all.Benchmark("fake", "fake.py", ("--small",), ("--big",), about="a fake")
    outcome = run_all.Outcome(fake, fake.command(False), 0, [FIRST, SECOND],
                              "dense            1.50")
    skipped = run_all.BENCHMARKS[0]
    text = run_all.render([outcome], {"cpu": "Test CPU 3000", "cores": 2, "tensorflow": "9.9"})
    assert "`python benchmarks/fake.py --small`" in text
    assert "Machine: cpu Test CPU 3000, cores 2, tensorflow 9.9" in text
    assert "```\ndense            1.50\n```" in text
    json_block = text.split("```json\n", 1)[1].split("\n```", 1)[0]
    assert json.loads(json_block) == [FIRST, SECOND]
    not_run = text.split("## Not run yet", 1)[1]
    assert skipped.name in not_run and skipped.command(False) in not_run


def test_cpu_model_reads_the_model_name_line_of_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: Test\nmodel name\t: Test CPU @ 3.00GHz\n")
    assert run_all.cpu_model(str(cpuinfo)) == "Test CPU @ 3.00GHz"


def test_main_writes_results_md_for_the_chosen_benchmarks_only(tmp_path, monkeypatch):
    script = _fake_script(tmp_path, f"""
        import json
        print(json.dumps({SECOND!r}, indent=2))
        print("sizes table")
    """)
    fake = run_all.Benchmark("fake", script, (), (), preimport=())
    other = run_all.Benchmark("other", "never_run.py", (), ())
    monkeypatch.setattr(run_all, "BENCHMARKS", (fake, other))
    output = tmp_path / "RESULTS.md"
    output.write_text("an older RESULTS.md\n")
    assert run_all.main(["--only=fake", f"--output={output}"]) == 0
    text = output.read_text()
    assert "an older RESULTS.md" not in text
    assert "sizes table" in text
    assert json.loads(text.split("```json\n", 1)[1].split("\n```", 1)[0]) == [SECOND]
    assert "- other: `python benchmarks/never_run.py`" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_run_of_some_benchmarks_keeps_the_latest_section_of_the_others(tmp_path, monkeypatch):
    script = _fake_script(tmp_path, """
        print("run " + __import__("sys").argv[1])
    """)
    first = run_all.Benchmark("first", script, ("one",), (), preimport=())
    second = run_all.Benchmark("second", script, ("two",), (), preimport=())
    monkeypatch.setattr(run_all, "BENCHMARKS", (first, second))
    output = tmp_path / "RESULTS.md"
    assert run_all.main([f"--output={output}"]) == 0
    both = output.read_text()
    assert "run one" in both and "run two" in both and "Not run" not in both
    second_section = both[both.index("## second"):]
    monkeypatch.setattr(run_all, "BENCHMARKS", (
        dataclasses.replace(first, quick=("again",)), second))
    assert run_all.main(["--only=first", f"--output={output}"]) == 0
    text = output.read_text()
    assert "run again" in text and "run one" not in text
    assert text.index("## first") < text.index("## second")
    assert text.endswith(second_section)  # kept as it was, machine line and all


def test_only_with_an_unknown_name_says_which_names_exist():
    with pytest.raises(SystemExit, match=r"--only names unknown benchmarks \['nope'\].*"
                                         r"mask_update"):
        run_all.select("mask_update,nope")


def test_a_benchmark_module_named_like_a_package_does_not_shadow_it_for_the_preimports(
        tmp_path):
    # A script directory holding "json.py" must not replace the json package that the
    # runner imports first; the script itself still imports its own sibling modules.
    (tmp_path / "json.py").write_text("raise RuntimeError('the benchmark json.py was imported')\n")
    (tmp_path / "sibling.py").write_text("VALUE = 'sibling found'\n")
    script = _fake_script(tmp_path, """
        import json, sys
        import sibling
        print(sibling.VALUE, json.dumps([1]), sys.argv[1:])
    """)
    outcome = run_all.run(run_all.Benchmark("shadow", script, ("--x=1",), (),
                                            preimport=("json",)))
    assert outcome.returncode == 0, outcome.stderr_tail
    assert outcome.table == "sibling found [1] ['--x=1']"

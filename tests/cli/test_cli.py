"""The CLI end to end: every command's help has an example; replay/compare/policies output; errors
are one line with a non-zero exit and no traceback."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ksmtrace.cli import cli
from ksmtrace.testing import make_trace


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    snaps = [{(0, i): ("a" if i < 4 else f"u{i}") for i in range(10)} for _ in range(6)]
    make_trace(d / "t", snaps, interval=0.05)
    return d


def all_commands(group=cli, prefix=()):
    for name, cmd in sorted(group.commands.items()):
        yield prefix + (name,), cmd
        if hasattr(cmd, "commands"):
            yield from all_commands(cmd, prefix + (name,))


@pytest.mark.parametrize("path,cmd", list(all_commands()), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_every_command_help_has_an_example(path, cmd):
    r = CliRunner().invoke(cli, list(path) + ["--help"])
    assert r.exit_code == 0, r.output
    assert "Example:" in r.output


def test_top_level_help_and_version():
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "Example:" in r.output
    r = CliRunner().invoke(cli, ["--version"])
    assert r.exit_code == 0 and "ksmtrace" in r.output


def test_python_dash_m():
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "replay" in r.stdout


def test_policies_list_and_show():
    r = CliRunner().invoke(cli, ["policies", "--json"])
    names = {p["name"] for p in json.loads(r.output)["policies"]}
    assert {"ksm", "oracle"} <= names
    r = CliRunner().invoke(cli, ["policies", "show", "ksm", "--json"])
    obj = json.loads(r.output)
    params = {p["name"]: p for p in obj["parameters"]}
    assert params["pages_to_scan"]["default"] == 100 and params["pages_to_scan"]["unit"] == "pages"
    assert "mm/ksm.c" in obj["module_doc"]


def test_replay_json_and_result_files(tiny):
    r = CliRunner().invoke(cli, ["replay", str(tiny / "t"), "-p", "pages_to_scan=5", "-o", str(tiny / "res"), "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.output)
    assert obj["summary"]["frames_saved_final"] == 3
    assert obj["spec"]["params"]["pages_to_scan"] == 5
    assert (tiny / "res" / f"{obj['run_id']}.json").exists()
    assert (tiny / "res" / f"{obj['run_id']}.parquet").exists()


def test_compare_table_csv_json(tiny):
    r = CliRunner().invoke(cli, ["compare", str(tiny / "t"), "--policies", "oracle,ksm,ksm:pages_to_scan=2", "--json"])
    rows = json.loads(r.output)["rows"]
    assert [x["policy"] for x in rows] == ["oracle", "ksm", "ksm:pages_to_scan=2"]
    assert rows[0]["pct_of_oracle"] == 100.0
    assert rows[1]["pct_of_oracle"] > rows[2]["pct_of_oracle"] > 0
    r = CliRunner().invoke(cli, ["compare", str(tiny / "t"), "--csv"])
    assert r.output.splitlines()[0].startswith("policy,")
    r = CliRunner().invoke(cli, ["compare", str(tiny / "t")])
    assert "%oracle" in r.output


@pytest.mark.parametrize("args,code,msg", [
    (["replay", "{t}", "--policy", "nope"], 1, "unknown policy 'nope'"),
    (["replay", "{t}", "-p", "bogus=1"], 2, "unknown parameter 'bogus'"),
    (["replay", "{t}", "-p", "pages_to_scan=many"], 2, "expected an integer"),
    (["replay", "{t}", "-p", "profile=9.9"], 2, "must be one of"),
    (["replay", "{t}", "-p", "noequals"], 2, "expected key=value"),
    (["replay", "{missing}"], 1, "no such trace"),
    (["replay", "{t}", "--start", "-3"], 1, "the daemon's start must be a time at or after the first snapshot"),
    (["replay", "{t}", "--start", "nan"], 1, "the daemon's start must be"),
    (["compare", "{t}", "--policies", "ksm,nope"], 1, "unknown policy"),
])
def test_errors_are_one_line(tiny, args, code, msg):
    args = [a.format(t=tiny / "t", missing=tiny / "missing") for a in args]
    r = subprocess.run([sys.executable, "-m", "ksmtrace"] + args, capture_output=True, text=True)
    assert r.returncode == code, r.stderr
    assert msg in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_sample_name_is_a_trace_argument(tmp_path, monkeypatch):
    """Every trace-reading command takes a shipped sample's name where no such path exists; a
    path of that name wins; anything else is the reader's one-line error."""
    from ksmtrace import samples

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(cli, ["info", "prefork", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["path"] == str(samples.sample_path("prefork"))
    r = CliRunner().invoke(cli, ["replay", "prefork", "--policy", "oracle", "--json", "--quiet"])
    assert r.exit_code == 0 and json.loads(r.output)["summary"]["frames_saved_final"] > 0
    (tmp_path / "prefork").mkdir()  # a local directory called like a sample is what the user meant
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "info", "prefork"], capture_output=True, text=True)
    assert r.returncode != 0 and "prefork" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "replay", "no-such-sample"], capture_output=True, text=True)
    assert r.returncode == 1 and "no such trace" in r.stderr


def test_replay_says_when_its_settings_leave_nothing_to_do(tiny):
    """A start after the last snapshot, a page-cache scope on a trace without page cache: the run
    is what was asked for (nothing merges) and the output says why."""
    r = CliRunner().invoke(cli, ["replay", str(tiny / "t"), "--start", "9999"])
    assert r.exit_code == 0 and "after the trace's last snapshot" in r.output and "it never runs" in r.output
    r = CliRunner().invoke(cli, ["replay", str(tiny / "t"), "--scope", "file"])
    assert r.exit_code == 0 and "the trace records no page cache" in r.output


def test_debug_shows_the_traceback(tiny):
    r = subprocess.run([sys.executable, "-m", "ksmtrace", "--debug", "replay", str(tiny / "missing")], capture_output=True, text=True)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_analysis_never_loads_capture_code(tiny):
    """docs/packaging.md: the offline library never imports ksmtrace_tracers (the import rules are
    in tests/unit/test_layering.py); the CLI reaches a tracer only through the entry point, so
    replaying a trace loads no capture code."""
    code = ("import sys; from ksmtrace.cli import main\n"
            "try:\n    main(['replay', sys.argv[1], '--quiet'])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in sys.modules if m.startswith('ksmtrace_tracers')))")
    out = subprocess.run([sys.executable, "-c", code, str(tiny / "t")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"

"""An ordinary user, a read-only install, nothing writable where caches usually go (issue 9,
items 4 and 6): ``ksmtrace --help`` and a replay work; an output directory the user may not write
is one line; Ctrl-C exits 130.

The unprivileged runs use ``setpriv`` to become ``nobody`` (uid 65534), with the package copied
into a read-only directory on PYTHONPATH and HOME / XDG_CACHE_HOME pointing where nobody cannot
write."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import ksmtrace
from ksmtrace import samples

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv to run as nobody")


def _chmod_tree(root: Path, dirs: int, files: int) -> None:
    for p, ds, fs in os.walk(root):
        os.chmod(p, dirs)
        for f in fs:
            os.chmod(os.path.join(p, f), files)


@pytest.fixture(scope="module")
def sandbox():
    """/tmp/ksmtrace-nobody-XXXX (0755): a read-only copy of the package, a trace nobody may read,
    a root-owned directory, and a sticky temporary directory."""
    root = Path(tempfile.mkdtemp(prefix="ksmtrace-nobody-"))
    os.chmod(root, 0o755)
    pkg = root / "ro"
    shutil.copytree(Path(ksmtrace.__file__).parent, pkg / "ksmtrace",
                    ignore=shutil.ignore_patterns("__pycache__", "_sample_traces"))
    _chmod_tree(pkg, 0o555, 0o444)
    shutil.copytree(samples.sample_path("prefork"), root / "trace")
    _chmod_tree(root / "trace", 0o755, 0o644)
    (root / "rootonly").mkdir(mode=0o755)
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    (root / "tmp-ro").mkdir(mode=0o755)
    yield root
    _chmod_tree(pkg, 0o755, 0o644)
    shutil.rmtree(root, ignore_errors=True)


def as_nobody(sandbox: Path, args: list[str], *, tmp: str = "tmp", timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KSMTRACE_", "NUMBA_", "XDG_"))}
    env.update(
        PYTHONPATH=str(sandbox / "ro"),
        HOME="/nonexistent",
        XDG_CACHE_HOME="/root/.cache",  # not writable for nobody
        TMPDIR=str(sandbox / tmp),
        KSMTRACE_LOAD_PLUGINS="none",
        KSMTRACE_PROGRESS="0",
        MPLCONFIGDIR=str(sandbox / tmp),
    )
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
           sys.executable, "-m", "ksmtrace", *args]
    return subprocess.run(cmd, env=env, cwd=str(sandbox), capture_output=True, text=True, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, needle: str) -> str:
    assert r.returncode not in (0, None), r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("ksmtrace: error: "), r.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def test_help_with_nowhere_to_cache(sandbox):
    """No writable cache directory at all (not even a temporary one): numba compiles in memory."""
    r = as_nobody(sandbox, ["--help"], tmp="tmp-ro")
    assert r.returncode == 0, r.stderr
    assert "Usage: " in r.stdout and "Traceback" not in r.stderr


def test_the_install_is_really_read_only_and_imported(sandbox):
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--", sys.executable,
                        "-c", "import ksmtrace, os; print(ksmtrace.__file__, os.access(os.path.dirname(ksmtrace.__file__), os.W_OK))"],
                       env=dict(os.environ, PYTHONPATH=str(sandbox / "ro")), capture_output=True, text=True,
                       cwd=str(sandbox))
    assert r.stdout.split() == [str(sandbox / "ro" / "ksmtrace" / "__init__.py"), "False"], r.stderr


def test_replay_as_nobody_gives_roots_numbers(sandbox):
    r = as_nobody(sandbox, ["replay", str(sandbox / "trace"), "--policy", "oracle", "--json", "-q"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    mine = subprocess.run([sys.executable, "-m", "ksmtrace", "replay", str(sandbox / "trace"), "--policy", "oracle",
                           "--json", "-q"], capture_output=True, text=True)
    a, b = json.loads(r.stdout)["summary"], json.loads(mine.stdout)["summary"]
    a.pop("cpu_seconds"), b.pop("cpu_seconds")
    assert a == b
    # the caches went to nobody's private directory in TMPDIR, not next to the package
    private = sandbox / "tmp" / f"ksmtrace-{NOBODY}"
    assert (private / "jit").is_dir() and (private / "prepared").is_dir()
    assert (private.stat().st_uid, private.stat().st_mode & 0o077) == (NOBODY, 0)


def test_replay_output_nobody_may_not_write_is_one_line(sandbox):
    r = as_nobody(sandbox, ["replay", str(sandbox / "trace"), "--policy", "oracle", "-q", "-o", str(sandbox / "rootonly")])
    one_line_error(r, f"{sandbox / 'rootonly'}: output directory is owned by uid 0, not by you (uid {NOBODY})")
    r = as_nobody(sandbox, ["replay", str(sandbox / "trace"), "--policy", "oracle", "-q", "-o", str(sandbox / "rootonly" / "sub")])
    one_line_error(r, f"{sandbox / 'rootonly' / 'sub'}: cannot be created (permission denied")
    r = as_nobody(sandbox, ["plot", str(sandbox / "trace"), "--kind", "breakdown", "-o", str(sandbox / "rootonly" / "b.png")])
    one_line_error(r, "owned by uid 0")


def test_ctrl_c_exits_130():
    """SIGINT in the middle of a replay (the reference engine takes several seconds here)."""
    env = dict(os.environ, KSMTRACE_PROGRESS="0", KSMTRACE_NO_CACHE="1")
    p = subprocess.Popen([sys.executable, "-m", "ksmtrace", "replay", str(samples.sample_path("vm")), "--policy", "ksm",
                          "--engine", "reference", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(3.0)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "ksmtrace: interrupted" and "Traceback" not in err


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_ctrl_c_while_the_program_starts_exits_130(delay):
    """SIGINT while the modules load (before any command runs): the same one line and exit 130."""
    env = dict(os.environ, KSMTRACE_PROGRESS="0", KSMTRACE_NO_CACHE="1")
    p = subprocess.Popen([sys.executable, "-m", "ksmtrace", "policies"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    if p.returncode in (0, -signal.SIGINT) and not err.strip():
        # it had already done its work (the whole table printed): a SIGINT while the interpreter
        # shuts down ends it by the signal, as Python has put back the default action by then
        full = subprocess.run([sys.executable, "-m", "ksmtrace", "policies"], capture_output=True, text=True, env=env)
        assert out == full.stdout
        return
    assert p.returncode == 130, (p.returncode, err[-2000:])
    assert err.strip().splitlines()[-1] == "ksmtrace: interrupted" and "Traceback" not in err


def test_replay_with_nowhere_to_cache(sandbox):
    """Not even a temporary directory is writable: everything compiles in memory, and works."""
    r = as_nobody(sandbox, ["replay", str(sandbox / "trace"), "--policy", "oracle", "--json", "-q"], tmp="tmp-ro")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["summary"]["frames_saved_final"] > 0

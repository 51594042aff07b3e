import os
import subprocess
import sys
import tempfile

import pytest

# Tests load only ksmtrace's own policies, never draw progress bars, plot with Agg, and keep
# prepared-trace caches in a private directory.
os.environ.setdefault("KSMTRACE_LOAD_PLUGINS", "none")
os.environ["KSMTRACE_PROGRESS"] = "0"
os.environ.setdefault("MPLBACKEND", "Agg")
_cache = tempfile.mkdtemp(prefix="ksmtrace-test-cache-")
os.environ.setdefault("KSMTRACE_CACHE_DIR", _cache)


def pytest_addoption(parser):
    parser.addoption("--cpu-neighbours", type=int, default=0, metavar="N",
                     help="run the session beside N CPU-bound processes (live tests must hold on a busy host)")


@pytest.fixture(scope="session", autouse=True)
def _cpu_neighbours(request):
    """``--cpu-neighbours N``: N CPU-bound processes for the whole session, killed at its end."""
    n = request.config.getoption("--cpu-neighbours")
    if not n:
        yield
        return
    from ksmtrace.lab.programs import cpu_neighbours

    with cpu_neighbours(n):
        yield


@pytest.fixture(scope="session")
def scenarios(tmp_path_factory):
    """Standard scenario traces, built once per session: scenarios("mixed")."""
    from ksmtrace.testing.scenarios import scenario

    base = tmp_path_factory.mktemp("scenarios")
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = scenario(name, base / name)
        return cache[name]

    return get


@pytest.fixture
def sleeper():
    """A child process that waits on stdin: a harmless capture target, killed afterwards."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield p
    p.kill()
    p.wait()
    p.stdin.close()

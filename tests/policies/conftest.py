import pytest

from ksmtrace.testing import make_trace


@pytest.fixture
def mk(tmp_path):
    """Build hand-written traces in the test's directory: mk(snaps, **kw)."""
    n = [0]

    def build(snaps, **kw):
        n[0] += 1
        return make_trace(tmp_path / f"t{n[0]}", snaps, **kw)

    return build

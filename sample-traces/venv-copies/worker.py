"""One of the three importers of the ``venv-copies`` sample: marks itself mergeable for KSM
(prctl(PR_SET_MEMORY_MERGE, 1): every VMA gets VM_MERGEABLE), imports numpy from its own copy of
the library tree (``sys.path[0]``, no site-packages), does a little work with it, says ``ready``
and waits for stdin to close."""
import ctypes
import sys

PR_SET_MEMORY_MERGE = 67
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0) != 0:
    raise OSError(ctypes.get_errno(), "prctl(PR_SET_MEMORY_MERGE)")
sys.path.insert(0, sys.argv[1])
import numpy as np  # noqa: E402  (from the copy given)

assert np.__file__.startswith(sys.argv[1]), np.__file__
a = np.arange(200_000, dtype=np.float64).reshape(400, 500)
b = (a @ a.T).sum() + np.linalg.norm(a[:50, :50]) + np.fft.rfft(a[0]).real.sum()
print("ready", flush=True)
sys.stdin.read()

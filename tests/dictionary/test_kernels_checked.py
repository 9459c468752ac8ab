"""The compiled kernels under the allocator's and numba's own checks, so that a write past a
buffer fails in the test that made it, not minutes later in a user's session.

The kernel tests run again in a child process with bounds checks compiled into the numba
kernels (``CONCEPT_DISCOVERY_CHECKED_KERNELS=1``), glibc checking its heap on every call
(``MALLOC_CHECK_=3``) and Python's debug allocator (``PYTHONMALLOC=debug``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHECKS = {
    "CONCEPT_DISCOVERY_CHECKED_KERNELS": "1",
    "MALLOC_CHECK_": "3",
    "MALLOC_PERTURB_": "165",
    "PYTHONMALLOC": "debug",
}
HERE = Path(__file__).parent


def _child(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **CHECKS},
        cwd=HERE.parents[1],
    )


def test_kernel_tests_pass_with_bounds_and_heap_checks():
    files = ["test_pursuit_cpu.py", "test_decode_cpu.py", "test_thread_teardown.py"]
    proc = _child(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", *(str(HERE / f) for f in files)],
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_checked_kernels_refuse_an_index_past_the_atoms():
    """An atom index past the dictionary (memory the kernel would read and the gradient write
    over) raises IndexError in the checked build."""
    code = textwrap.dedent(
        """
        import numpy as np
        from napari_concept_discovery.dictionary import decode_cpu, pursuit_cpu

        assert pursuit_cpu.CHECKED
        b, slots, m, d = 4, 3, 5, 8
        values = np.ones((b, slots), np.float32)
        indices = np.zeros((b, slots), np.int64)
        indices[2, 1] = m + 1000  # past the last atom
        atoms = np.ones((m, d), np.float32)
        bias, x = np.zeros(d, np.float32), np.zeros((b, d), np.float32)
        out, err = np.empty((b, d), np.float32), np.empty((b, d), np.float32)
        try:
            decode_cpu._reconstruct(values, indices, atoms, bias, x, out, err, 1.0, 0, b)
        except IndexError as exc:
            print("refused:", exc)
        else:
            raise SystemExit("an index past the atoms was read without a word")
        """
    )
    proc = _child(["-c", code], timeout=300)
    assert proc.returncode == 0 and "refused:" in proc.stdout, proc.stdout + proc.stderr[-3000:]


def test_pursuit_kernel_refuses_code_arrays_smaller_than_its_picks():
    import numpy as np

    from napari_concept_discovery.dictionary import pursuit_cpu as P

    scores = np.zeros((4, P.BLOCK), np.float32)
    gram = np.eye(P.BLOCK, dtype=np.float32)
    small = np.zeros((4, 3), np.float32)  # J x L = 8 slots needed per row
    with pytest.raises(ValueError, match="smaller than J x L"):
        P._pursuit_rows(scores, gram, 2, 4, small, np.zeros((4, 3), np.int64), 1e-6, 1e-30)
    with pytest.raises(ValueError, match="whole blocks"):
        ragged = np.zeros((4, 100), np.float32)
        P._pursuit_rows(ragged, gram, 2, 4, small, small.astype(np.int64), 1e-6, 1e-30)

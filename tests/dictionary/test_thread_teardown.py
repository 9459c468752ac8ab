"""Buffers that a worker thread keeps are freed safely when the thread ends.

The viewer encodes sites in Qt's pool threads. Python gives such a thread (one that Python did
not start) its thread state through ``PyGILState_Ensure`` and tears it down when the thread's
last ``PyGILState_Release`` runs; a ``threading.local`` (ICFL's per-thread encode workspace) is
freed during that teardown. A tensor whose memory is a Python object (``torch.frombuffer`` over
an ``mmap``, ``torch.from_numpy``) re-enters Python from its deleter at that moment and deletes
the thread state a second time: the process dies (a segmentation fault, or glibc's "invalid
size" abort later). Each case runs in a child process, so a crash fails the test instead of the
suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENCODE = """
import torch
from napari_concept_discovery.dictionary.icfl import ICFL, ICFLConfig

model = ICFL(64, ICFLConfig(n_atoms=1024), seed=0).eval()
x = torch.randn(2048, 64, generator=torch.Generator().manual_seed(0))
expected = model.encode(x)

def work(*_):
    # fills this thread's encode workspace (a 2048 x 1024 score buffer, 8 MiB)
    codes = model.encode(x)
    assert torch.equal(codes.indices, expected.indices)
    return 0
"""

NATIVE_THREADS = """
import ctypes
callback = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(work)
libc = ctypes.CDLL(None)
for _ in range(6):
    tid = ctypes.c_ulong()
    assert libc.pthread_create(ctypes.byref(tid), None, callback, None) == 0
    assert libc.pthread_join(tid, None) == 0
print("ended cleanly")
"""

QT_POOL = """
from qtpy.QtCore import QCoreApplication, QRunnable, QThreadPool
app = QCoreApplication([])
pool = QThreadPool()
pool.setExpiryTimeout(0)  # each runnable's thread ends right after it, as idle workers do
for _ in range(6):
    pool.start(QRunnable.create(work))
    pool.waitForDone()
pool.clear()
del pool
print("ended cleanly")
"""


def _run(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(ENCODE) + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


def _check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0 and "ended cleanly" in proc.stdout, (
        f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )


def test_encode_workspace_freed_when_a_native_thread_ends():
    # glibc checks its heap on every call: a corrupted heap aborts here, not minutes later
    _check(_run(NATIVE_THREADS, MALLOC_CHECK_="3"))


def test_encode_workspace_freed_when_a_qt_pool_thread_ends():
    pytest.importorskip("qtpy.QtCore")
    _check(_run(QT_POOL, MALLOC_CHECK_="3"))

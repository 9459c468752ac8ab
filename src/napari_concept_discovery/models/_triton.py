"""Import timm without loading triton next to a graphics driver's LLVM.

timm imports torchvision, which imports ``torch._dynamo``, which imports triton (torch's GPU
compiler) when it is installed. triton's ``libtriton`` carries its own LLVM and segfaults the
process when it loads after the LLVM of Mesa's OpenGL drivers (llvmpipe under Xvfb, radeonsi),
which napari's canvas has loaded by the time a dock widget is opened. Loaded in the other order
(triton first, as the ``view`` command and the CLI do), both live together.

So only where a driver's LLVM is already mapped and triton is not yet imported, triton is hidden
while our first import of timm runs, and un-hidden afterwards: torch then treats triton as
absent (it caches that answer), nothing here compiles, and ``import triton`` elsewhere in the
process is not blocked by us. Nothing changes in any other process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Shared objects of a graphics driver's LLVM (Mesa links ``libLLVM-<version>.so``).
_DRIVER_LLVM = "/libLLVM"


def driver_llvm_loaded(maps: Path = Path("/proc/self/maps")) -> bool:
    """Whether a graphics driver's LLVM is mapped into this process (Linux; False elsewhere)."""
    try:
        return _DRIVER_LLVM in maps.read_text()
    except OSError:
        return False


@contextmanager
def triton_hidden_if_unsafe() -> Iterator[bool]:
    """Hide triton from imports inside the block when loading it now would crash; yields
    whether it did. The ``sys.modules`` entry is removed again on the way out."""
    hide = "triton" not in sys.modules and driver_llvm_loaded()
    if hide:
        sys.modules["triton"] = None  # type: ignore[assignment]
    try:
        yield hide
    finally:
        if hide and "triton" in sys.modules and sys.modules["triton"] is None:
            del sys.modules["triton"]

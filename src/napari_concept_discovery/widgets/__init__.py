"""napari dock widgets: thin fronts over the Qt-free library (see docs/architecture.md).

Every widget of a viewer shares one session (:func:`get_session`); widgets hold no science.
"""

import sys

# triton (torch's GPU compiler, imported by timm -> torchvision -> torch._dynamo) segfaults when
# its LLVM loads after Mesa's, which napari's OpenGL canvas has loaded by the time a dock widget
# is opened (Mesa drivers, Xvfb): napari would crash. Nothing here compiles, so unless something
# imported it already, a viewer's process goes without it (``import triton`` then fails cleanly
# and torch runs eagerly).
if "triton" not in sys.modules:
    sys.modules["triton"] = None  # type: ignore[assignment]

from ._open import OpenedViewer, open_viewer
from ._viewer import get_session
from .dictionary_widget import DictionaryWidget
from .embed_widget import EmbedWidget
from .explorer_widget import ConceptExplorer
from .plate_navigator import PlateNavigator

__all__ = [
    "ConceptExplorer",
    "DictionaryWidget",
    "EmbedWidget",
    "OpenedViewer",
    "PlateNavigator",
    "get_session",
    "open_viewer",
]

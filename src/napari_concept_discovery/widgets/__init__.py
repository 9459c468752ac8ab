"""napari dock widgets: thin fronts over the Qt-free library (see docs/architecture.md).

Every widget of a viewer shares one session (:func:`get_session`); widgets hold no science.
"""

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

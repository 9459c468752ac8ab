"""napari dock widgets: thin fronts over the Qt-free library (see docs/architecture.md).

Every widget of a viewer shares one session (:func:`get_session`); widgets hold no science.
"""

from ._viewer import get_session
from .plate_navigator import PlateNavigator

__all__ = ["PlateNavigator", "get_session"]

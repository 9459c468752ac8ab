"""Discover biological concepts in microscopy foundation models, inside napari.

Everything importable from this package except ``widgets`` is Qt-free and usable headless.
"""

__version__ = "0.1.0"

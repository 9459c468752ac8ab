"""Errors a user can act on.

Every message names the file, well or parameter at fault. The CLI prints these without a
traceback; anything else is a bug and keeps its traceback.
"""


class ConceptDiscoveryError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class PlateError(ConceptDiscoveryError, ValueError):
    """A plate folder, image file or metadata table cannot be used as given."""


class ModelError(ConceptDiscoveryError, ValueError):
    """A model or checkpoint cannot be loaded or cannot take the given input."""


class StoreError(ConceptDiscoveryError, ValueError):
    """An activation store is missing, unreadable or does not match its data."""


class DictionaryError(ConceptDiscoveryError, ValueError):
    """A dictionary cannot be trained, loaded or applied as asked."""


class OutputError(ConceptDiscoveryError, ValueError):
    """An output path cannot be written as asked, or would replace something it must not."""


class DataWarning(UserWarning):
    """A problem in the user's data that was worked around and is said (rows left out, labels
    out of date); the CLI prints it as one ``warning:`` line."""

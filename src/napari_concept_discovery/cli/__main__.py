"""``python -m napari_concept_discovery.cli``: the command line, as ``concept-discovery``."""

import sys

from . import main

sys.exit(main())

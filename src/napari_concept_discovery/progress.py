"""One progress and cancel convention for every long step (embed, train, encode).

Long work takes ``progress`` (a callable given one :class:`Progress`) and ``cancel`` (a
``threading.Event``, a callable returning True to stop, or None). A step checks ``cancel``
between units of work (a batch, a site, a training step), so whatever it has finished stays
whole: a cancelled embedding keeps the finished sites for a resume, a cancelled training keeps
the dictionary after its last complete step. The CLI turns ``Progress`` into a terminal bar; the
widgets turn it into a progress bar and live plots.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Union


class Progress(NamedTuple):
    """``done`` of ``total`` units of ``stage`` finished; ``info`` holds step-specific numbers.

    ``info`` examples: ``{"site": "P1/B02/1"}`` while embedding; ``{"loss": .., "fvu": ..,
    "dead_fraction": .., "samples": ..}`` while training.
    """

    stage: str
    done: int
    total: int
    info: dict[str, Any] = {}

    @property
    def fraction(self) -> float:
        return 0.0 if self.total <= 0 else min(1.0, self.done / self.total)


class Cancelled(Exception):
    """Raised by a step that returns one result (an encoding) when its ``cancel`` was set.

    Steps whose partial result is useful return it instead: a cancelled training returns the
    dictionary after its last complete step, a cancelled embedding keeps the finished sites.
    """


Cancel = Union[threading.Event, Callable[[], bool], None]  # noqa: UP007
ProgressCallback = Union[Callable[[Progress], None], None]  # noqa: UP007


def is_cancelled(cancel: Cancel) -> bool:
    """True when the caller asked to stop."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def report(progress: ProgressCallback, stage: str, done: int, total: int, **info) -> None:
    """Call ``progress`` if there is one."""
    if progress is not None:
        progress(Progress(stage, int(done), int(total), info))

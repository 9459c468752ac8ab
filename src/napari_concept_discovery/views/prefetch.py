"""Neighbouring sites prepared while the user looks at one, so the next click does not wait.

A user flipping through a plate goes to the next site of the same well, or on to the next
well. :func:`neighbour_sites` names those sites in that order; :func:`prefetch_sites` reads
their pixels and encodes their codes (into the explorer's own bounded cache) off the GUI
thread. Qt-free: the viewer runs it in one worker per site shown and cancels it when the user
moves somewhere it did not prepare. Nothing here keeps tensors: pixels are numpy arrays,
codes scipy matrices, and the explorer's cache holds at most ``max_sites`` sites.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import ConceptDiscoveryError
from ..plate import SiteKey
from ..progress import Cancel, Cancelled, is_cancelled


def neighbour_sites(keys: Sequence, key, n: int = 2) -> list[SiteKey]:
    """Up to ``n`` sites a user most likely opens after ``key``, in plate order ``keys``.

    First the next site of the same well, then the first site of the next well (of the same
    plate, else the next plate), then the previous site of the same well: the order of a user
    stepping forward through a well and on to the next.
    """
    keys = [SiteKey.of(k) for k in keys]
    key = SiteKey.of(key)
    if key not in keys or n <= 0:
        return []
    i = keys.index(key)
    same = [k for k in keys if (k.plate, k.well) == (key.plate, key.well)]
    j = same.index(key)
    out: list[SiteKey] = []
    if j + 1 < len(same):
        out.append(same[j + 1])
    after = next((k for k in keys[i + 1 :] if (k.plate, k.well) != (key.plate, key.well)), None)
    if after is not None:
        out.append(after)
    if j > 0:
        out.append(same[j - 1])
    return out[:n]


def prefetch_sites(
    read: Callable[[SiteKey], Any] | None,
    read_keys: Sequence[SiteKey],
    explorer: Any,
    code_keys: Sequence[SiteKey],
    cancel: Cancel = None,
    labels: Callable[[SiteKey], Any] | None = None,
) -> list[tuple[SiteKey, Any]]:
    """Pixels of ``read_keys`` (``read(key)`` each) and codes of ``code_keys`` (cached by
    ``explorer.site``, then ``labels(key)``: the cell labels the painter decodes, cached by
    it), site by site; stops between sites once ``cancel`` is set.

    Returns what ``read`` gave, as (key, data) pairs, for the caller to cache. A site that
    cannot be read or encoded is skipped: the user's own visit reports its error.
    """
    done: list[tuple[SiteKey, Any]] = []
    order = list(dict.fromkeys([*read_keys, *code_keys]))
    for key in order:
        if is_cancelled(cancel):
            break
        try:
            if read is not None and key in read_keys:
                done.append((key, read(key)))
            if explorer is not None and key in code_keys:
                if explorer.cached(key) is None:
                    explorer.site(key, cancel=cancel)
                if labels is not None:
                    labels(key)
        except Cancelled:
            break
        except (ConceptDiscoveryError, OSError, KeyError, ValueError):
            continue
    return done

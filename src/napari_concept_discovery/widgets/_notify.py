"""How errors reach the user: one line that says what failed and what to do."""

from __future__ import annotations

from ..errors import ConceptDiscoveryError


def user_message(exc: BaseException, doing: str) -> str:
    """Our own errors already say what to do; anything else gets its type and what we did."""
    if isinstance(exc, ConceptDiscoveryError | KeyError):
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return f"{doing}: {text}"
    return f"{doing}: {type(exc).__name__}: {exc}"

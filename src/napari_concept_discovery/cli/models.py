"""``models``: the model sources available offline."""

from __future__ import annotations

from .common import command
from .output import (
    Console,
)


def add_models(sub) -> None:
    p = command(
        sub,
        "models",
        "list the models embed --model can use and whether each loads offline",
        ["concept-discovery models", "concept-discovery models --json"],
        description=(
            "List the bundled model, OpenPhenom and the ViTs in the local Hugging Face cache, "
            "with the source string to pass as --model, then every accepted source form. "
            "Never uses the network."
        ),
    )
    p.set_defaults(func=run_models)


def run_models(args, con: Console) -> int:
    from ..models import list_models, source_forms_text

    infos = list_models()
    width = max(len(i.source) for i in infos)
    con.say(f"{'SOURCE':<{width}}  OFFLINE  DESCRIPTION")
    for i in infos:
        con.say(
            f"{i.source:<{width}}  {'yes' if i.available else 'no':<7}  {i.name}: {i.description}"
        )
    con.say("\nAccepted --model forms:\n" + source_forms_text())
    con.result(
        models=[
            {
                "source": i.source,
                "name": i.name,
                "offline": bool(i.available),
                "description": i.description,
            }
            for i in infos
        ]
    )
    return 0

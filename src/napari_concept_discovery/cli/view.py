"""``view``: napari with a plate, a store and a dictionary already open."""

from __future__ import annotations

from .common import UsageError, command
from .output import (
    Console,
)


def add_view(sub) -> None:
    p = command(
        sub,
        "view",
        "open napari with a plate, its activation store and dictionary, and the widgets",
        [
            "concept-discovery view demo-out/",
            "concept-discovery view plates/ --store store.zarr --dictionary dict.safetensors",
        ],
        description=(
            "Open the plate's first site in napari with the plate navigator, concept explorer, "
            "embed and dictionary widgets docked. On the output folder of `concept-discovery "
            "demo` the plates, store and dictionary are found by themselves; for a plate folder, "
            "a single store beside it (as the Embed widget names them) is used."
        ),
    )
    p.add_argument(
        "plate", nargs="?", default=".", help="plate folder or demo output folder (default: .)"
    )
    p.add_argument("--store", help="activation store folder (.zarr)")
    p.add_argument("--dictionary", help="dictionary file (.safetensors), applied to the store")
    p.set_defaults(func=run_view)


def run_view(args, con: Console) -> int:
    from ..views.workspace import find_view_inputs

    inputs = find_view_inputs(args.plate, args.store, args.dictionary)
    if inputs.dictionary is not None and inputs.store is None:
        raise UsageError("--dictionary needs an activation store (--store) to apply it to")
    import napari

    from ..widgets import open_viewer
    from ..widgets._drive import scripted_user

    opened = open_viewer(inputs.plate, inputs.store, inputs.dictionary)
    user = scripted_user(opened)  # tests only: a scripted user acting in the real process
    con.note(
        f"plate {inputs.plate}"
        + (f", store {inputs.store}" if inputs.store else ", no store yet (Embed widget)")
        + (f", dictionary {inputs.dictionary}" if inputs.dictionary else "")
    )
    con.result(plate=inputs.plate, store=inputs.store, dictionary=inputs.dictionary)
    napari.run()
    return 0 if user is None else user.exit_code or 0

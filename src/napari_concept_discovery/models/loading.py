"""From weights on disk to a backend: readers, checks, and the builders of each model family.

Which string means which files is ``registry``'s business; this module takes files and folders.
Weights files are opened by their real format, found from their first bytes, never from the file
name: OpenPhenom's hub repository names a torch zip pickle ``model.safetensors``. Pickles are read
with ``torch.load(weights_only=True)`` so a weights file can never execute code.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from .._files import hash_file
from ..errors import ModelError
from .backend import Backend, ChannelAgnosticBackend, hash_state_dict
from .vit import ChannelAgnosticViT

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
OPENPHENOM_REPO = "recursionpharma/OpenPhenom"
#: OpenPhenom's encoder keys; its MAE decoder keys (not needed for inference) are ignored.
OPENPHENOM_PREFIX = "encoder.vit_backbone."
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'pickle' or 'unknown', from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n < os.path.getsize(path):
            return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from safetensors or a torch checkpoint (zip or legacy pickle).

    A checkpoint dict holding ``state_dict`` (Lightning, OpenPhenom) or ``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise ModelError(f"{path}: unreadable safetensors file: {exc}") from exc
    if fmt in ("torch-zip", "pickle"):
        try:
            # A file object, not the name: torch may pick a reader by the ".safetensors" suffix.
            # Checkpoints written with pickle protocol > 2 load fine; torch's note saying so is
            # for its own developers, so it is silenced here and only here.
            with open(path, "rb") as f, warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(
                f"{path}: cannot load as a torch checkpoint with weights_only=True "
                f"(weights that need code to load are refused): {_refusal_reason(str(exc))}"
            ) from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelError(f"{path}: checkpoint holds no flat dict of tensors")
        return obj
    raise ModelError(f"{path}: not a safetensors file or torch checkpoint (first bytes {fmt})")


def _refusal_reason(detail: str) -> str:
    """Why torch's weights-only unpickler refused a file, without torch's advice on loading
    it anyway (``weights_only=False``, allow-listing the global): that would run its code."""
    if m := re.search(r"GLOBAL (\S+) was not an allowed global", detail):
        return (
            f"it names the global {m.group(1)}, which loading would import and call; a file "
            "of plain tensors names none"
        )
    if m := re.search(r"WeightsUnpickler error:\s*(.+)", detail):
        detail = m.group(1)
    sentences = re.split(r"(?<=[.!?])\s+", detail.strip().splitlines()[0] if detail else "")
    advice = ("weights_only", "safe_globals", "trust", "re-running", "rerun")
    kept = [x for x in sentences if not any(a in x.lower() for a in advice)]
    return " ".join(kept).strip() or "it holds objects other than tensors"


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise ModelError naming every missing, unexpected and misshapen key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("misshapen keys: " + "; ".join(shapes))
    if problems:
        raise ModelError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def infer_ca_architecture(state: dict[str, torch.Tensor], img_size: int = 256) -> dict:
    """ChannelAgnosticViT keyword arguments read off a state dict's shapes.

    Width from ``cls_token``, depth from the highest ``blocks.N``, heads from the qk-norm width
    (= head dim), MLP ratio from ``mlp_bias``, channel slots from the ``pos_embed`` length.
    """
    need = [
        "cls_token",
        "patch_embed.proj.weight",
        "pos_embed",
        "blocks.0.q_norm.weight",
        "blocks.0.mlp_bias",
    ]
    absent = [k for k in need if k not in state]
    if absent:
        raise ModelError(
            "cannot read the architecture: missing keys "
            + ", ".join(absent)
            + " (expected a channel-agnostic ViT with ParallelScalingBlock blocks)"
        )
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    head_dim = int(state["blocks.0.q_norm.weight"].shape[0])
    grid = img_size // patch
    length = int(state["pos_embed"].shape[1]) - 1
    if length % (grid * grid) or length <= 0:
        raise ModelError(
            f"pos_embed has {length + 1} rows, not 1 + k * {grid * grid} for {img_size} px tiles "
            f"of {patch} px patches"
        )
    return {
        "embed_dim": dim,
        "depth": depth,
        "num_heads": max(1, dim // head_dim),
        "max_channels": length // (grid * grid),
        "img_size": img_size,
        "patch_size": patch,
        "mlp_ratio": int(state["blocks.0.mlp_bias"].shape[0]) / dim,
    }


def intermediate_block(num_blocks: int) -> int:
    """Default block of a channel-agnostic ViT whose card names none: two thirds of the depth.

    An intermediate block, as in the paper's dictionary learning (block 7 of 0..11 for
    OpenPhenom's ViT-S/16); the last blocks of a masked autoencoder specialise in reconstruction.
    """
    return max(0, round(num_blocks * 2 / 3) - 1)


def build_channel_agnostic(
    state: dict[str, torch.Tensor],
    arch: dict,
    *,
    weights: Path,
    what: str,
    model_id: str,
    default_block: int | None = None,
    card: dict | None = None,
) -> ChannelAgnosticBackend:
    """The one way weights become a channel-agnostic backend: build, check every key, load, wrap.

    ``what`` names the weights in error messages. The default block is ``default_block``, else
    the card's, else ``intermediate_block``.
    """
    card = dict(card or {})
    card.setdefault("architecture", {"class": "ChannelAgnosticViT", **arch})
    try:
        model = ChannelAgnosticViT(**arch)
    except (TypeError, ValueError, ZeroDivisionError, RuntimeError) as exc:
        raise ModelError(
            f"{what}: the architecture {arch} does not make a ChannelAgnosticViT: {exc}"
        ) from exc
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True)
    if default_block is None:
        default_block = card.get("default_block")
    if default_block is None:
        default_block = intermediate_block(model.num_blocks)
    return ChannelAgnosticBackend(
        model,
        model_id=model_id,
        weights_hash=hash_file(weights),
        default_block=default_block,
        source=str(Path(weights).resolve()),
        card=card,
    )


def _find_key(obj, name: str):
    """First value of ``name`` anywhere in a nested JSON config, else None."""
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
        for v in obj.values():
            found = _find_key(v, name)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find_key(v, name)
            if found is not None:
                return found
    return None


def read_config(folder: Path) -> dict:
    """A folder's ``config.json`` ({} when absent), with a clear message when it is not JSON."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weights_in(folder: Path) -> Path:
    """The weights file of a model folder, by the names hub repositories use."""
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise ModelError(f"{folder}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def load_openphenom(
    source: str | Path, *, model_id: str | None = None, default_block: int | None = None
) -> ChannelAgnosticBackend:
    """OpenPhenom-format weights (folder with config.json + weights, or the weights file).

    Encoder keys ``encoder.vit_backbone.*`` are loaded into a ``ChannelAgnosticViT`` whose shape is
    read from the weights; decoder keys are ignored; any other missing, extra or misshapen
    encoder key is an error that names it.
    """
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    weights = weights_in(source) if source.is_dir() else source
    config = read_config(folder)
    state = read_state_dict(weights)
    enc = {
        k[len(OPENPHENOM_PREFIX) :]: v for k, v in state.items() if k.startswith(OPENPHENOM_PREFIX)
    }
    if not enc:
        sample = ", ".join(sorted(state)[:5])
        raise ModelError(
            f"{weights}: no keys under {OPENPHENOM_PREFIX!r} (found e.g. {sample}); "
            "not an OpenPhenom-format checkpoint"
        )
    img_size = int(_find_key(config, "img_size") or 256)
    return build_channel_agnostic(
        enc,
        infer_ca_architecture(enc, img_size=img_size),
        weights=weights,
        what=f"{weights} (keys under {OPENPHENOM_PREFIX!r})",
        model_id=model_id or f"openphenom-format:{folder.name}",
        default_block=default_block,
        card={"config": config},
    )


def check_architecture(arch: dict, where) -> None:
    """Refuse, naming ``where`` and the field, an architecture whose fields ChannelAgnosticViT
    does not take or whose values are not numbers of the right kind (a string "384" would
    fail deep inside timm with an unrelated message)."""
    import inspect

    params = inspect.signature(ChannelAgnosticViT.__init__).parameters
    for key, value in arch.items():
        if key not in params or key == "self":
            known = ", ".join(k for k in params if k != "self")
            raise ModelError(f"{where}: architecture field {key!r} is not one of {known}")
        default = params[key].default
        want = float if isinstance(default, float) else int
        ok = isinstance(value, int | float) if want is float else isinstance(value, int)
        if not ok or isinstance(value, bool) or value <= 0 and key != "drop_path_rate":
            kind = "a number" if want is float else "a positive whole number"
            raise ModelError(f"{where}: architecture field {key!r} must be {kind}, got {value!r}")


def load_card_model(
    weights: Path, card_path: Path, *, model_id: str | None = None, default_block: int | None = None
) -> ChannelAgnosticBackend:
    """A ChannelAgnosticViT saved by this project: safetensors weights + JSON card."""
    try:
        card = json.loads(Path(card_path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{card_path}: not valid JSON: {exc}") from exc
    if not isinstance(card, dict) or not isinstance(card.get("architecture", {}), dict):
        raise ModelError(
            f"{card_path}: a model card is a JSON object with an 'architecture' object"
        )
    arch = dict(card.get("architecture", {}))
    if arch.pop("class", "ChannelAgnosticViT") != "ChannelAgnosticViT":
        raise ModelError(f"{card_path}: not a ChannelAgnosticViT card")
    check_architecture(arch, card_path)
    return build_channel_agnostic(
        read_state_dict(weights),
        arch,
        weights=Path(weights),
        what=str(weights),
        model_id=model_id or card.get("name") or Path(weights).stem,
        default_block=default_block,
        card=card,
    )


def load_default(default_block: int | None = None) -> ChannelAgnosticBackend:
    """The bundled default model (weights shipped in the package; no network)."""
    weights = WEIGHTS_DIR / "default.safetensors"
    card_path = WEIGHTS_DIR / "default.json"
    if not weights.is_file() or not card_path.is_file():
        raise ModelError(
            f"the bundled default model is missing ({weights}); "
            "build it with `python scripts/train_default_model.py`"
        )
    backend = load_card_model(weights, card_path, model_id="default", default_block=default_block)
    backend.source = "default"
    return backend


def load_timm_checkpoint(
    weights: str | Path | None,
    arch: str,
    *,
    channel_rule: str = "per-channel",
    model_args: dict | None = None,
    pretrained_cfg: dict | None = None,
    model_id: str | None = None,
    default_block: int | None = None,
    seed: int = 0,
) -> Backend:
    """Any timm ViT: ``arch`` is a timm model name, ``weights`` its state dict (or None).

    ``None`` weights builds the architecture with random weights drawn with ``seed`` (benchmarks,
    tests), so the same call gives the same weights; the global torch RNG is left as it was.
    """
    import timm

    from .timm_vit import TimmViTBackend

    random_id = f"timm:{arch}:random" + (f"?seed={seed}" if seed else "")
    kwargs = dict(model_args or {})
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("dynamic_img_size", True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelError(f"timm cannot build {arch!r}: {exc}") from exc
    if weights is not None:
        state = read_state_dict(weights)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        check_state_dict(model, state, f"{weights} for timm {arch!r}")
        model.load_state_dict(state, strict=True)
        whash = hash_file(weights)
    else:
        whash = hash_state_dict(model.state_dict())
    cfg = pretrained_cfg or getattr(model, "pretrained_cfg", {}) or {}
    return TimmViTBackend(
        model,
        model_id=model_id or (f"timm:{arch}:{Path(weights).name}" if weights else random_id),
        weights_hash=whash,
        channel_rule=channel_rule,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        default_block=default_block,
        source=str(Path(weights).resolve()) if weights else random_id,
        card={"architecture": {"class": "timm", "name": arch, **kwargs}},
    )


def load_folder(
    folder: Path,
    *,
    channel_rule: str = "per-channel",
    arch: str | None = None,
    default_block: int | None = None,
    model_id: str | None = None,
) -> Backend:
    """A model folder: timm hub layout (config.json naming an ``architecture``), a project card
    beside its safetensors weights, or OpenPhenom layout (config.json + weights)."""
    folder = Path(folder)
    config = read_config(folder)
    if arch or "architecture" in config:
        # timm's hub layout: config.json {"architecture", "model_args", "pretrained_cfg"}.
        return load_timm_checkpoint(
            weights_in(folder),
            arch or config["architecture"],
            channel_rule=channel_rule,
            model_args=config.get("model_args"),
            pretrained_cfg=config.get("pretrained_cfg"),
            model_id=model_id,
            default_block=default_block,
        )
    for card in sorted(folder.glob("*.json")):
        w = card.with_suffix(".safetensors")
        if card.name != "config.json" and w.is_file():
            return load_card_model(w, card, model_id=model_id, default_block=default_block)
    return load_openphenom(folder, model_id=model_id, default_block=default_block)


def load_file(
    path: Path,
    *,
    channel_rule: str = "per-channel",
    arch: str | None = None,
    default_block: int | None = None,
) -> Backend:
    """A weights file: any timm ViT when ``arch`` is given, else a project card beside it,
    OpenPhenom keys, or a bare channel-agnostic ViT state dict."""
    path = Path(path)
    if arch:
        return load_timm_checkpoint(
            path, arch, channel_rule=channel_rule, default_block=default_block
        )
    card = path.with_suffix(".json")
    if card.is_file():
        return load_card_model(path, card, default_block=default_block)
    state = read_state_dict(path)
    if any(k.startswith(OPENPHENOM_PREFIX) for k in state):
        return load_openphenom(path, default_block=default_block)
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 4 and w.shape[1] == 1 and "pos_embed" in state:
        return build_channel_agnostic(
            state,
            infer_ca_architecture(state),
            weights=path,
            what=str(path),
            model_id=f"ca-vit:{path.name}",
            default_block=default_block,
        )
    raise ModelError(
        f"{path}: cannot tell the architecture from the file alone; pass arch='<timm model "
        "name>' (CLI: --arch) for a timm checkpoint"
    )

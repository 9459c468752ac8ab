"""``load_model``: one entry point from a name, hub id, folder or file to a backend.

Weights files are opened by their real format, found from their first bytes, never from the file
name: OpenPhenom's hub repository names a torch zip pickle ``model.safetensors``. Pickles are read
with ``torch.load(weights_only=True)`` so a weights file can never execute code.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..errors import ModelError
from .backend import Backend, ChannelAgnosticBackend, hash_file, pick_device
from .vit import ChannelAgnosticViT

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
OPENPHENOM_REPO = "recursionpharma/OpenPhenom"
OPENPHENOM_PREFIX = "encoder.vit_backbone."
#: OpenPhenom's MAE parts that inference does not need.
DECODER_PREFIXES = ("decoder", "encoder_decoder_proj", "decoder_pred", "mask_token")
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
            with open(path, "rb") as f:
                obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(
                f"{path}: cannot load as a torch checkpoint with weights_only=True "
                f"(weights that need code to load are refused): {exc}"
            ) from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelError(f"{path}: checkpoint holds no flat dict of tensors")
        return obj
    raise ModelError(f"{path}: not a safetensors file or torch checkpoint (first bytes {fmt})")


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


def _weights_in(folder: Path) -> Path:
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
    weights = _weights_in(source) if source.is_dir() else source
    config = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise ModelError(f"{folder / 'config.json'}: not valid JSON: {exc}") from exc
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
    arch = infer_ca_architecture(enc, img_size=img_size)
    model = ChannelAgnosticViT(**arch)
    check_state_dict(model, enc, f"{weights} (keys under {OPENPHENOM_PREFIX!r})")
    model.load_state_dict(enc, strict=True)
    n = arch["depth"]
    if default_block is None:
        # An intermediate block, as in the paper's dictionary learning (7 of 0..11 for ViT-S/16).
        default_block = max(0, round(n * 2 / 3) - 1)
    return ChannelAgnosticBackend(
        model,
        model_id=model_id or f"openphenom-format:{folder.name}",
        weights_hash=hash_file(weights),
        default_block=default_block,
        source=str(weights),
        card={"architecture": {"class": "ChannelAgnosticViT", **arch}, "config": config},
    )


def load_openphenom_hub(repo_id: str = OPENPHENOM_REPO, revision: str | None = None):
    """Download (or reuse the cache of) a hub repository in OpenPhenom format."""
    folder = hub_snapshot(repo_id, revision)
    return load_openphenom(folder, model_id=repo_id)


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """Local folder of a Hugging Face repository, with a clear message when offline."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ModelError("huggingface_hub is needed to fetch models from the hub") from exc
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=["*.json", "*.safetensors", "*.bin", "*.pth", "*.pt"],
            )
        )
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the hub could not be reached and it is not in the local cache"
        )
        kind = type(exc).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError"):
            why = f"the hub refused it ({kind})"
        raise ModelError(
            f"cannot get {repo_id!r} from the Hugging Face hub: {why}. On a machine with network, "
            f"run `hf download {repo_id} --local-dir DIR`, copy DIR here and pass "
            f"DIR as the model (or run once online to fill the cache). Detail: {kind}: {exc}"
        ) from exc


def load_default(default_block: int | None = None) -> ChannelAgnosticBackend:
    """The bundled default model (weights shipped in the package; no network)."""
    weights = WEIGHTS_DIR / "default.safetensors"
    card_path = WEIGHTS_DIR / "default.json"
    if not weights.is_file() or not card_path.is_file():
        raise ModelError(
            f"the bundled default model is missing ({weights}); "
            "build it with `python scripts/train_default_model.py`"
        )
    return load_card_model(weights, card_path, model_id="default", default_block=default_block)


def load_card_model(
    weights: Path, card_path: Path, *, model_id: str | None = None, default_block: int | None = None
) -> ChannelAgnosticBackend:
    """A ChannelAgnosticViT saved by this project: safetensors weights + JSON card."""
    card = json.loads(Path(card_path).read_text())
    arch = dict(card.get("architecture", {}))
    if arch.pop("class", "ChannelAgnosticViT") != "ChannelAgnosticViT":
        raise ModelError(f"{card_path}: not a ChannelAgnosticViT card")
    state = read_state_dict(weights)
    model = ChannelAgnosticViT(**arch)
    check_state_dict(model, state, str(weights))
    model.load_state_dict(state, strict=True)
    if default_block is None:
        default_block = card.get("default_block")
    return ChannelAgnosticBackend(
        model,
        model_id=model_id or card.get("name") or Path(weights).stem,
        weights_hash=hash_file(weights),
        default_block=default_block,
        source=str(weights),
        card=card,
    )


def load_timm_checkpoint(
    weights: str | Path | None,
    arch: str,
    *,
    channel_rule: str = "per-channel",
    model_args: dict | None = None,
    pretrained_cfg: dict | None = None,
    model_id: str | None = None,
    default_block: int | None = None,
) -> Backend:
    """Any timm ViT: ``arch`` is a timm model name, ``weights`` its state dict (or None).

    ``None`` weights builds the architecture with random weights (benchmarks, tests).
    """
    import timm

    from .backend import hash_state_dict
    from .timm_vit import TimmViTBackend

    kwargs = dict(model_args or {})
    kwargs.setdefault("num_classes", 0)
    kwargs.setdefault("dynamic_img_size", True)
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as exc:
        raise ModelError(f"timm cannot build {arch!r}: {exc}") from exc
    if weights is not None:
        state = read_state_dict(weights)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        check_state_dict(model, state, f"{weights} for timm {arch!r}")
        model.load_state_dict(state, strict=True)
        whash = hash_file(Path(weights))
    else:
        whash = hash_state_dict(model.state_dict())
    cfg = pretrained_cfg or getattr(model, "pretrained_cfg", {}) or {}
    return TimmViTBackend(
        model,
        model_id=model_id
        or (f"timm:{arch}" + (f":{Path(weights).name}" if weights else ":random")),
        weights_hash=whash,
        channel_rule=channel_rule,
        mean=cfg.get("mean"),
        std=cfg.get("std"),
        default_block=default_block,
        source=str(weights) if weights else f"timm:{arch} (random weights)",
        card={"architecture": {"class": "timm", "name": arch, **kwargs}},
    )


def _load_folder(
    folder: Path,
    *,
    channel_rule: str,
    arch: str | None,
    default_block: int | None,
    model_id: str | None = None,
) -> Backend:
    config = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    timm_arch = arch or config.get("architecture")
    if timm_arch and (folder / "config.json").is_file() and "architecture" in config:
        # timm's hub layout: config.json {"architecture", "model_args", "pretrained_cfg"}.
        return load_timm_checkpoint(
            _weights_in(folder),
            timm_arch,
            channel_rule=channel_rule,
            model_args=config.get("model_args"),
            pretrained_cfg=config.get("pretrained_cfg"),
            model_id=model_id,
            default_block=default_block,
        )
    cards = [p for p in folder.glob("*.json") if p.name != "config.json"]
    for card in cards:
        w = card.with_suffix(".safetensors")
        if w.is_file():
            return load_card_model(w, card, model_id=model_id, default_block=default_block)
    return load_openphenom(folder, model_id=model_id, default_block=default_block)


def _load_file(
    path: Path, *, channel_rule: str, arch: str | None, default_block: int | None
) -> Backend:
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
        archd = infer_ca_architecture(state)
        model = ChannelAgnosticViT(**archd)
        check_state_dict(model, state, str(path))
        model.load_state_dict(state, strict=True)
        return ChannelAgnosticBackend(
            model,
            model_id=f"ca-vit:{path.name}",
            weights_hash=hash_file(path),
            default_block=default_block,
            source=str(path),
            card={"architecture": {"class": "ChannelAgnosticViT", **archd}},
        )
    raise ModelError(
        f"{path}: cannot tell the architecture from the file alone; pass arch='<timm model "
        "name>' (CLI: --arch) for a timm checkpoint"
    )


def load_model(
    name: str | Path = "default",
    device: str | torch.device | None = None,
    *,
    arch: str | None = None,
    channel_rule: str = "per-channel",
    default_block: int | None = None,
) -> Backend:
    """A backend from a name, hub id, folder or weights file, moved to ``device``.

    - ``"default"``: the bundled model (offline).
    - ``"openphenom"`` or ``"recursionpharma/OpenPhenom"``: from the hub cache or the network.
    - a folder: timm hub layout (config.json with ``architecture``), a project card + weights, or
      OpenPhenom layout (config.json + ``model.safetensors`` of any real format).
    - a weights file: a project card beside it, OpenPhenom keys, a channel-agnostic ViT state
      dict, or any timm ViT with ``arch`` given (channels mapped by ``channel_rule``).
    - another ``owner/name`` that is not a local path: fetched from the hub, then as a folder.
    """
    text = str(name)
    path = Path(text).expanduser()
    if text == "default":
        backend = load_default(default_block)
    elif text.lower() in ("openphenom", OPENPHENOM_REPO.lower()):
        backend = load_openphenom(
            hub_snapshot(OPENPHENOM_REPO), model_id=OPENPHENOM_REPO, default_block=default_block
        )
    elif path.is_dir():
        backend = _load_folder(
            path, channel_rule=channel_rule, arch=arch, default_block=default_block
        )
    elif path.is_file():
        backend = _load_file(
            path, channel_rule=channel_rule, arch=arch, default_block=default_block
        )
    elif text.startswith("timm:"):
        backend = load_timm_checkpoint(
            None, text[5:], channel_rule=channel_rule, default_block=default_block
        )
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        backend = _load_folder(
            hub_snapshot(text),
            channel_rule=channel_rule,
            arch=arch,
            default_block=default_block,
            model_id=text,
        )
    else:
        raise ModelError(
            f"unknown model {text!r}: use 'default', 'openphenom', a hub id, a folder or a "
            "weights file"
        )
    return backend.to(pick_device(device))

"""Model sources: which string means which weights, ``load_model`` and ``list_models``.

A source says where a model comes from; nothing is guessed from what happens to be on disk
(docs/architecture.md, "Models"):

- ``default``: the small model bundled with the package (offline);
- ``hf-hub:<owner>/<name>[@<revision>]``: a Hugging Face repository in OpenPhenom, timm or
  project-card layout, from the local cache, else downloaded unless ``HF_HUB_OFFLINE`` is set;
  ``openphenom`` is ``hf-hub:recursionpharma/OpenPhenom``;
- ``timm:<name>``: timm's pretrained weights of ``<name>`` (``arch`` or ``arch.tag``), read from the
  local hub cache only; ``timm:<name>:random`` builds the architecture with random weights drawn
  with seed 0 (``?seed=N`` for another);
- a folder or a weights file.

Options follow a ``?``: ``arch=<timm name>`` (a bare timm checkpoint), ``channel_rule=mean`` (how
a plate's channels feed a fixed-channel timm model), ``seed=N``. A bare ``owner/name`` that is not
a local path is read as ``hf-hub:owner/name``. ``Backend.source`` is the canonical source of
what was loaded: the hub revision pinned, paths absolute, options that change the tokens kept,
so ``load_model(backend.source)`` rebuilds the same backend.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import ModelError
from .backend import Backend, pick_device
from .hub import cached_repo_ids, cached_snapshot, hub_cache_dir, hub_snapshot, snapshot_commit
from .loading import (
    OPENPHENOM_REPO,
    WEIGHT_FILES,
    WEIGHTS_DIR,
    load_default,
    load_file,
    load_folder,
    load_timm_checkpoint,
    read_config,
)
from .timm_vit import CHANNEL_RULES, TimmViTBackend

OPENPHENOM_ALIAS = "openphenom"

#: The accepted source forms, for error messages, ``--help`` and ``concept-discovery models``.
SOURCE_FORMS = (
    ("default", "the small model bundled with the package (offline)"),
    (OPENPHENOM_ALIAS, f"alias of hf-hub:{OPENPHENOM_REPO}"),
    ("hf-hub:<owner>/<name>[@<revision>]", "a Hugging Face repository (cache, else download)"),
    ("timm:<name>", "timm's pretrained weights, from the local hub cache only"),
    ("timm:<name>:random", "a timm architecture with random weights (seed 0)"),
    ("<folder>", "OpenPhenom layout, timm hub layout, or a project card + weights"),
    ("<file>", "a weights file (safetensors or torch); a timm checkpoint needs ?arch=<timm name>"),
)
OPTIONS_HELP = "options after '?': arch=<timm name>, channel_rule=per-channel|mean|identity, seed=N"
_OPTIONS = ("arch", "channel_rule", "seed")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TIMM_NAME = re.compile(r"[\w.-]+")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def source_forms_text(indent: str = "  ") -> str:
    """The accepted forms, one a line."""
    width = max(len(form) for form, _ in SOURCE_FORMS)
    lines = [f"{indent}{form:<{width}}  {what}" for form, what in SOURCE_FORMS]
    return "\n".join([*lines, f"{indent}{OPTIONS_HELP}"])


def _refuse(text: str, why: str) -> ModelError:
    return ModelError(f"model source {text!r}: {why}. Accepted forms:\n{source_forms_text()}")


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source; ``text`` is its canonical string."""

    kind: str
    target: str = ""  # hub repository id, timm model name or absolute path
    revision: str | None = None
    arch: str | None = None
    channel_rule: str | None = None
    seed: int = 0
    bare: bool = False  # an owner/name given without "hf-hub:"

    @property
    def text(self) -> str:
        base = {
            "default": "default",
            "hf-hub": f"hf-hub:{self.target}" + (f"@{self.revision}" if self.revision else ""),
            "timm": f"timm:{self.target}",
            "timm-random": f"timm:{self.target}:random",
            "path": self.target,
        }[self.kind]
        opts = []
        if self.arch:
            opts.append(f"arch={self.arch}")
        if self.channel_rule and self.channel_rule != "per-channel":
            opts.append(f"channel_rule={self.channel_rule}")
        if self.seed:
            opts.append(f"seed={self.seed}")
        return base + ("?" + "&".join(opts) if opts else "")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system is no file either
        return False


def _parse_options(text: str, query: str) -> dict:
    opts: dict = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _OPTIONS or not eq or not value.strip():
            raise _refuse(text, f"option {part!r} is not one of {', '.join(_OPTIONS)} (key=value)")
        opts[key] = value.strip()
    return opts


def _merge(text: str, name: str, in_text, given):
    if given is None:
        return in_text
    if in_text is not None and str(in_text) != str(given):
        raise ModelError(
            f"model source {text!r} says {name}={in_text} but {name}={given} was also given"
        )
    return given


def parse_source(
    source: str | Path, *, arch: str | None = None, channel_rule: str | None = None
) -> ModelSource:
    """The ModelSource a string means, with ``arch`` and ``channel_rule`` merged in.

    An existing file or folder wins over every other reading, so a local folder named
    ``owner/name`` is the folder. Raises ModelError listing the accepted forms.
    """
    text = str(source).strip()
    if not text:
        raise _refuse(text, "empty")
    base, opts = text, {}
    if "?" in text and not _exists(Path(text).expanduser()):
        base, query = text.split("?", 1)
        opts = _parse_options(text, query)
    arch = _merge(text, "arch", opts.get("arch"), arch)
    rule = _merge(text, "channel_rule", opts.get("channel_rule"), channel_rule)
    if rule is not None and rule not in CHANNEL_RULES:
        raise ModelError(f"unknown channel rule {rule!r}; use one of {', '.join(CHANNEL_RULES)}")
    try:
        seed = int(opts.get("seed", 0))
    except ValueError:
        raise _refuse(text, f"seed must be an integer, got {opts['seed']!r}") from None
    path = Path(base).expanduser()
    lower = base.lower()
    if _exists(path):
        spec = ModelSource("path", str(path.resolve()))
    elif lower == "default":
        spec = ModelSource("default")
    elif lower in (OPENPHENOM_ALIAS, OPENPHENOM_REPO.lower()):
        spec = ModelSource("hf-hub", OPENPHENOM_REPO)
    elif lower.startswith("hf-hub:"):
        repo, _, revision = base[len("hf-hub:") :].partition("@")
        if not _REPO_ID.fullmatch(repo):
            raise _refuse(text, f"{repo!r} is not a hub repository id (owner/name)")
        spec = ModelSource("hf-hub", repo, revision or None)
    elif lower.startswith("timm:"):
        name = base[len("timm:") :]
        kind = "timm-random" if name.endswith(":random") else "timm"
        name = name.removesuffix(":random")
        if not _TIMM_NAME.fullmatch(name):
            raise _refuse(text, f"{name!r} is not a timm model name")
        spec = ModelSource(kind, name)
    elif scheme := re.match(r"([a-z][\w+.-]+):", lower):
        raise _refuse(text, f"unknown scheme {scheme.group(1)!r}")
    elif _REPO_ID.fullmatch(base) and not lower.endswith(_WEIGHT_SUFFIXES):
        spec = ModelSource("hf-hub", base, bare=True)
    elif base.startswith(("/", ".", "~", "\\")) or "/" in base or lower.endswith(_WEIGHT_SUFFIXES):
        raise _refuse(text, f"no file or folder {base!r} exists")
    else:
        raise _refuse(text, "not a known model name, hub id, timm name, file or folder")
    if arch and spec.kind not in ("path", "hf-hub"):
        raise _refuse(text, "arch applies to weights files and folders only")
    if seed and spec.kind != "timm-random":
        raise _refuse(text, "seed applies to timm:<name>:random only")
    return replace(spec, arch=arch, channel_rule=rule, seed=seed)


def _timm_pretrained(name: str) -> tuple[str, str]:
    """(canonical ``arch.tag``, hub repository) of timm's pretrained weights for ``name``."""
    from timm.models import get_pretrained_cfg

    _check_timm_arch(name)
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as exc:
        raise ModelError(f"timm:{name}: {exc}") from exc
    if cfg is None or not cfg.hf_hub_id:
        raise ModelError(
            f"timm has no hub weights for {name!r}; use timm:{name}:random, or a weights file "
            "with ?arch=<timm name>"
        )
    full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    return full, cfg.hf_hub_id


def _check_timm_arch(name: str) -> None:
    import timm
    from timm.models import split_model_name_tag

    arch, _ = split_model_name_tag(name)
    if not timm.is_model(arch):
        raise ModelError(f"timm has no model {arch!r} (see timm.list_models('vit*'))")


def _load(spec: ModelSource, default_block: int | None) -> tuple[Backend, ModelSource]:
    rule = spec.channel_rule or "per-channel"
    if spec.kind == "default":
        return load_default(default_block), spec
    if spec.kind == "path":
        path = Path(spec.target)
        load = load_folder if path.is_dir() else load_file
        backend = load(path, channel_rule=rule, arch=spec.arch, default_block=default_block)
        return backend, spec
    if spec.kind == "timm-random":
        _check_timm_arch(spec.target)
        backend = load_timm_checkpoint(
            None, spec.target, channel_rule=rule, default_block=default_block, seed=spec.seed
        )
        return backend, spec
    if spec.kind == "timm":
        full, repo = _timm_pretrained(spec.target)
        folder = cached_snapshot(repo)
        if folder is None:
            raise ModelError(
                f"timm:{spec.target}: timm's pretrained weights ({repo}) are not in the local hub "
                f"cache {hub_cache_dir()}, and timm: sources never download. Fetch them with "
                f"`hf download {repo}` (or load hf-hub:{repo} once online), or use "
                f"timm:{spec.target}:random for random weights"
            )
        backend = load_folder(
            folder, channel_rule=rule, default_block=default_block, model_id=f"timm:{full}"
        )
        return backend, replace(spec, target=full)
    try:
        folder = hub_snapshot(spec.target, spec.revision)
    except ModelError as exc:
        if spec.bare:
            raise ModelError(
                f"{spec.target!r} is no file or folder here, so it was read as "
                f"hf-hub:{spec.target}; {exc}"
            ) from exc
        raise
    backend = load_folder(
        folder, channel_rule=rule, arch=spec.arch, default_block=default_block, model_id=spec.target
    )
    return backend, replace(spec, revision=snapshot_commit(folder) or spec.revision, bare=False)


def load_model(
    source: str | Path = "default",
    device: str | torch.device | None = None,
    *,
    arch: str | None = None,
    channel_rule: str | None = None,
    default_block: int | None = None,
) -> Backend:
    """The backend a source names (see the module docstring), moved to ``device``.

    ``arch`` and ``channel_rule`` may also be written into the source as options; given both
    ways they must agree. ``channel_rule`` (default per-channel) only affects fixed-channel timm
    models: channel-agnostic ones take every channel as it is. ``default_block`` overrides the
    model's own default block. The returned backend's ``source`` reloads it exactly.
    """
    spec = parse_source(source, arch=arch, channel_rule=channel_rule)
    backend, spec = _load(spec, default_block)
    if not isinstance(backend, TimmViTBackend):
        spec = replace(spec, channel_rule=None)
    backend.source = spec.text
    return backend.to(pick_device(device))


@dataclass(frozen=True)
class ModelInfo:
    """One entry of ``list_models``: ``source`` is what ``load_model`` takes; ``available`` says
    whether it loads without network (bundled, or in the local hub cache)."""

    name: str
    source: str
    description: str
    available: bool


def _hub_vit(folder: Path) -> str | None:
    """What a cached hub snapshot holds, when it is a ViT ``load_folder`` reads; else None."""
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        return None
    try:
        config = read_config(folder)
    except ModelError:
        return None
    arch = config.get("architecture")
    if isinstance(arch, str) and "vit" in arch.lower():
        return f"timm {arch}"
    if "vit_backbone" in json.dumps(config):
        return "OpenPhenom-format channel-agnostic ViT"
    return None


def list_models() -> list[ModelInfo]:
    """The models to offer in a menu: the bundled default, OpenPhenom, and every ViT repository
    found in the local hub cache. Never uses the network."""
    card = WEIGHTS_DIR / "default.json"
    try:
        about = json.loads(card.read_text()).get("description", "")
    except (OSError, ValueError):
        about = ""
    infos = [
        ModelInfo(
            "default",
            "default",
            about or "small channel-agnostic ViT bundled with the package",
            (WEIGHTS_DIR / "default.safetensors").is_file() and card.is_file(),
        )
    ]
    phenom = cached_snapshot(OPENPHENOM_REPO)
    infos.append(
        ModelInfo(
            "OpenPhenom",
            f"hf-hub:{OPENPHENOM_REPO}",
            "Recursion's Phenom CA-MAE-S/16, a channel-agnostic ViT-S/16 trained on Cell "
            "Painting (non-commercial licence); downloaded from the Hugging Face hub unless cached",
            phenom is not None and _hub_vit(phenom) is not None,
        )
    )
    for repo in cached_repo_ids():
        if repo.lower() == OPENPHENOM_REPO.lower():
            continue
        folder = cached_snapshot(repo)
        what = _hub_vit(folder) if folder is not None else None
        if what:
            infos.append(ModelInfo(repo, f"hf-hub:{repo}", f"{what}, in the local hub cache", True))
    return infos

"""Dictionary files: one safetensors file holding the tensors and, in its header, the metadata.

Tensors: ``atoms`` (M, D), ``bias`` (D,), ``encoder``/``encoder_bias`` for a TopK SAE, and the
whitening state (``whiten_mean`` (G, D_raw), ``whiten_transform`` (G, D, D_raw),
``whiten_eigenvalues``) as float64 so that it round-trips exactly. The safetensors header's
string metadata holds JSON: the method's config, the fitted whitening's state (groups, their
control counts, widths), and the :class:`.DictionaryMeta` (token unit, model id, source and
block, embedding width, channel names, training-data signature, the training settings with the
whitening settings, metrics). The whitening's parameters are recorded once, in those settings;
the whitener's own ``params`` are written only when no settings give them (a dictionary built by
hand), and files that hold both (older ones) still read. Keeping it all in one file means a
dictionary cannot lose its whitening or its provenance. Writes are atomic, so a reader never
sees half a file. A dictionary in views (:mod:`.combined`) keeps each part's tensors and header
fields under its view's name, beside the whole's metadata.

The header also holds a checksum of every tensor's bytes, and loading checks it, the shapes
against the config and that every value is finite, so a damaged file is refused rather than
giving NaN codes. A training checkpoint (:func:`save_checkpoint`) is the same format with the
optimiser and random state added and ``checkpoint`` in the header; it lives beside the output
(:func:`checkpoint_path`) and is refused where a finished dictionary is expected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .._files import atomic_write_bytes
from ..errors import DictionaryError
from .applied import Dictionary
from .base import SparseDictionary
from .combined import CombinedDictionary
from .meta import DictionaryMeta
from .registry import build_model
from .whiten import Whitener

FORMAT = "napari-concept-discovery/dictionary"
# 2: the metadata is a DictionaryMeta with the whitening written once (inside the training
# settings); format 1 files (three whitening copies) still load. Code that reads only format 1
# refuses a format 2 file by name instead of failing on the missing whitener params.
# 3: a dictionary may come in views (:mod:`.combined`): ``views`` in the header names the
# parts, each part's header is ``view.<name>`` (JSON) and its tensors are ``<name>/<tensor>``;
# a file of one view is laid out as format 2. A reader of format 2 refuses a format 3 file by
# name, so a dictionary in views is never read as its first part alone.
FORMAT_VERSION = 3
#: The header key of a dictionary's views, and the prefix of each part's header.
VIEWS_KEY = "views"
VIEW_PREFIX = "view."


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_path(out: str | Path) -> Path:
    """Where the checkpoints of a training into ``out`` go: ``<stem>.ckpt.safetensors`` beside it."""
    out = Path(out)
    stem = out.name[: -len(".safetensors")] if out.name.endswith(".safetensors") else out.name
    return out.with_name(f"{stem}.ckpt.safetensors")


def _views_header_and_tensors(dictionary: CombinedDictionary) -> tuple[dict, dict]:
    """The header and tensors of a dictionary in views: each part's own under its name."""
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        VIEWS_KEY: json.dumps(list(dictionary.view_names)),
        "meta": json.dumps(_jsonable(dictionary.meta.to_dict()), sort_keys=True),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, part in dictionary.parts:
        part_header, part_tensors = _header_and_tensors(part, None, None)
        del part_header["format"], part_header["format_version"]
        header[VIEW_PREFIX + name] = json.dumps(part_header, sort_keys=True)
        tensors.update({f"{name}/{k}": v for k, v in part_tensors.items()})
    return header, tensors


def _header_and_tensors(model, whitener, meta) -> tuple[dict, dict]:
    if isinstance(model, CombinedDictionary):
        if whitener is not None or meta is not None:
            raise DictionaryError("pass either a Dictionary or a model with its whitener and meta")
        return _views_header_and_tensors(model)
    if isinstance(model, Dictionary):
        if whitener is not None or meta is not None:
            raise DictionaryError("pass either a Dictionary or a model with its whitener and meta")
        model, whitener, meta = model.model, model.whitener, model.meta
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.tensors().items()}
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise DictionaryError(
                f"the dictionary's {name!r} holds {bad} non-finite values (NaN or Inf); "
                "it is not written"
            )
    meta = DictionaryMeta.of(meta)
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "method": model.method,
        "d_in": str(model.d_in),
        "config": model.config.to_json(),
        "meta": json.dumps(_jsonable(meta.to_dict()), sort_keys=True),
    }
    if whitener is not None:
        wmeta, warrays = whitener.state()
        if _whitener_params(meta) == wmeta["params"]:
            del wmeta["params"]  # the training settings record them
        header["whitener"] = json.dumps(_jsonable(wmeta), sort_keys=True)
        for k, v in warrays.items():
            tensors[k] = torch.from_numpy(np.ascontiguousarray(v))
    return header, tensors


def save_dictionary(
    path: str | Path,
    model: SparseDictionary | Dictionary,
    whitener: Whitener | None = None,
    meta: DictionaryMeta | dict | None = None,
) -> Path:
    """Write a dictionary (a :class:`Dictionary`, or a model + whitening + metadata) atomically.

    Non-finite tensors are refused: a file is only ever written for a usable dictionary.
    """
    from safetensors.torch import save

    header, tensors = _header_and_tensors(model, whitener, meta)
    header["checksum"] = tensors_checksum(tensors)
    return atomic_write_bytes(path, save(tensors, metadata=header))


def save_checkpoint(
    path: str | Path,
    model: SparseDictionary,
    whitener: Whitener | None,
    meta: DictionaryMeta | dict,
    state: dict[str, torch.Tensor],
    state_meta: dict,
) -> Path:
    """A training checkpoint: the dictionary file plus ``state`` tensors (optimiser moments,
    random state; stored as ``state.<name>``) and ``state_meta`` (JSON) to resume from."""
    from safetensors.torch import save

    meta = DictionaryMeta.of(meta).replace(checkpoint=True)
    header, tensors = _header_and_tensors(model, whitener, meta)
    for k, v in state.items():
        tensors[f"state.{k}"] = v.detach().cpu().contiguous()
    header["checkpoint"] = json.dumps(_jsonable(state_meta), sort_keys=True)
    header["checksum"] = tensors_checksum(tensors)
    return atomic_write_bytes(path, save(tensors, metadata=header))


def read_header(path: str | Path) -> dict | None:
    """The string metadata of a safetensors file, or None when it is not one."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception:
        return None


def is_dictionary_file(path: str | Path) -> bool:
    """Whether ``path`` is a dictionary file (or a checkpoint of one) that may be replaced."""
    header = read_header(path) if Path(path).is_file() else None
    return header is not None and header.get("format") == FORMAT


def _whitener_params(meta: DictionaryMeta) -> dict | None:
    """The whitener's parameters the recorded training settings give, or None without them."""
    return None if meta.whitening is None else meta.whitening.whitener().get_params()


def _damaged(path: Path, what: str) -> DictionaryError:
    return DictionaryError(f"{path} is damaged: {what}; train the dictionary again")


def _check_shapes(path: Path, model: SparseDictionary, tensors: dict, whitener) -> None:
    """Every tensor the method needs is there with the shape its config gives."""
    expected = {k: tuple(v.shape) for k, v in model.tensors().items()}
    for name, shape in expected.items():
        if name == "tokens_since_fired" and name not in tensors:
            continue
        if name not in tensors:
            raise _damaged(path, f"tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise _damaged(
                path, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )
    if whitener is None:
        return
    g, d_raw = len(whitener.groups_), whitener.n_features_in_
    want = {"whiten_mean": (g, d_raw)}
    if whitener.transform_ is not None:
        want["whiten_transform"] = (g, model.d_in, d_raw)
        want["whiten_eigenvalues"] = (g, model.d_in)
    elif whitener.n_components_ != model.d_in:
        raise _damaged(
            path,
            f"whitening gives {whitener.n_components_} dimensions, the dictionary takes "
            f"{model.d_in}",
        )
    for name, shape in want.items():
        if name not in tensors:
            raise _damaged(path, f"tensor {name!r} is missing")
        if tuple(tensors[name].shape) != shape:
            raise _damaged(
                path, f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}"
            )


def _read(path: str | Path, checkpoint: bool) -> tuple[Dictionary, dict, dict]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise DictionaryError(f"no dictionary file at {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise DictionaryError(f"{path} is not a readable safetensors file: {exc}") from exc
    if header.get("format") != FORMAT:
        raise DictionaryError(
            f"{path} is a safetensors file but not a concept-discovery dictionary"
        )
    try:
        version = int(header.get("format_version", 0))
    except ValueError:
        raise _damaged(path, f"format version {header.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise DictionaryError(
            f"{path} was written by a newer version (format {header['format_version']}); "
            f"this one reads format {FORMAT_VERSION}"
        )
    if "checkpoint" in header and not checkpoint:
        try:
            steps = DictionaryMeta.from_dict(json.loads(header["meta"])).steps
        except (ValueError, TypeError, AttributeError, DictionaryError):
            steps = None
        at = f" (after step {steps})" if steps is not None else ""
        raise DictionaryError(
            f"{path} is a training checkpoint{at}, not a finished dictionary; finish the "
            "training with `concept-discovery train ... --resume` (the same --out)"
        )
    if "checksum" in header and tensors_checksum(tensors) != header["checksum"]:
        raise _damaged(path, "its tensors do not match the checksum written with them")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise _damaged(path, f"tensor {name!r} holds {bad} non-finite values (NaN or Inf)")
    state = {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}
    try:
        state_meta = json.loads(header["checkpoint"]) if "checkpoint" in header else {}
        if VIEWS_KEY in header:
            return _build_views(path, header, tensors), state, state_meta
    except DictionaryError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
    return _build(path, header, tensors), state, state_meta


def _build(path: Path, header: dict, tensors: dict) -> Dictionary:
    """The dictionary of one view from its header fields and tensors."""
    try:
        model = build_model(header["method"], int(header["d_in"]), json.loads(header["config"]))
        try:
            meta = DictionaryMeta.from_dict(json.loads(header["meta"]))
        except DictionaryError as exc:
            raise _damaged(path, str(exc)) from None
        whitener = None
        if "whitener" in header:
            arrays = {k: v.numpy() for k, v in tensors.items() if k.startswith("whiten_")}
            wstate = json.loads(header["whitener"])
            if "params" not in wstate:
                params = _whitener_params(meta)
                if params is None:
                    raise _damaged(path, "its whitening parameters are missing")
                wstate["params"] = params
            whitener = Whitener.from_state(wstate, arrays)
        _check_shapes(path, model, tensors, whitener)
        model.load_tensors(tensors)
    except DictionaryError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from exc
    model.eval()
    return Dictionary(model, whitener, meta, path=path)


def _build_views(path: Path, header: dict, tensors: dict) -> CombinedDictionary:
    """A dictionary in views: every part read as a dictionary of its own, then put together."""
    names = json.loads(header[VIEWS_KEY])
    parts = []
    for name in names:
        key = VIEW_PREFIX + str(name)
        if key not in header:
            raise _damaged(path, f"the header of its view {name!r} is missing")
        prefix = f"{name}/"
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            part = _build(path, json.loads(header[key]), own)
        except DictionaryError as exc:
            raise DictionaryError(f"{exc} (its view {name!r})") from None
        parts.append((str(name), part))
    try:
        meta = DictionaryMeta.from_dict(json.loads(header["meta"]))
    except DictionaryError as exc:
        raise _damaged(path, str(exc)) from None
    return CombinedDictionary.of(parts, meta, path=path)


def load_dictionary(path: str | Path) -> Dictionary:
    """Read a file written by :func:`save_dictionary`; damaged files and checkpoints are refused."""
    return _read(path, checkpoint=False)[0]


def load_checkpoint(path: str | Path) -> tuple[Dictionary, dict[str, torch.Tensor], dict]:
    """(dictionary, state tensors, state metadata) of a file written by :func:`save_checkpoint`."""
    dictionary, state, state_meta = _read(path, checkpoint=True)
    if not state_meta:
        raise DictionaryError(f"{path} is a finished dictionary, not a training checkpoint")
    return dictionary, state, state_meta

"""The dictionary methods by name: what a settings object or a file header names, built.

Adding a method means one entry here (its module class and config dataclass); the training loop,
the metrics, the applied dictionary and the file format never branch on the method.
"""

from __future__ import annotations

from ..errors import DictionaryError
from .base import DictionaryConfig, SparseDictionary
from .icfl import ICFL, ICFLConfig
from .topk import TopKConfig, TopKSAE

METHODS: dict[str, tuple[type[SparseDictionary], type[DictionaryConfig]]] = {
    "icfl": (ICFL, ICFLConfig),
    "topk": (TopKSAE, TopKConfig),
}


def build_model(
    method: str, d_in: int, config: DictionaryConfig | dict | None = None, *, seed: int = 0
) -> SparseDictionary:
    """A fresh dictionary of ``method`` for ``d_in``-dimensional tokens; ``config`` may be a dict."""
    if method not in METHODS:
        raise DictionaryError(
            f"unknown dictionary method {method!r}; choose one of {list(METHODS)}"
        )
    cls, cfg_cls = METHODS[method]
    if config is None:
        config = cfg_cls()
    elif isinstance(config, dict):
        config = cfg_cls.from_dict(config)
    return cls(d_in, config, seed=seed)

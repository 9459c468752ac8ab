"""Sparse dictionary learning on foundation-model activations: whitening, ICFL, TopK SAE.

Qt-free; torch lives here. See DESIGN.md, "Dictionary learning".
"""

from .base import Codes, ForwardOutput, SparseDictionary, codes_to_csr
from .icfl import ICFL, ICFLConfig
from .io import DictionaryFile, build_model, load_dictionary, save_dictionary
from .metrics import evaluate
from .topk import TopKConfig, TopKSAE
from .train import TrainProgress, TrainResult, train
from .whiten import Whitener, control_mask, parse_control

__all__ = [
    "ICFL",
    "Codes",
    "DictionaryFile",
    "ForwardOutput",
    "ICFLConfig",
    "SparseDictionary",
    "TopKConfig",
    "TopKSAE",
    "TrainProgress",
    "TrainResult",
    "Whitener",
    "build_model",
    "codes_to_csr",
    "control_mask",
    "evaluate",
    "load_dictionary",
    "parse_control",
    "save_dictionary",
    "train",
]

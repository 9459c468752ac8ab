"""bf16 kernels for CPUs with AVX512-BF16: flash-style self-attention and bias + GELU, compiled.

torch's CPU flash attention reaches only about a quarter of a bf16 matmul's rate on CPUs with
AVX512-BF16 and no AMX (measured on an AMD EPYC: ~60 GFLOP/s in bf16, no faster than fp32), and
it is half of the bf16 forward of a ViT-S/16 on 1,537-token sequences. ``cpu_bf16.cpp``
does the two products with ``vdpbf16ps`` and the softmax in fp32 registers (see its header),
and the MLP's bias add and exact (erf) GELU in one pass instead of two.

It is compiled once per machine with the system's C++ compiler into the user's cache folder
(``$NAPARI_CONCEPT_DISCOVERY_CACHE/kernels``, else a temporary folder) and loaded with ctypes,
which releases the GIL during the call. Where the CPU lacks the instructions, no compiler is
found, compilation fails, or ``CONCEPT_DISCOVERY_BF16_KERNELS=0`` is set, :func:`attention`
runs torch's ``scaled_dot_product_attention`` and :func:`bias_gelu` torch's ops instead;
:func:`kernels_path` says which.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from .._files import cache_dir

#: ``CONCEPT_DISCOVERY_BF16_KERNELS=0`` turns the kernels off (torch's ops run), read per call.
ENV = "CONCEPT_DISCOVERY_BF16_KERNELS"

_SOURCE = Path(__file__).with_name("cpu_bf16.cpp")
_FLAGS = [
    "-O3",
    "-std=c++17",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
    "-fPIC",
    "-shared",
    "-pthread",
]
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}  # "lib": the loaded library or None, "why": reason when None


def _cpu_has_avx512_bf16() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return all(f in flags.split() for f in ("avx512f", "avx512bw", "avx512vl", "avx512_bf16"))


def _cache_dirs() -> list[Path]:
    return [cache_dir() / "kernels", Path(tempfile.gettempdir()) / f"ncd-kernels-{os.getuid()}"]


def _compile(compiler: str, source: bytes, target: Path) -> None:
    """Compile into a temporary file beside ``target`` and move it in place (atomic: a
    concurrent process sees either no library or a whole one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        res = subprocess.run(
            [compiler, *_FLAGS, "-x", "c++", "-", "-o", tmp],
            input=source,
            capture_output=True,
            timeout=300,
        )
        if res.returncode:
            raise RuntimeError(res.stderr.decode(errors="replace")[-600:])
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> tuple[ctypes.CDLL | None, str]:
    if not _cpu_has_avx512_bf16():
        return None, "this CPU has no AVX512-BF16"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if not compiler:
        return None, "no C++ compiler (g++ or clang++) found"
    try:
        source = _SOURCE.read_bytes()
    except OSError as exc:
        return None, f"kernel source unreadable: {exc}"
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    errors = []
    for folder in _cache_dirs():
        target = folder / f"cpu_bf16-{tag}.so"
        try:
            if not target.exists():
                _compile(compiler, source, target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            errors.append(f"{folder}: {exc}")
            continue
        lib.ncd_bf16_supported.restype = ctypes.c_int
        if not lib.ncd_bf16_supported():
            return None, "this CPU has no AVX512-BF16"
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.ncd_attention_bf16.restype = ctypes.c_int
        f32 = ctypes.c_float
        lib.ncd_attention_bf16.argtypes = (
            [ptr] * 4 + [i64] * 4 + [ptr] * 3 + [ptr] * 4 + [f32, f32, ctypes.c_int]
        )
        lib.ncd_bias_gelu_bf16.restype = None
        lib.ncd_bias_gelu_bf16.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_int]
        return lib, ""
    return None, "compiling the kernel failed: " + "; ".join(errors)


def _library() -> ctypes.CDLL | None:
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"], _STATE["why"] = _build()
        return _STATE["lib"]  # type: ignore[return-value]


def _enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_usable(x: torch.Tensor, head_dim: int) -> bool:
    """Whether :func:`attention` runs the compiled kernel for inputs like ``x`` with heads of
    ``head_dim``: bf16 on the CPU, head dim a multiple of 32, no gradient wanted, the kernel
    enabled and loaded (compiled on first use)."""
    return (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and head_dim % 32 == 0
        and not (torch.is_grad_enabled() and x.requires_grad)
        and _enabled()
        and _library() is not None
    )


def kernels_path() -> str:
    """Which attention (and bias + GELU) bf16 runs on this CPU, in words (for output)."""
    if not _enabled():
        return f"torch SDPA ({ENV}=0)"
    if _library() is None:
        return f"torch SDPA ({_STATE['why']})"
    return "compiled AVX512-BF16 kernels"


def bias_gelu(
    x: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """GELU(x + bias) (exact, erf form) as a contiguous tensor (``out`` where given, of x's
    shape and dtype); ``x`` may be a slice along the last dim (the MLP part of a joint
    projection). One pass in fp32 with one rounding where the kernel runs (bf16 on the CPU),
    torch's ``F.gelu(x + bias)`` elsewhere."""
    if not kernel_usable(x, 32) or x.numel() == 0 or x.stride(-1) != 1:
        y = F.gelu(x if bias is None else x + bias)
        return y if out is None else out.copy_(y)
    cols = x.shape[-1]
    rows = x.numel() // cols
    flat = x.reshape(rows, cols)  # a view with rows `stride` apart where x is a slice
    b = None if bias is None else bias.detach().float().contiguous()
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype)
    elif out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError(f"bias_gelu: out must be contiguous {tuple(x.shape)} {x.dtype}")
    with torch.profiler.record_function("ncd::bias_gelu_bf16"):
        _library().ncd_bias_gelu_bf16(
            flat.data_ptr(),
            rows,
            cols,
            flat.stride(0),
            0 if b is None else b.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    return out


def _norm_args(norm, d: int) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
    """(fp32 weight, fp32 bias, eps) of a LayerNorm over the head dim, or Nones for no norm."""
    if norm is None:
        return None, None, 0.0
    w = norm.weight.detach().float().contiguous()
    b = norm.bias.detach().float().contiguous() if norm.bias is not None else torch.zeros(d)
    return w, b, float(norm.eps)


def _fusable(norm, d: int) -> bool:
    """Whether the kernel can apply ``norm`` itself: none, or an affine LayerNorm over D."""
    if norm is None:
        return True
    return (
        isinstance(norm, torch.nn.LayerNorm)
        and tuple(norm.normalized_shape) == (d,)
        and norm.weight is not None
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    q_norm: torch.nn.Module | None = None,
    k_norm: torch.nn.Module | None = None,
) -> torch.Tensor:
    """softmax(scale q' k'^T) v over the tokens, for q, k, v of shape (B, N, H, D), where q' and
    k' are ``q_norm(q)`` and ``k_norm(k)`` (norms over D, as timm's qk-norm; None or
    ``nn.Identity``, timm's "no qk-norm", apply none).

    Returns (B, N, H * D), the layout the output projection takes. ``scale`` defaults to
    D^-0.5. The compiled kernel runs where :func:`kernel_usable` says so, applying LayerNorms
    itself while it packs q and k (no copies of them); else torch's norms and SDPA run (which
    also serve autograd: the kernel has no backward).
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"attention takes q, k, v of one shape (B, N, H, D); got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    b, n, h, d = q.shape
    scale = d**-0.5 if scale is None else float(scale)
    q_norm = None if isinstance(q_norm, torch.nn.Identity) else q_norm
    k_norm = None if isinstance(k_norm, torch.nn.Identity) else k_norm
    grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
    if grad or not (kernel_usable(q, d) and k.dtype == v.dtype == q.dtype and q.numel() > 0):
        q = q if q_norm is None else q_norm(q)
        k = k if k_norm is None else k_norm(k)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale
        )
        return out.transpose(1, 2).reshape(b, n, h * d)
    if not _fusable(q_norm, d):
        q, q_norm = q_norm(q), None
    if not _fusable(k_norm, d):
        k, k_norm = k_norm(k), None
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    qw, qb, eps_q = _norm_args(q_norm, d)
    kw, kb, eps_k = _norm_args(k_norm, d)
    if q_norm is not None and k_norm is not None and eps_q != eps_k:
        k, kw, kb = k_norm(k).contiguous(), None, None  # one eps per call
    out = torch.empty(b, n, h * d, dtype=q.dtype)
    strides = [(ctypes.c_int64 * 3)(*t.stride()[:3]) for t in (q, k, v)]
    norms = [0 if t is None else t.data_ptr() for t in (qw, qb, kw, kb)]
    with torch.profiler.record_function("ncd::attention_bf16"):
        rc = _library().ncd_attention_bf16(
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            b,
            n,
            h,
            d,
            *strides,
            *norms,
            eps_q if q_norm is not None else eps_k,
            scale,
            torch.get_num_threads(),
        )
    if rc == 2:
        raise MemoryError(f"bf16 attention: no memory for the packed keys of {b} x {h} heads")
    if rc:
        raise ValueError(f"bf16 attention: bad shape {tuple(q.shape)} (head dim multiple of 32)")
    return out

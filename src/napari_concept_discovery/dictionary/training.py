"""One training loop for every dictionary method, over an in-memory or a zarr array.

Tokens stream in batches: an in-memory array is shuffled by index each epoch; a zarr (or any
sliceable) array is read in chunk-aligned blocks, in random order, through a shuffle buffer of
a few batches, so memory is bounded by the batch size and not by the data. Whitening, when
given, is applied once to the whole set when it fits in memory (then it trains as an in-memory
array), else per batch. The loop reports progress, honours cancellation between steps
(so the dictionary it returns is always the one after the last complete step), and hands
checkpoints to a callback (the caller decides where and how they are written).

A checkpoint carries a :class:`TrainState` (optimiser moments, torch's random state, the
dead-feature counters), and ``train(..., resume=state)`` goes on from it: the batch stream is
drawn again from the seed and skipped to the step, so a resumed run reaches the same dictionary
as one that was never interrupted.
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DictionaryError
from ..progress import Cancel, Progress, ProgressCallback, is_cancelled
from .applied import prepare
from .base import SparseDictionary, batch_fvu, fired_mask
from .settings import first_steps
from .whiten import Whitener

DEAD_WINDOW = 100_000  # tokens; not firing in 1e5 tokens = active on < metrics.DEAD_THRESHOLD
#: Whiten the whole training set once, up front, when its raw and whitened float32 copies take
#: at most this many bytes; larger sets are whitened batch by batch as they stream.
WHITEN_ONCE_BYTES = 1 << 30


@dataclass
class TrainResult:
    """What :func:`train` did; ``history`` holds the ``Progress`` reports (stage ``"train"``)."""

    model: SparseDictionary
    steps_done: int
    cancelled: bool
    diverged: bool
    samples: int
    seconds: float
    history: list[Progress] = field(default_factory=list)
    #: with ``diverged``: the step whose loss was not finite (the model is the one of
    #: ``steps_done``, the last reported state before it)
    diverged_at: int | None = None


@dataclass
class TrainState:
    """What a training needs besides the model to go on exactly where it stopped."""

    step: int
    samples: int
    optimizer: dict  # torch optimiser state_dict
    since_fired: torch.Tensor
    torch_rng: torch.Tensor

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, JSON-able metadata) for a checkpoint file; inverse of :meth:`from_tensors`."""
        out = {"since_fired": self.since_fired, "torch_rng": self.torch_rng}
        slots: dict[str, dict] = {}
        for index, slot in self.optimizer["state"].items():
            kinds = {}
            for key, value in slot.items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer.{index}.{key}"] = value
                    kinds[key] = "tensor"
                else:
                    kinds[key] = value
            slots[str(index)] = kinds
        meta = {
            "step": self.step,
            "samples": self.samples,
            "optimizer_groups": json.loads(json.dumps(self.optimizer["param_groups"])),
            "optimizer_slots": slots,
        }
        return out, meta

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> TrainState:
        state = {}
        for index, kinds in meta["optimizer_slots"].items():
            state[int(index)] = {
                key: tensors[f"optimizer.{index}.{key}"] if kind == "tensor" else kind
                for key, kind in kinds.items()
            }
        return cls(
            step=int(meta["step"]),
            samples=int(meta["samples"]),
            optimizer={"state": state, "param_groups": meta["optimizer_groups"]},
            since_fired=tensors["since_fired"],
            torch_rng=tensors["torch_rng"],
        )


def _wants_state(callback) -> bool:
    """Whether a checkpoint callback takes (model, step, state) rather than (model, step)."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def iterate_batches(
    data,
    batch_size: int,
    rng: np.random.Generator,
    groups: np.ndarray | None = None,
    buffer_batches: int = 4,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Endless shuffled batches of rows of ``data`` (N, D), with their group labels.

    numpy arrays are indexed directly; anything else (a zarr array) is read one block of whole
    chunks at a time, so at most about ``buffer_batches + 1`` batches of rows are in memory.
    """
    n = data.shape[0]
    if n == 0:
        raise DictionaryError("no tokens to train on")
    batch_size = min(batch_size, n)
    if isinstance(data, np.ndarray):
        while True:
            perm = rng.permutation(n)
            for start in range(0, n - batch_size + 1, batch_size):
                idx = np.sort(perm[start : start + batch_size])
                yield data[idx], None if groups is None else groups[idx]
    chunk = int(getattr(data, "chunks", (batch_size,))[0]) or batch_size
    block = chunk * max(1, batch_size // chunk)
    starts = np.arange(0, n, block)
    cap = buffer_batches * batch_size
    buf_x: list[np.ndarray] = []
    buf_g: list[np.ndarray] = []
    held = 0
    while True:
        for s in rng.permutation(starts):
            stop = min(s + block, n)
            buf_x.append(np.asarray(data[s:stop]))
            if groups is not None:
                buf_g.append(groups[s:stop])
            held += stop - s
            if held < cap:
                continue
            x = np.concatenate(buf_x)
            g = np.concatenate(buf_g) if groups is not None else None
            perm = rng.permutation(len(x))
            n_full = len(x) // batch_size * batch_size
            for start in range(0, n_full, batch_size):
                idx = perm[start : start + batch_size]
                yield x[idx], None if g is None else g[idx]
            rest = perm[n_full:]
            buf_x = [x[rest]]
            buf_g = [g[rest]] if g is not None else []
            held = len(rest)


def whiten_once(data, whitener: Whitener | None, groups, limit: int = WHITEN_ONCE_BYTES):
    """``(tokens, whitener, groups)`` for the loop: whitened once when they fit in ``limit``.

    Whitening every batch as it is drawn repeats the same work once per epoch (hundreds of
    times on one plate's cells); whitening the set once gives every row exactly the values the
    per-batch whitening would (it is row by row), so an in-memory array trains to the same
    dictionary, batch for batch. Returns the inputs unchanged when there is no whitener or the
    set is too large.
    """
    if whitener is None:
        return data, whitener, groups
    n, d = int(data.shape[0]), int(data.shape[1])
    if n * (d + whitener.n_components_) * 4 > limit:
        return data, whitener, groups
    out = np.empty((n, whitener.n_components_), dtype=np.float32)
    step = 65536
    for start in range(0, n, step):
        rows = slice(start, start + step)
        out[rows] = prepare(data[rows], None if groups is None else groups[rows], whitener).numpy()
    return out, None, None


def training_memory(
    method: str, atoms: int, d_in: int, batch_size: int, pursuit: str = "gram"
) -> int:
    """About how many bytes training a dictionary of ``atoms`` atoms on ``d_in``-wide tokens
    takes at its peak (float32): the weights with their gradient and two Adam moments, ICFL's
    Gram matrix (atoms x atoms, with the Gram pursuit) and the batch's scores or activations."""
    f = 4
    params = 4 * d_in * atoms * f
    if method == "topk":  # encoder and decoder, and pre-activations, codes and their gradients
        return 2 * params + 3 * batch_size * atoms * f
    gram = atoms * atoms * f if pursuit == "gram" else 0
    return params + gram + 2 * batch_size * atoms * f


def check_training_memory(
    method: str, atoms: int, d_in: int, batch_size: int, pursuit: str = "gram"
) -> None:
    """Refuse, before any allocation, a dictionary too large for this machine's memory: the
    memory it would need and the most atoms that fit (as ``synth --size`` says)."""
    from .._files import human_bytes, physical_memory

    have = physical_memory()
    need = training_memory(method, atoms, d_in, batch_size, pursuit)
    if have is None or need <= have:
        return
    lo, hi = 1, atoms  # the largest atom count that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if training_memory(method, mid, d_in, batch_size, pursuit) <= have:
            lo = mid
        else:
            hi = mid - 1
    raise DictionaryError(
        f"atoms: {atoms} atoms would need about {human_bytes(need)} of memory to train "
        f"({method} on {d_in}-wide tokens, batch {batch_size}); this machine has "
        f"{human_bytes(have)}. Use --atoms {lo} or less (atoms=), or a smaller --batch-size"
    )


@contextmanager
def interrupt_between_steps() -> Iterator[threading.Event]:
    """While training runs in the main thread under Python's own Ctrl-C handler, a first
    Ctrl-C sets the event instead of raising: the loop ends after the step under way, so the
    final checkpoint holds a whole step, and :func:`train` then raises ``KeyboardInterrupt``.
    A second Ctrl-C raises at once. Elsewhere (a worker thread, a host with its own handler)
    the event is never set and Ctrl-C is left alone."""
    hit = threading.Event()
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield hit
        return

    def handler(signum, frame):
        if hit.is_set():
            raise KeyboardInterrupt
        hit.set()

    signal.signal(signal.SIGINT, handler)
    try:
        yield hit
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def train(
    model: SparseDictionary,
    data,
    *,
    steps: int | None = None,
    batch_size: int = 1024,
    seed: int = 0,
    whitener: Whitener | None = None,
    groups=None,
    progress: ProgressCallback = None,
    progress_every: int = 10,
    cancel: Cancel = None,
    on_checkpoint: Callable[..., None] | None = None,
    checkpoint_every: int = 1000,
    init_samples: int = 8192,
    resume: TrainState | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimiser steps on (N, D) tokens ``data``.

    ``steps=None`` sizes them to the data: ``settings.FIRST_EPOCHS`` passes over the N tokens,
    within ``settings.FIRST_STEPS`` (:func:`.settings.first_steps`).

    ``data`` is raw tokens when ``whitener`` is given (whitened using ``groups`` (N,) for
    per-group whitening: all at once when they fit in memory, see :func:`whiten_once`, else
    batch by batch), else tokens already in the dictionary's space. ``progress``
    gets a ``Progress("train", step, steps, info)`` every ``progress_every`` steps and at the
    end, with ``loss``, ``fvu`` and ``dead_fraction`` of the latest batch and ``samples`` seen.
    ``cancel`` (an Event or a callable) is checked before each step; the model returned is the
    one after the last complete step. A non-finite loss restores the last reported state and
    stops (``diverged=True``). ``on_checkpoint(model, step)`` (or ``(model, step, state)``
    with a :class:`TrainState`) is called every ``checkpoint_every`` steps and after the last
    one. ``resume`` (a checkpoint's state, with ``model`` holding the checkpoint's tensors)
    goes on from its step with the same ``seed`` and ``batch_size``.
    """
    if steps is None:
        steps = first_steps(int(data.shape[0]), batch_size)
    if steps < 0 or batch_size < 1:
        raise DictionaryError(f"steps must be >= 0 and batch size >= 1; got {steps}, {batch_size}")
    width = whitener.n_components_ if whitener is not None else data.shape[1]
    if width != model.d_in:
        raise DictionaryError(
            f"the dictionary takes {model.d_in}-dimensional tokens but the training tokens are "
            f"{width}-dimensional" + (" after whitening" if whitener is not None else "")
        )
    group_arr = None if groups is None else np.asarray(groups).astype(str)
    data, whitener, group_arr = whiten_once(data, whitener, group_arr)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()

    model.train()
    if resume is None:
        init_stream = iterate_batches(
            data, max(batch_size, 1), np.random.default_rng(seed + 1), group_arr
        )
        sample, seen = [], 0
        while seen < min(init_samples, data.shape[0]):
            xb, gb = next(init_stream)
            sample.append(prepare(xb, gb, whitener))
            seen += len(xb)
        model.init_from_data(torch.cat(sample)[:init_samples], gen)
        del sample, init_stream

    optimizer = model.make_optimizer()
    stream = iterate_batches(data, batch_size, rng, group_arr)
    since_fired = torch.zeros(model.n_atoms, dtype=torch.long)
    history: list[Progress] = []
    samples = step = 0
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer)
        since_fired.copy_(resume.since_fired)
        torch.set_rng_state(resume.torch_rng)
        samples, step = int(resume.samples), int(resume.step)
        for _ in range(step):  # the batches the interrupted run took, drawn again
            next(stream)
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    good_step = step
    cancelled = diverged = False
    diverged_at = None
    with_state = on_checkpoint is not None and _wants_state(on_checkpoint)

    def checkpoint(at: int) -> None:
        if not with_state:
            on_checkpoint(model, at)
            return
        state = TrainState(
            step=at,
            samples=samples,
            optimizer=optimizer.state_dict(),
            since_fired=since_fired.clone(),
            torch_rng=torch.get_rng_state(),
        )
        on_checkpoint(model, at, state)

    def report(loss: float, fvu: float) -> None:
        window = min(DEAD_WINDOW, samples)
        dead = float((since_fired >= window).float().mean()) if window else 0.0
        info = Progress(
            "train",
            step,
            steps,
            {"loss": loss, "fvu": fvu, "dead_fraction": dead, "samples": samples},
        )
        history.append(info)
        if progress is not None:
            progress(info)

    loss_f = fvu_f = math.nan
    first = step
    with interrupt_between_steps() as interrupted:
        for step_i in range(first + 1, steps + 1):
            if is_cancelled(cancel) or interrupted.is_set():
                cancelled = True
                break
            xb, gb = next(stream)
            x = prepare(xb, gb, whitener)
            out = model(x)
            loss_f = float(out.loss.detach())
            if not math.isfinite(loss_f):
                model.load_state_dict(good)
                step, diverged, diverged_at = good_step, True, step_i
                break
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            model.before_step()
            optimizer.step()
            model.after_step(step_i, optimizer)
            step = step_i
            samples += len(x)
            with torch.no_grad():
                fired = fired_mask(out.codes, model.n_atoms)
                since_fired += len(x)
                since_fired[fired] = 0
            fvu_f = out.metrics.get("fvu")
            if fvu_f is None:
                fvu_f = batch_fvu(x, out.reconstruction)
            if step % progress_every == 0 or step == steps:
                report(loss_f, fvu_f)
                good = {k: v.detach().clone() for k, v in model.state_dict().items()}
                good_step = step
            if on_checkpoint is not None and checkpoint_every and step % checkpoint_every == 0:
                checkpoint(step)
    if cancelled and step > first and (not history or history[-1].done != step):
        report(loss_f, fvu_f)
    if (
        on_checkpoint is not None
        and step > first
        and (not checkpoint_every or step % checkpoint_every)
    ):
        checkpoint(step)
    model.eval()
    if interrupted.is_set():
        raise KeyboardInterrupt(f"training stopped after step {step} of {steps}")
    return TrainResult(
        model=model,
        steps_done=step,
        cancelled=cancelled,
        diverged=diverged,
        samples=samples,
        seconds=time.perf_counter() - t0,
        history=history,
        diverged_at=diverged_at,
    )

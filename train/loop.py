"""One training run: ``train(config, on_checkpoint=None, log=print) -> summary``.

The loop follows autoresearch: gradient accumulation up to ``total_batch_size`` tokens per optimizer step,
schedules driven by progress = elapsed budget / budget, a debiased EMA of the training loss, and a fast fail on
NaN or loss > 100. Training time excludes start-up and the first ``startup_steps`` steps (compilation on GPU)
and everything the triage itself does (snapshots, coherence, callbacks, quick evaluations), so a run with
triage and one without get the same training budget.

Triage: the reference snapshot is taken at init; matrices that are all zero at init (attention/MLP output
projections, value-embedding gates) take their reference rank from the snapshot after the first optimizer
step. At every mark (each ``measure_every`` and ``triage_time``, in the budget's unit) the loop measures
gradient coherence on that step's gradients (after backward, before they are cleared), takes a structural
snapshot after the optimizer step, and calls ``on_checkpoint``.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from optuna_triage import StructuralSnapshot, gradient_coherence, rank_retention, structural_snapshot
from train.config import PRESETS, TrainConfig, detect_device, preset_config
from train.dataloader import make_batches
from train.evaluate import evaluate_bpb
from train.model import GPT
from train.optim import apply_schedules, build_optimizer
from train.prepare import default_cache_dir, load_manifest
from train.tokenizer import Tokenizer

EMA_BETA = 0.9
DIVERGED_LOSS = 100.0

__all__ = ["PRESETS", "Checkpoint", "TrainConfig", "TrainingDiverged", "TriageKilled", "preset_config",
           "resolve_device", "train"]


class TrainingDiverged(RuntimeError):
    """The training loss became NaN/inf or exceeded 100 (autoresearch's fast fail)."""


class TriageKilled(RuntimeError):
    """Standalone triage: rank retention at the triage mark fell below ``triage_kill``."""

    def __init__(self, retention: float, threshold: float, mark: int, unit: str) -> None:
        super().__init__(f"rank retention {retention:.4f} < {threshold:g} at {mark} {unit}")
        self.retention, self.threshold, self.mark = retention, threshold, mark


@dataclass
class Checkpoint:
    """What ``on_checkpoint`` receives at each mark."""

    mark: int                       # the mark in budget units (int seconds or steps): the report step
    step: int                       # optimizer steps done
    seconds: float                  # training seconds so far
    model: nn.Module
    snapshot: StructuralSnapshot
    reference: StructuralSnapshot
    retention: float
    grad_coherence: float
    train_loss: float               # debiased EMA
    is_triage: bool
    evaluate: Callable[[int], float]  # quick val_bpb on n tokens; the model goes back to train mode after


def resolve_device(name: str) -> torch.device:
    """'auto' -> the detected device; an explicit request is checked against what this torch build offers."""
    if name == "auto":
        name = detect_device()
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"CUDA requested but not available (torch {torch.__version__}); use --device cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("MPS requested but not available; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {name!r}")
    return torch.device(name)


def peak_memory_mb(device: torch.device) -> float:
    """Peak VRAM on CUDA, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed blocks back to the OS between steps (CPU runs).

    A step's biggest tensors (the logits: rows x context x vocab floats, 32 MB on the cpu preset) sit above
    glibc's mmap threshold, so every step maps them afresh and page-faults them in, then unmaps them: measured
    on the cpu preset, about a third of the process's time went to the kernel. Raising the mmap and trim
    thresholds lets freed memory be reused instead (a few hundred MB more peak RSS). Returns False where the
    C library is not glibc; nothing changes there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def _marks(config: TrainConfig) -> list[tuple[float, bool]]:
    """(position in budget units, is_triage) of every mark, ascending."""
    every = config.measure_every if config.measure_every is not None else config.budget / 10
    positions = {round(every * k, 9): False for k in range(1, int(config.budget / every + 1e-9) + 1)}
    if config.triage_time > 0:
        positions[round(config.triage_time, 9)] = True
    return sorted(positions.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(config: TrainConfig, on_checkpoint: Callable[[Checkpoint], None] | None = None,
          log: Callable[..., None] = print) -> dict:
    """Run one training run and return its summary (see the contract for the keys).

    Raises:
        ValueError: bad settings (including an unavailable device).
        train.prepare.DataError: missing or corrupt prepared data.
        TrainingDiverged: NaN loss or loss > 100.
        TriageKilled: retention below ``config.triage_kill`` at the triage mark.
        Exception: whatever ``on_checkpoint`` raises (e.g. optuna.TrialPruned) propagates.
    """
    t_start = time.perf_counter()
    config.validate()
    device = resolve_device(config.device)
    if device.type == "cpu":
        keep_freed_memory()
        if config.threads:
            torch.set_num_threads(config.threads)
    cache = config.cache_dir if config.cache_dir is not None else default_cache_dir()
    load_manifest(cache)
    tokenizer = Tokenizer.from_directory(cache)
    token_bytes = tokenizer.token_bytes().to(device)

    torch.manual_seed(config.seed)
    raw_model = GPT(config.gpt_config(tokenizer.n_vocab)).to(device)
    raw_model.init_weights()
    optimizer = build_optimizer(raw_model, config)
    model = torch.compile(raw_model, dynamic=False) if config.compile and device.type == "cuda" else raw_model
    autocast = (torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    accum_steps = config.total_batch_size // (config.device_batch_size * config.seq_len)
    batches = make_batches(cache, tokenizer, split="train", batch_size=config.device_batch_size,
                           seq_len=config.seq_len, device=device)

    def evaluate(num_tokens: int) -> float:
        rows = max(1, min(config.device_batch_size, num_tokens // config.seq_len))
        val = make_batches(cache, tokenizer, split="val", batch_size=rows, seq_len=config.seq_len, device=device)
        model.eval()
        try:
            with autocast:
                return evaluate_bpb(model, val, token_bytes, num_tokens)
        finally:
            model.train()

    triage_on = config.triage_time > 0
    measuring = triage_on or on_checkpoint is not None
    unit = config.budget_unit
    num_params = raw_model.num_params()
    log(f"model: depth {config.depth}, n_embd {config.n_embd}, heads {raw_model.config.n_head}/{raw_model.config.n_kv_head}, "
        f"{num_params / 1e6:.2f}M params, vocab {tokenizer.n_vocab}, device {device.type}, "
        f"{config.matrix_optimizer} | budget {config.budget:g} {unit} | {accum_steps} micro-batch(es) of "
        f"{config.device_batch_size}x{config.seq_len} per step")
    reference = structural_snapshot(raw_model) if measuring else None
    if triage_on:
        log(f"[triage] eff_rank_init={reference.mean_rank:.2f} over {len(reference.ranks)} matrices; "
            f"{len(reference.zero)} zero-init matrices take their reference after step 1")

    marks = _marks(config) if measuring else []
    summary_extra: dict = {}
    last_reported, retention, coherence = None, math.nan, math.nan
    smooth, ema_loss, step, training_time, log_slot = 0.0, math.nan, 0, 0.0, -1
    t_train = time.perf_counter()
    while True:
        _sync(device)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(accum_steps):
            x, y = next(batches)
            with autocast:
                loss = model(x, y)
            loss_sum += loss.detach()
            (loss / accum_steps).backward()
        elapsed = training_time if unit == "seconds" else float(step)
        lrm = apply_schedules(optimizer, min(elapsed / config.budget, 1.0), step, config.warmup_ratio,
                              config.warmdown_ratio, config.final_lr_frac)
        optimizer.step()
        loss_value = loss_sum.item() / accum_steps  # synchronises
        _sync(device)
        dt = time.perf_counter() - t0
        step += 1
        if step > config.startup_steps or unit == "steps":
            training_time += dt
        if not math.isfinite(loss_value) or loss_value > DIVERGED_LOSS:
            what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"loss {loss_value:.2f} > 100"
            raise TrainingDiverged(f"{what} at step {step}")
        smooth = EMA_BETA * smooth + (1 - EMA_BETA) * loss_value
        ema_loss = smooth / (1 - EMA_BETA ** step)

        position = training_time if unit == "seconds" else float(step)
        done = position >= config.budget and (unit == "steps" or step > config.startup_steps)
        crossed = [m for m in marks if m[0] <= position + 1e-9]
        if measuring and (crossed or done):
            coherence = gradient_coherence(raw_model)  # this step's gradients, before they are cleared
        optimizer.zero_grad(set_to_none=True)
        if measuring and step == 1:
            reference = reference.filled_from(structural_snapshot(raw_model))
            if triage_on:
                log(f"[triage] reference after step 1: eff_rank_ref={reference.mean_rank:.2f} over "
                    f"{len(reference.ranks)} matrices")
        if crossed:
            marks = marks[len(crossed):]
            mark = math.ceil(crossed[-1][0] - 1e-9)
            is_triage = any(t for _, t in crossed)
            if mark != last_reported or is_triage:
                last_reported = mark
                snapshot = structural_snapshot(raw_model)
                retention = rank_retention(snapshot, reference)
                if is_triage:
                    summary_extra.update(triage_retention=retention, triage_grad_coherence=coherence,
                                         triage_train_loss=ema_loss, triage_step=step)
                    log(f"[triage@{mark}] rank_retention={retention:.4f} grad_coherence={coherence:.4f} "
                        f"eff_rank={snapshot.mean_rank:.2f} loss={ema_loss:.4f} step={step}")
                if on_checkpoint is not None:
                    on_checkpoint(Checkpoint(mark=mark, step=step, seconds=training_time, model=raw_model,
                                             snapshot=snapshot, reference=reference, retention=retention,
                                             grad_coherence=coherence, train_loss=ema_loss, is_triage=is_triage,
                                             evaluate=evaluate))
                if is_triage and config.triage_kill is not None and not retention >= config.triage_kill:
                    log(f"[triage@{mark}] KILL: rank_retention={retention:.4f} < {config.triage_kill:g}")
                    raise TriageKilled(retention, config.triage_kill, mark, unit)
        slot = int(min(position / config.budget, 1.0) / config.log_every) if config.log_every > 0 else 0
        if step == 1 or slot > log_slot or done:
            log_slot = slot
            log(f"step {step:05d} ({100 * min(position / config.budget, 1.0):5.1f}%) | loss {ema_loss:.4f} | "
                f"lrm {lrm:.2f} | dt {dt * 1000:.0f}ms | tok/s {config.total_batch_size / dt:,.0f}")
        if done:
            break

    t_eval = time.perf_counter()
    val_bpb = evaluate(config.eval_tokens)
    log(f"eval: {config.eval_tokens} tokens in {time.perf_counter() - t_eval:.1f}s")
    final = structural_snapshot(raw_model) if measuring else None
    counted_steps = step if unit == "steps" else max(step - config.startup_steps, 0)
    return {
        "val_bpb": val_bpb,
        "training_seconds": training_time,
        "total_seconds": time.perf_counter() - t_start,
        "peak_memory_mb": peak_memory_mb(device),
        "num_steps": step,
        "num_params_M": num_params / 1e6,
        "depth": config.depth,
        "eff_rank_init": reference.mean_rank if measuring else math.nan,
        "eff_rank_final": final.mean_rank if measuring else math.nan,
        "rank_retention": rank_retention(final, reference) if measuring else math.nan,
        "grad_coherence": coherence,
        "tokens_per_sec": counted_steps * config.total_batch_size / training_time if training_time else 0.0,
        "train_loss": ema_loss,
        "device": device.type,
        "preset": config.preset,
        "budget_unit": unit,
        "budget": config.budget,
        "triage_time": config.triage_time,
        "startup_seconds": t_train - t_start,
        **summary_extra,
    }

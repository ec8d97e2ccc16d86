"""TrainConfig, the presets, and the checks that turn bad settings into one-line ValueErrors.

Re-exported by :mod:`train.loop` (the contract's home for these names).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from train.model import GPTConfig
from train.optim import MATRIX_OPTIMIZERS

DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass
class TrainConfig:
    """Everything one training run needs; every field has a kebab-case flag in ``python -m train``.

    Budgets: exactly one of ``time_budget`` (seconds of training, excluding start-up and the first
    ``startup_steps`` steps) and ``step_budget`` (optimizer steps; reproducible). ``triage_time`` and
    ``measure_every`` are in the budget's unit.
    """

    preset: str = "cpu"
    device: str = "auto"
    seed: int = 42
    cache_dir: Path | None = None
    # model: n_embd = depth * aspect_ratio rounded up to a multiple of head_dim
    depth: int = 2
    aspect_ratio: int = 64
    head_dim: int = 64
    n_kv_head: int = 0              # 0 = as many KV heads as query heads (no grouping)
    window_pattern: str = "SSSL"
    seq_len: int = 256
    # batch: total_batch_size tokens per optimizer step, in micro-batches of device_batch_size rows
    device_batch_size: int = 16
    total_batch_size: int = 4096
    # optimizer
    matrix_lr: float = 0.04
    embedding_lr: float = 0.6
    unembedding_lr: float = 0.004
    scalar_lr: float = 0.5
    weight_decay: float = 0.2
    adam_beta1: float = 0.8
    adam_beta2: float = 0.95
    warmup_ratio: float = 0.0
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.0
    matrix_optimizer: str = "muon"
    # budget and triage
    time_budget: float | None = 30.0
    step_budget: int | None = None
    startup_steps: int = 1          # steps not counted against a time budget (warm-up / compilation)
    triage_time: float = 6.0
    triage_kill: float | None = None
    measure_every: float | None = None
    # evaluation and runtime
    eval_tokens: int = 65536
    compile: bool = False
    threads: int = 0                # CPU intra-op threads; 0 = torch's default (one per core)
    log_every: float = 0.05         # fraction of the budget between step log lines

    @property
    def budget_unit(self) -> str:
        return "steps" if self.step_budget is not None else "seconds"

    @property
    def budget(self) -> float:
        return float(self.step_budget if self.step_budget is not None else self.time_budget)

    @property
    def n_embd(self) -> int:
        return math.ceil(self.depth * self.aspect_ratio / self.head_dim) * self.head_dim

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model's shape for a tokenizer of ``vocab_size`` tokens."""
        n_head = self.n_embd // self.head_dim
        return GPTConfig(sequence_len=self.seq_len, vocab_size=vocab_size, n_layer=self.depth, n_head=n_head,
                         n_kv_head=self.n_kv_head or n_head, n_embd=self.n_embd, window_pattern=self.window_pattern)

    def validate(self) -> None:
        """Raise ValueError (one line) on any inconsistent setting."""
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        if (self.time_budget is None) == (self.step_budget is None):
            raise ValueError("set exactly one of time_budget and step_budget")
        if self.budget <= 0 or not math.isfinite(self.budget):
            raise ValueError(f"the {self.budget_unit} budget must be positive, got {self.budget:g}")
        if not 0 <= self.triage_time <= self.budget:
            raise ValueError(f"triage_time {self.triage_time:g} must be in [0, budget {self.budget:g}] "
                             f"({self.budget_unit})")
        if self.triage_kill is not None and not 0 < self.triage_kill <= 1:
            raise ValueError(f"triage_kill must be a fraction in (0, 1], got {self.triage_kill:g}")
        if self.measure_every is not None and self.measure_every <= 0:
            raise ValueError(f"measure_every must be positive, got {self.measure_every:g}")
        if self.matrix_optimizer not in MATRIX_OPTIMIZERS:
            raise ValueError(f"matrix_optimizer must be one of {', '.join(MATRIX_OPTIMIZERS)}")
        for name in ("depth", "aspect_ratio", "head_dim", "seq_len", "device_batch_size", "total_batch_size",
                     "eval_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.startup_steps < 0 or self.n_kv_head < 0 or self.threads < 0:
            raise ValueError("startup_steps, n_kv_head and threads must be >= 0")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings), got {self.head_dim}")
        n_head = self.n_embd // self.head_dim
        if self.n_kv_head and n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide the {n_head} query heads")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern must be a string of S and L, got {self.window_pattern!r}")
        micro = self.device_batch_size * self.seq_len
        if self.total_batch_size % micro:
            raise ValueError(f"total_batch_size {self.total_batch_size} is not a multiple of device_batch_size "
                             f"* seq_len = {micro}")
        for name in ("matrix_lr", "embedding_lr", "unembedding_lr", "scalar_lr", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "warmup_ratio", "warmdown_ratio", "final_lr_frac"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.warmup_ratio + self.warmdown_ratio > 1:
            raise ValueError("warmup_ratio + warmdown_ratio must not exceed 1")


PRESETS: dict[str, dict] = {
    # autoresearch's defaults (an H100 run): depth 8 -> n_embd 512, 4 heads of 128, 2048 context,
    # 2^19-token optimizer steps, 5-minute budget, triage at 1 minute (the 300:60 ratio).
    "gpu": dict(preset="gpu", depth=8, aspect_ratio=64, head_dim=128, seq_len=2048, device_batch_size=128,
                total_batch_size=2**19, time_budget=300.0, step_budget=None, startup_steps=10, triage_time=60.0,
                eval_tokens=40 * 2**19, compile=True),
    # Two CPU cores, 30 s. The 8192-way softmax/softcap dominates the cost per token, so the model is as small
    # as triage allows (n_embd 128: every block matrix has min side >= 64 and is measured) and steps are small
    # (1024 tokens) to get ~100+ optimizer steps. startup_steps=2: no compilation on CPU, only the first
    # calls' one-off allocation/kernel set-up to leave out. 32k eval tokens take a few seconds.
    "cpu": dict(preset="cpu", depth=2, aspect_ratio=64, head_dim=64, seq_len=256, device_batch_size=4,
                total_batch_size=1024, time_budget=30.0, step_budget=None, startup_steps=2, triage_time=6.0,
                eval_tokens=32768, compile=False),
    # Tests: a couple of seconds per run, reproducible (step budget).
    "tiny": dict(preset="tiny", depth=2, aspect_ratio=32, head_dim=32, seq_len=64, device_batch_size=8,
                 total_batch_size=512, time_budget=None, step_budget=20, startup_steps=1, triage_time=6,
                 eval_tokens=2048, compile=False),
}


def detect_device() -> str:
    """The best available device: cuda, then mps, else cpu."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def preset_config(preset: str | None = None, **overrides) -> TrainConfig:
    """A TrainConfig from a preset plus overrides (None -> the detected device's preset).

    Setting one budget in ``overrides`` clears the preset's other budget.

    Raises:
        ValueError: unknown preset or unknown field.
    """
    if preset is None:
        preset = "gpu" if detect_device() == "cuda" else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
    values = dict(PRESETS[preset])
    if overrides.get("step_budget") is not None and "time_budget" not in overrides:
        values["time_budget"] = None
    if overrides.get("time_budget") is not None and "step_budget" not in overrides:
        values["step_budget"] = None
    values.update(overrides)
    if values.get("cache_dir") is not None:
        values["cache_dir"] = Path(values["cache_dir"])
    return TrainConfig(**values)


__all__ = ["DEVICES", "PRESETS", "TrainConfig", "detect_device", "preset_config"]

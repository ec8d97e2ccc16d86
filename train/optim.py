"""Muon for the block matrices, AdamW for everything else, and autoresearch's schedules.

Muon (Keller Jordan et al.): Nesterov momentum on the gradient, then the update is replaced by its nearest
semi-orthogonal matrix, computed with a quintic Newton-Schulz iteration. Matrices of the same shape are stacked
and orthogonalised in one batched call. Weight decay on Muon matrices is *cautious* (only where the update and
the weight agree in sign) and decays linearly to zero with progress, as in autoresearch.

AdamW learning rates of the embeddings and the unembedding are scaled by 1/sqrt(n_embd / 768) (autoresearch
tuned them at width 768). ``matrix_optimizer="adamw"`` puts the block matrices under AdamW too (lr =
``matrix_lr``, decoupled, decaying weight decay): the ablation the evidence benchmark needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # config imports this module (MATRIX_OPTIMIZERS)
    from train.config import TrainConfig

# Quintic Newton-Schulz coefficients tuned for a steep slope at zero (Muon's published constants).
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5
MUON_MOMENTUM_START, MUON_MOMENTUM_END, MUON_MOMENTUM_RAMP_STEPS = 0.85, 0.95, 300
ADAM_EPS = 1e-10
MATRIX_OPTIMIZERS = ("muon", "adamw")


def orthogonalize(g: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """Approximate U V^T of each matrix in a stack [N, m, n] by Newton-Schulz iteration.

    Runs in bf16 on CUDA (fast and accurate enough, as in Muon) and fp32 elsewhere (CPU bf16 matmuls are slow).
    """
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation so the Gram matrix is the small one
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over groups of ``kind`` "muon" (same-shape matrices) or "adamw"."""

    def __init__(self, param_groups: list[dict]) -> None:
        super().__init__(param_groups, defaults={})
        for group in self.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group.setdefault("initial_weight_decay", group["weight_decay"])

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._step_muon(group)
            else:
                self._step_adamw(group)

    def _step_adamw(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            grad = p.grad.to(p.dtype)
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].lerp_(grad.square(), 1 - beta2)
            bias1 = 1 - beta1 ** state["step"]
            bias2 = 1 - beta2 ** state["step"]
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(ADAM_EPS)
            if wd:
                p.mul_(1 - lr * wd)
            p.sub_(state["exp_avg"] / denom * (lr / bias1))  # tensor arithmetic: a huge lr overflows to inf, no error

    def _step_muon(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        state = self.state[params[0]]
        grads = torch.stack([p.grad for p in params]).to(params[0].dtype)  # a copy: p.grad stays untouched
        if "momentum_buffer" not in state or state["momentum_buffer"].shape != grads.shape:
            state["momentum_buffer"] = torch.zeros_like(grads)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grads, 1 - momentum)
        update = orthogonalize(grads.lerp_(buf, momentum), group["ns_steps"]).to(grads.dtype)  # Nesterov
        rows, cols = params[0].shape
        # Orthogonal updates have RMS ~ 1/sqrt(max dim); the factor keeps tall matrices' steps comparable.
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        wd = group["weight_decay"]
        weights = torch.stack(params)
        decay = wd * weights * ((update * weights) >= 0) if wd else 0.0  # cautious weight decay
        weights.sub_(lr * (update + decay))
        torch._foreach_copy_(params, list(weights.unbind(0)))


def lr_multiplier(progress: float, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to ``final_lr_frac`` (progress in [0, 1])."""
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    if warmdown_ratio <= 0 or progress < 1.0 - warmdown_ratio:
        return 1.0
    remaining = max(0.0, 1.0 - progress) / warmdown_ratio
    return remaining + (1.0 - remaining) * final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon momentum ramps from 0.85 to 0.95 over the first 300 steps."""
    frac = min(step / MUON_MOMENTUM_RAMP_STEPS, 1.0)
    return (1 - frac) * MUON_MOMENTUM_START + frac * MUON_MOMENTUM_END


def apply_schedules(optimizer: MuonAdamW, progress: float, step: int, warmup_ratio: float,
                    warmdown_ratio: float, final_lr_frac: float) -> float:
    """Set every group's lr, Muon momentum and the decaying matrix weight decay; return the lr multiplier."""
    multiplier = lr_multiplier(progress, warmup_ratio, warmdown_ratio, final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * multiplier
        if group.get("matrix"):
            group["weight_decay"] = group["initial_weight_decay"] * (1.0 - progress)
        if group["kind"] == "muon":
            group["momentum"] = muon_momentum(step)
    return multiplier


def build_optimizer(model: nn.Module, config: TrainConfig) -> MuonAdamW:
    """Parameter groups for :class:`train.model.GPT`, following autoresearch's split.

    Raises:
        ValueError: unknown ``matrix_optimizer`` or a parameter that belongs to no group.
    """
    if config.matrix_optimizer not in MATRIX_OPTIMIZERS:
        raise ValueError(f"matrix_optimizer must be one of {', '.join(MATRIX_OPTIMIZERS)}, "
                         f"got {config.matrix_optimizer!r}")
    scale = (model.config.n_embd / 768) ** -0.5
    betas = (config.adam_beta1, config.adam_beta2)

    def adamw(params: list, lr: float, **extra) -> dict:
        return dict(kind="adamw", params=params, lr=lr, betas=extra.pop("betas", betas), weight_decay=0.0, **extra)

    groups = [
        adamw(list(model.lm_head.parameters()), config.unembedding_lr * scale),
        adamw(list(model.transformer.wte.parameters()), config.embedding_lr * scale),
        adamw(list(model.value_embeds.parameters()), config.embedding_lr * scale),
        adamw([model.resid_lambdas], config.scalar_lr * 0.01),
        adamw([model.x0_lambdas], config.scalar_lr, betas=(0.96, 0.95)),
    ]
    matrices = list(model.transformer.h.parameters())
    if config.matrix_optimizer == "adamw":
        groups.append(dict(kind="adamw", params=matrices, lr=config.matrix_lr, betas=betas,
                           weight_decay=config.weight_decay, matrix=True))
    else:
        for shape in sorted({tuple(p.shape) for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if tuple(p.shape) == shape],
                               lr=config.matrix_lr, momentum=MUON_MOMENTUM_START, ns_steps=NS_STEPS,
                               weight_decay=config.weight_decay, matrix=True))
    grouped = sum(len(g["params"]) for g in groups)
    if grouped != len(list(model.parameters())):
        raise ValueError("optimizer groups do not cover every model parameter exactly once")
    return MuonAdamW([g for g in groups if g["params"]])

"""Validation bits per byte, the fixed metric (autoresearch's definition).

    val_bpb = sum of per-token losses (nats) / (ln 2 * sum of the UTF-8 byte lengths of the target tokens)

Special tokens (byte length 0 in the token-bytes table) are excluded from both sums, so the number does not
depend on the vocabulary size or on how documents are delimited. The caller passes a *fresh* validation
iterator each time, so every call sees the same tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn


@torch.no_grad()
def evaluate_bpb(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                 token_bytes: torch.Tensor, num_tokens: int) -> float:
    """Bits per byte of ``model`` on the first ``num_tokens`` tokens of ``batches``.

    The number of batches is ``max(1, num_tokens // (B * T))`` with B, T from the first batch (whole batches
    only, as autoresearch does).

    Args:
        model: Called as ``model(x, y, reduction="none")``, returning per-token losses [B, T] in nats.
        batches: (inputs, targets) pairs of int64 [B, T].
        token_bytes: int tensor [vocab]: UTF-8 byte length of each token id, 0 for special tokens.
        num_tokens: How many target tokens to evaluate on (rounded down to whole batches, at least one).

    Returns:
        Bits per byte (float).

    Raises:
        ValueError: ``num_tokens`` <= 0, no batches, or no target bytes at all.
    """
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    total_nats = 0.0
    total_bytes = 0
    steps = None
    for done, (x, y) in enumerate(batches, start=1):
        if steps is None:
            steps = max(1, num_tokens // y.numel())
        losses = model(x, y, reduction="none").float().reshape(-1)
        targets = y.reshape(-1)
        nbytes = token_bytes.to(y.device)[targets.clamp_min(0)]
        counted = (nbytes > 0) & (targets >= 0)  # -1 is the ignore index
        total_nats += losses[counted].sum().item()
        total_bytes += int(nbytes[counted].sum().item())
        if done >= steps:
            break
    if steps is None:
        raise ValueError("no validation batches")
    if total_bytes == 0:
        raise ValueError("validation targets contain no bytes (only special tokens)")
    return total_nats / (math.log(2) * total_bytes)

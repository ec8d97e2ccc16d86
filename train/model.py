"""The GPT of autoresearch, written for PyTorch's SDPA attention on any device.

Architecture (as in karpathy/autoresearch): token embedding -> RMSNorm (no parameters) -> blocks -> RMSNorm ->
lm_head with a tanh logit softcap. Each block is pre-norm attention + relu^2 MLP. Attention uses rotary
embeddings, QK-norm, grouped-query heads (``n_kv_head`` <= ``n_head``), a per-layer sliding window taken from
``window_pattern`` ("S" = half the context, "L" = the full context; the last layer is always "L"), and on
alternating layers a *value embedding* (a second token embedding) mixed into the values through an
input-dependent per-head gate. Every layer re-mixes the normalised input embedding ``x0`` into the residual
stream with learned per-layer scalars.

The output projections of attention and MLP and the value-embedding gates start at zero, as in autoresearch:
each block starts as the identity. Their effective rank is undefined at init; the triage code handles that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Channels of the block input that drive the value-embedding gate (autoresearch uses 32).
VE_GATE_CHANNELS = 32
LOGIT_SOFTCAP = 15.0
ROPE_BASE = 10000.0


@dataclass
class GPTConfig:
    """Shape of the model.

    Attributes:
        sequence_len: Longest context the model is built for (rotary table and window masks).
        vocab_size: Tokenizer vocabulary size.
        n_layer: Number of transformer blocks.
        n_head: Query heads per attention layer.
        n_kv_head: Key/value heads (grouped-query attention); must divide ``n_head``.
        n_embd: Model width; a multiple of ``n_head``.
        window_pattern: Per-layer attention windows, repeated over the layers: "S" short, "L" long.
    """

    sequence_len: int = 2048
    vocab_size: int = 8192
    n_layer: int = 8
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 512
    window_pattern: str = "SSSL"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head dimension must be even for rotary embeddings")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty string of S and L")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def rms_norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learned gain (autoresearch keeps no norm parameters)."""
    return F.rms_norm(x, (x.size(-1),))


def has_value_embedding(layer: int, n_layer: int) -> bool:
    """Value embeddings sit on every other layer, always including the last one."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(config: GPTConfig) -> list[int]:
    """Per-layer attention window (how many earlier tokens a position may see)."""
    long_window, short_window = config.sequence_len, config.sequence_len // 2
    pattern = config.window_pattern.upper()
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    sizes[-1] = long_window  # the last layer always sees the whole context
    return sizes


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding on [B, T, H, D], rotating the two halves of the head dimension."""
    half = x.size(-1) // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    """Grouped-query causal attention with rotary, QK-norm, optional window and value-embedding gate."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        kv_dim = self.n_kv_head * self.head_dim
        self.c_q = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_k = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, kv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.gate_channels = min(VE_GATE_CHANNELS, config.n_embd)
        self.ve_gate = (nn.Linear(self.gate_channels, self.n_kv_head, bias=False)
                        if has_value_embedding(layer, config.n_layer) else None)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None and self.ve_gate is not None:
            # Gate in (0, 2), exactly 1 at init (zero weights): the value embedding starts fully mixed in.
            gate = 2.0 * torch.sigmoid(self.ve_gate(x[..., : self.gate_channels]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = rms_norm(rotate(q, cos, sin)), rms_norm(rotate(k, cos, sin))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    """4x-wide MLP with the relu^2 activation."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: GPTConfig, layer: int) -> None:
        super().__init__()
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x), ve, cos, sin, mask)
        return x + self.mlp(rms_norm(x))


class GPT(nn.Module):
    """autoresearch's GPT. Call :meth:`init_weights` after construction (or after ``to_empty``)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.windows = window_sizes(config)
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        kv_dim = config.n_kv_head * config.head_dim
        self.value_embeds = nn.ModuleDict({
            str(i): nn.Embedding(config.vocab_size, kv_dim)
            for i in range(config.n_layer) if has_value_embedding(i, config.n_layer)
        })
        cos, sin = self._rotary_tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        # One boolean mask per distinct short window (True = may attend); full windows use is_causal.
        for window in sorted(set(self.windows)):
            if window < config.sequence_len:
                self.register_buffer(f"mask_{window}", self._window_mask(window), persistent=False)

    def _rotary_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.head_dim
        inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        freqs = torch.outer(torch.arange(self.config.sequence_len, dtype=torch.float32), inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]

    def _window_mask(self, window: int) -> torch.Tensor:
        # Position i sees j when 0 <= i - j <= window, like FlashAttention's window_size=(window, 0).
        pos = torch.arange(self.config.sequence_len)
        distance = pos[:, None] - pos[None, :]
        return (distance >= 0) & (distance <= window)

    @torch.no_grad()
    def init_weights(self) -> None:
        """autoresearch's initialisation; output projections and value-embedding gates start at zero."""
        bound = math.sqrt(3.0) * self.config.n_embd ** -0.5  # uniform with std 1/sqrt(n_embd)
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.transformer.h:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -bound, bound)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.1)
        # Buffers are rebuilt too, so a model materialised with to_empty() is complete after this call.
        cos, sin = self._rotary_tables()
        self.cos.copy_(cos)
        self.sin.copy_(sin)
        for name, buffer in self.named_buffers():
            if name.startswith("mask_"):
                buffer.copy_(self._window_mask(int(name.removeprefix("mask_"))))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """Logits [B, T, V] without targets; otherwise the cross-entropy loss.

        Args:
            idx: Token ids [B, T], T <= sequence_len.
            targets: Next-token ids [B, T]; -1 is ignored.
            reduction: "mean" for a scalar loss, "none" for the per-token loss [B, T] (in nats).
        """
        B, T = idx.shape
        if T > self.config.sequence_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's sequence_len {self.config.sequence_len}")
        dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) \
            else self.cos.dtype
        cos, sin = self.cos[:, :T].to(dtype), self.sin[:, :T].to(dtype)
        masks = {w: getattr(self, f"mask_{w}")[:T, :T] for w in set(self.windows) if w < self.config.sequence_len}
        x = rms_norm(self.transformer.wte(idx))
        x0 = x
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = block(x, ve, cos, sin, masks.get(self.windows[i]))
        x = rms_norm(x)
        logits = self.lm_head(x).float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits * (1.0 / LOGIT_SOFTCAP))  # multiply: cheaper than divide
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1,
                               reduction=reduction)
        return loss.view(B, T) if reduction == "none" else loss

"""Structural metrics of a network's weight matrices: effective rank, snapshots, retention.

Effective rank follows Roy & Vetterli (2007): with singular values ``s`` and ``p = s / s.sum()``,
``erank = exp(-sum(p * log p))`` (``0 log 0 = 0``). It ranges from 1 (rank one) to ``min(shape)``
(all singular values equal) and ignores the matrix's scale.

Speed: matrices of the same shape and device are measured as one batch. On CPU the singular values
come from ``eigvalsh`` of the fp32 Gram matrix of the smaller side, which is several times faster than
``svdvals`` (see ``python -m optuna_triage.bench``). Squaring the matrix squares its condition number,
so every Gram result is checked a posteriori: when fp32 rounding could move the nuclear norm by more
than 0.1 % (low-rank matrices), that matrix is redone with an fp64 Gram, and if even that is not
certain, with ``svdvals``. The matrices of a batch are spread over torch's intra-op threads, each
running single-threaded LAPACK (the thread setting is restored afterwards). On CUDA ``svdvals`` is
used directly. Tensors never leave their device and no autograd graph is built.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "StructuralSnapshot",
    "effective_rank",
    "effective_ranks",
    "gradient_coherence",
    "rank_retention",
    "structural_snapshot",
]

# Largest fraction of the nuclear norm that rounding in the Gram path may plausibly move before the
# matrix is recomputed more exactly; well inside the 0.5 % agreement the benchmark demands.
_GRAM_TOLERANCE = 1e-3

_ZERO, _NON_FINITE, _MEASURED = "zero", "non_finite", "measured"


def _entropy_rank(s: torch.Tensor) -> torch.Tensor:
    """Roy & Vetterli effective rank of each row of non-negative singular values ``s`` [B, k]."""
    p = s / s.sum(dim=-1, keepdim=True)
    # 0 log 0 = 0: where p is zero the term is replaced, so log(0) never reaches the sum.
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0.0)
    return torch.exp(-plogp.sum(dim=-1))


def _gram_singular_values(batch: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ``batch`` [B, m, n] from the Gram matrix of its smaller side.

    Returns the values (descending order not guaranteed) and, per matrix, a bound on how far rounding
    may have moved their sum, as a fraction of that sum.
    """
    wide = batch.shape[-2] <= batch.shape[-1]
    side = batch if wide else batch.mT
    side = side.to(dtype)
    eig = torch.linalg.eigvalsh(side @ side.mT)
    k, inner = side.shape[-2], side.shape[-1]
    # Typical absolute eigenvalue error of a computed Gram matrix: sqrt(k + inner) * eps * lambda_max.
    err = math.sqrt(k + inner) * torch.finfo(dtype).eps * eig[..., -1:].clamp_min(0)
    # Rounding can push tiny eigenvalues below zero: clamp before the square root.
    s = eig.clamp_min(0).sqrt()
    # Eigenvalues inside the noise become sigmas of up to sqrt(err), always upwards (negatives are
    # clamped): a bias, summed. Resolved ones move by about err / (2 sigma) with either sign:
    # summed in quadrature. Checked against fp64 SVD on 120 spectra (power laws, exponential
    # decays, low rank with and without noise): accepted results erred by at most 1e-5.
    noise = eig <= err
    bias = torch.where(noise, err.sqrt(), 0.0).sum(dim=-1)
    spread = torch.where(noise, 0.0, err / (2 * s.clamp_min(1e-30))).square().sum(dim=-1).sqrt()
    bound = (bias + spread) / s.sum(dim=-1).clamp_min(1e-30)
    return s.to(torch.float32), bound


def _cpu_ranks(batch: torch.Tensor) -> torch.Tensor:
    """Effective ranks on CPU: fp32 Gram, redone in fp64 (then svdvals) where rounding may matter."""
    s, bound = _gram_singular_values(batch, torch.float32)
    redo = (bound > _GRAM_TOLERANCE).nonzero().flatten()
    if redo.numel():
        s64, bound64 = _gram_singular_values(batch[redo], torch.float64)
        s[redo] = s64
        still = redo[bound64 > _GRAM_TOLERANCE]
        if still.numel():
            s[still] = torch.linalg.svdvals(batch[still])
    return _entropy_rank(s)


def _parallel_cpu_ranks(batch: torch.Tensor) -> torch.Tensor:
    """Splits a CPU batch over the intra-op threads, one single-threaded LAPACK call stream each.

    LAPACK's eigensolvers scale poorly across threads at these sizes (and collapse when the cores
    are shared: OpenMP threads spin-wait on each other). Independent matrices on independent
    threads keep every core busy instead. The global torch thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    if threads < 2 or batch.shape[0] < 2:
        return _cpu_ranks(batch)
    chunks = batch.chunk(min(threads, batch.shape[0]))
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(chunks), thread_name_prefix="optuna-triage") as pool:
            parts = list(pool.map(_cpu_ranks, chunks))
    finally:
        torch.set_num_threads(threads)
    return torch.cat(parts)


def _batch_ranks(batch: torch.Tensor) -> torch.Tensor:
    """Effective ranks of a batch [B, m, n] of finite, non-zero fp32 matrices on one device."""
    if batch.device.type == "cuda":
        return _entropy_rank(torch.linalg.svdvals(batch))
    if batch.device.type != "cpu":
        # No eigvalsh/svdvals kernels on some backends (e.g. MPS): only the small Gram goes to CPU.
        gram = batch @ batch.mT if batch.shape[-2] <= batch.shape[-1] else batch.mT @ batch
        s = torch.linalg.eigvalsh(gram.cpu().double()).clamp_min(0).sqrt()
        return _entropy_rank(s).to(torch.float32).to(batch.device)
    return _parallel_cpu_ranks(batch)


def _measure(matrices: Sequence[torch.Tensor]) -> list[tuple[str, float]]:
    """Classify and measure every matrix: (status, effective rank or 0.0 / nan)."""
    out: list[tuple[str, float]] = [(_MEASURED, math.nan)] * len(matrices)
    groups: dict[tuple[tuple[int, ...], torch.device], list[int]] = {}
    for i, m in enumerate(matrices):
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(m).__name__}")
        if m.ndim != 2:
            raise ValueError(f"effective rank needs a 2-D matrix, got shape {tuple(m.shape)}")
        if m.is_complex():
            raise ValueError(f"complex matrices are not supported (dtype {m.dtype})")
        groups.setdefault((tuple(m.shape), m.device), []).append(i)
    with torch.no_grad():
        for (shape, _device), idx in groups.items():
            if 0 in shape:
                for i in idx:
                    out[i] = (_ZERO, 0.0)
                continue
            # Checks run in the widest dtype present, so a large finite fp64 matrix is not called
            # non-finite just because it would overflow fp32.
            wide = any(matrices[i].dtype == torch.float64 for i in idx)
            batch = torch.stack([matrices[i].detach().to(torch.float64 if wide else torch.float32)
                                 for i in idx])
            flat = batch.flatten(1)
            # Finiteness first: an SVD of inf/nan returns garbage or can take seconds.
            finite = torch.isfinite(flat).all(dim=1)
            scale = flat.abs().amax(dim=1)
            finite_l, nonzero_l = finite.tolist(), (scale > 0).tolist()
            keep = [j for j in range(len(idx)) if finite_l[j] and nonzero_l[j]]
            for j, i in enumerate(idx):
                if not finite_l[j]:
                    out[i] = (_NON_FINITE, math.nan)
                elif not nonzero_l[j]:
                    out[i] = (_ZERO, 0.0)
            if keep:
                sub = batch if len(keep) == len(idx) else batch[keep]
                # Effective rank ignores scale: dividing by the largest entry keeps the Gram matrix
                # of blown-up (or vanishing) weights inside fp32's range. bf16/fp16/fp64 weights
                # are all measured in fp32 from here on.
                sub = (sub / scale[keep].view(-1, 1, 1)).to(torch.float32)
                ranks = _batch_ranks(sub).tolist()
                for j, r in zip(keep, ranks):
                    out[idx[j]] = (_MEASURED, float(r))
    return out


def effective_rank(matrix: torch.Tensor) -> float:
    """Roy & Vetterli effective rank of one matrix.

    Args:
        matrix: A 2-D tensor of any floating dtype on any device.

    Returns:
        ``exp(H(p))`` with ``p = sigma / sum(sigma)``; ``0.0`` for an all-zero matrix (rank
        undefined) and ``nan`` for a matrix holding inf/nan (detected before any decomposition).

    Raises:
        ValueError: If ``matrix`` is not 2-D.
    """
    return effective_ranks([matrix])[0]


def effective_ranks(matrices: Sequence[torch.Tensor]) -> list[float]:
    """Effective ranks of many matrices, batched by shape and device.

    Args:
        matrices: 2-D tensors; bf16/fp16 ones are measured in fp32.

    Returns:
        One value per matrix, in order, with the conventions of :func:`effective_rank`.
    """
    return [value for _, value in _measure(list(matrices))]


@dataclass(frozen=True)
class StructuralSnapshot:
    """Effective ranks of a model's selected weight matrices at one moment.

    Attributes:
        ranks: Name -> effective rank of every measurable (finite, non-zero) selected matrix.
        sizes: Name -> ``min(shape)`` (the largest possible rank) of every selected matrix.
        zero: Selected matrices that are all zero (effective rank undefined, 0/0).
        non_finite: Selected matrices holding inf or nan.
    """

    ranks: Mapping[str, float] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)
    zero: tuple[str, ...] = ()
    non_finite: tuple[str, ...] = ()

    @property
    def mean_rank(self) -> float:
        """Mean effective rank; ``nan`` if any matrix is non-finite or none is measurable."""
        if self.non_finite or not self.ranks:
            return math.nan
        return sum(self.ranks.values()) / len(self.ranks)

    def filled_from(self, later: StructuralSnapshot) -> StructuralSnapshot:
        """Repairs a reference: zero matrices here that are measurable in ``later`` take its rank.

        Zero-initialised matrices (autoresearch's output projections) have no rank at init; a
        snapshot taken after the first steps supplies their reference value.
        """
        filled = {n: later.ranks[n] for n in self.zero if n in later.ranks}
        if not filled:
            return self
        return StructuralSnapshot(
            ranks={**self.ranks, **filled},
            sizes=dict(self.sizes),
            zero=tuple(n for n in self.zero if n not in filled),
            non_finite=self.non_finite,
        )


def _selected(
    model: nn.Module, min_dim: int, include: Sequence[str] | None, exclude: Sequence[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("include/exclude take a sequence of fnmatch patterns, not a single string")
    for name, param in model.named_parameters():
        if param.ndim != 2 or min(param.shape) < min_dim:
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        yield name, param


def structural_snapshot(
    model: nn.Module,
    *,
    min_dim: int = 64,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> StructuralSnapshot:
    """Measures every 2-D parameter of ``model`` with ``min(shape) >= min_dim``.

    Args:
        model: Any module; its parameters stay where they are.
        min_dim: Smaller matrices are skipped (their rank says little and they are many).
        include: fnmatch patterns on parameter names; if given, only matching ones are measured.
        exclude: fnmatch patterns of names to skip, e.g. ``("*wte*", "lm_head*")``.

    Returns:
        The snapshot; embeddings are included unless excluded.
    """
    named = list(_selected(model, min_dim, include, exclude))
    results = _measure([p for _, p in named])
    ranks: dict[str, float] = {}
    zero: list[str] = []
    non_finite: list[str] = []
    for (name, _), (status, value) in zip(named, results):
        if status == _MEASURED:
            ranks[name] = value
        elif status == _ZERO:
            zero.append(name)
        else:
            non_finite.append(name)
    sizes = {name: min(p.shape) for name, p in named}
    return StructuralSnapshot(ranks=ranks, sizes=sizes, zero=tuple(zero), non_finite=tuple(non_finite))


def rank_retention(current: StructuralSnapshot, reference: StructuralSnapshot) -> float:
    """Mean effective rank now relative to the reference, over matrices measurable in both.

    Compared names are those measurable in ``reference`` and selected in ``current``; a matrix that
    has become all zero counts as rank 0 (a total collapse). 1.0 means unchanged.

    Returns:
        ``mean(current) / mean(reference)``; ``nan`` only when ``current`` holds non-finite weights
        or no matrix is comparable (e.g. disjoint selections).
    """
    if current.non_finite:
        return math.nan
    names = [n for n in reference.ranks if n in current.ranks or n in current.zero]
    if not names:
        return math.nan
    now = sum(current.ranks.get(n, 0.0) for n in names)
    then = sum(reference.ranks[n] for n in names)
    return now / then


def gradient_coherence(
    model: nn.Module,
    *,
    min_dim: int = 64,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> float:
    """Mean cosine similarity between the gradients of consecutive same-shaped matrices.

    The selected matrices (as in :func:`structural_snapshot`) are grouped by shape; within a group,
    each matrix is paired with the next one in module order (e.g. layer ``i``'s MLP input with layer
    ``i + 1``'s). Pairs where either gradient is missing or all zero are skipped.

    Returns:
        The mean cosine in [-1, 1]; ``nan`` if no pair has gradients or any compared gradient holds
        inf/nan.
    """
    by_shape: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for _, param in _selected(model, min_dim, include, exclude):
        by_shape.setdefault(tuple(param.shape), []).append(param)
    cosines: list[float] = []
    with torch.no_grad():
        for params in by_shape.values():
            for a, b in zip(params, params[1:]):
                if a.grad is None or b.grad is None or a.grad.device != b.grad.device:
                    continue
                ga, gb = a.grad.flatten().float(), b.grad.flatten().float()
                # Checked per pair so a diverged run reads as nan, not as a plausible mean.
                if not bool(torch.isfinite(ga).all() and torch.isfinite(gb).all()):
                    return math.nan
                norm = float(ga.norm() * gb.norm())
                if norm > 0:
                    cosines.append(min(1.0, max(-1.0, float(ga @ gb) / norm)))
    return sum(cosines) / len(cosines) if cosines else math.nan

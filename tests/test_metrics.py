"""Tests for optuna_triage._metrics: effective rank, snapshots, retention, gradient coherence."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from torch import nn

from optuna_triage import (
    StructuralSnapshot,
    effective_rank,
    effective_ranks,
    gradient_coherence,
    rank_retention,
    structural_snapshot,
)


def _reference_rank(matrix: torch.Tensor) -> float:
    """The definition, computed the slow exact way (fp64 SVD)."""
    s = torch.linalg.svdvals(matrix.double())
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def _with_spectrum(rows: int, cols: int, spectrum: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))
    return (u * spectrum.double()) @ v.T


def _low_rank(rows: int, cols: int, rank: int, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g)
    return m + noise * torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize("n", [64, 100, 256])
def test_effective_rank_identity_is_n(n: int) -> None:
    assert effective_rank(torch.eye(n)) == pytest.approx(n, rel=1e-4)


@pytest.mark.parametrize("shape", [(64, 64), (80, 200), (300, 70)])
def test_effective_rank_rank_one_is_one(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    assert effective_rank(m) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("n", [64, 128])
def test_effective_rank_orthogonal_is_n(n: int) -> None:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(2)))
    assert effective_rank(q) == pytest.approx(n, rel=1e-4)


def test_effective_rank_is_scale_invariant() -> None:
    m = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    assert effective_rank(1e4 * m) == pytest.approx(effective_rank(m), rel=1e-4)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e-12, 1e-9, 1e9, 1e12, 1e20, 1e30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_effective_rank_extreme_scales_stay_exact(scale: float, dtype: torch.dtype) -> None:
    # The Gram matrix of such weights would underflow/overflow fp32 without normalisation
    # (1e-9/1e9 sit inside the range used as is, 1e-12/1e12 just outside it).
    m = torch.randn(96, 128, generator=torch.Generator().manual_seed(3)).to(dtype)
    assert effective_rank(scale * m) == pytest.approx(effective_rank(m), rel=1e-4)


def test_effective_rank_large_fp64_is_finite() -> None:
    m = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert effective_rank(1e300 * m) == pytest.approx(_reference_rank(m), rel=5e-3)


def test_effective_rank_zero_matrix_is_zero() -> None:
    assert effective_rank(torch.zeros(64, 128)) == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [(0, 0), (3, 5), (-1, -1), (-1, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_effective_rank_non_finite_is_nan(bad: float, where: tuple[int, int], dtype: torch.dtype) -> None:
    # The first and last entries too: the check is a vectorised min/max whose tail is handled apart.
    m = torch.randn(96, 70).to(dtype)
    m[where] = bad
    assert math.isnan(effective_rank(m))
    assert math.isnan(effective_ranks([torch.randn(96, 70), m])[1])


def test_effective_rank_integer_matrix_is_measured() -> None:
    assert effective_rank(torch.eye(64, dtype=torch.int64)) == pytest.approx(64, rel=1e-4)


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4), ()])
def test_effective_rank_rejects_non_matrices(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.ones(shape))


# Spectra that stress the fp32 Gram path: flat, decaying, low-rank, low-rank plus tiny noise.
_SPECTRA = {
    "gaussian_square": lambda: torch.randn(256, 256, generator=torch.Generator().manual_seed(4)),
    "gaussian_wide": lambda: torch.randn(128, 512, generator=torch.Generator().manual_seed(5)),
    "gaussian_tall": lambda: torch.randn(1024, 96, generator=torch.Generator().manual_seed(6)),
    "power_law": lambda: _with_spectrum(256, 512, torch.arange(1, 257.0) ** -1.5),
    "exp_decay": lambda: _with_spectrum(200, 200, torch.exp(-torch.arange(200.0) / 10)),
    "rank5": lambda: _low_rank(256, 512, 5),
    "rank5_noise": lambda: _low_rank(256, 512, 5, noise=1e-3),
    "rank50_tall": lambda: _low_rank(1024, 128, 50),
}


@pytest.mark.parametrize("name", sorted(_SPECTRA))
def test_effective_rank_agrees_with_fp64_svd(name: str) -> None:
    m = _SPECTRA[name]().float()
    assert effective_rank(m) == pytest.approx(_reference_rank(m), rel=5e-3)


def test_effective_ranks_batched_equals_single() -> None:
    g = torch.Generator().manual_seed(7)
    mats = [torch.randn(64, 96, generator=g) for _ in range(3)]
    mats += [_low_rank(96, 64, 3), torch.zeros(64, 96), torch.randn(128, 64, generator=g)]
    mats[1][0, 0] = math.nan
    batched = effective_ranks(mats)
    single = [effective_rank(m) for m in mats]
    assert len(batched) == len(mats)
    for b, s in zip(batched, single):
        assert (math.isnan(b) and math.isnan(s)) or b == pytest.approx(s, rel=1e-5)
    assert batched[4] == 0.0 and math.isnan(batched[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_effective_rank_accepts_other_dtypes(dtype: torch.dtype) -> None:
    m = torch.randn(128, 64, generator=torch.Generator().manual_seed(8)).to(dtype)
    assert effective_rank(m) == pytest.approx(_reference_rank(m.float()), rel=5e-3)


@pytest.mark.parametrize("tolerance", [0.0, 1e-3, 1.0])
def test_effective_ranks_every_fallback_path_agrees(monkeypatch, tolerance: float) -> None:
    # tolerance 0 forces fp32 -> fp64 -> svdvals for every matrix; 1.0 keeps the fp32 Gram result.
    import optuna_triage._metrics as metrics

    monkeypatch.setattr(metrics, "_GRAM_TOLERANCE", tolerance)
    mats = [_SPECTRA[name]().float() for name in ("gaussian_square", "exp_decay", "power_law")]
    for got, m in zip(effective_ranks(mats), mats):
        assert got == pytest.approx(_reference_rank(m), rel=5e-3)


# Low-rank, near-low-rank and decaying spectra: the cases where the fp32 Gram loses the small
# singular values (below ~sqrt(eps) * sigma_max) and the check must send the matrix to fp64.
_HARD = {
    "rank1_exact": lambda: _low_rank(512, 512, 1),
    "rank8_exact": lambda: _low_rank(256, 1024, 8),
    "rank64_exact": lambda: _low_rank(1024, 256, 64),
    "rank8_noise1e-6": lambda: _low_rank(512, 512, 8, noise=1e-6),
    "rank8_noise1e-3": lambda: _low_rank(512, 512, 8, noise=1e-3),
    "rank64_noise1e-2": lambda: _low_rank(256, 512, 64, noise=1e-2),
    "power_1": lambda: _with_spectrum(512, 512, torch.arange(1, 513.0) ** -1.0),
    "power_3": lambda: _with_spectrum(128, 512, torch.arange(1, 129.0) ** -3.0),
    "exp_decay_fast": lambda: _with_spectrum(256, 256, torch.exp(-torch.arange(256.0) / 5)),
    "two_levels": lambda: _with_spectrum(512, 256, torch.where(torch.arange(256) < 32, 1.0, 1e-3)),
}


@pytest.mark.parametrize("name", sorted(_HARD))
def test_effective_rank_hard_spectra_agree_with_fp64_svd(name: str) -> None:
    m = _HARD[name]().float()
    assert effective_rank(m) == pytest.approx(_reference_rank(m), rel=5e-3)


@pytest.mark.parametrize("name", sorted(_SPECTRA) + sorted(_HARD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_uncertainty_covers_its_error(name: str, dtype: torch.dtype) -> None:
    # The a posteriori check is only sound if the uncertainty it reports bounds the real error.
    from optuna_triage._metrics import _gram_rank

    m = {**_SPECTRA, **_HARD}[name]().float()
    m = m / m.abs().max()
    rank, uncertainty = _gram_rank(m, dtype)
    assert abs(rank / _reference_rank(m) - 1) <= max(uncertainty, 1e-6)


@pytest.mark.parametrize("shape", [(100, 300), (256, 256), (301, 700), (515, 1030)])
def test_lower_gram_has_the_full_grams_spectrum(shape: tuple[int, int]) -> None:
    # Only the lower triangle is computed (uneven row blocks for odd sizes); eigvalsh reads no more.
    from optuna_triage._metrics import _lower_gram

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    gram = _lower_gram(x)
    assert (gram[0, -1] == 0) == (shape[0] >= 256)  # the block above the diagonal was skipped
    assert torch.allclose(gram.tril(), (x @ x.mT).tril(), rtol=1e-12, atol=1e-9)
    assert torch.allclose(torch.linalg.eigvalsh(gram), torch.linalg.eigvalsh(x @ x.mT), rtol=1e-10, atol=1e-8)


def test_gram_fp32_cannot_resolve_a_faint_tail() -> None:
    # Why small Gram eigenvalues are not simply cut to zero: rank 8 with and without a 1e-3
    # noise floor have the same resolved fp32 spectrum, yet effective ranks 3 % apart. The check
    # must flag both rather than guess.
    from optuna_triage._metrics import _GRAM_TOLERANCE, _gram_rank

    clean, noisy = _low_rank(512, 512, 8, seed=3), _low_rank(512, 512, 8, noise=1e-3, seed=3)
    assert _reference_rank(noisy) / _reference_rank(clean) - 1 > 0.02
    for m in (clean, noisy):
        assert _gram_rank(m / m.abs().max(), torch.float32)[1] > _GRAM_TOLERANCE
        assert _gram_rank(m / m.abs().max(), torch.float64)[1] <= _GRAM_TOLERANCE


def test_effective_ranks_threads_do_not_change_results() -> None:
    mats = [_SPECTRA[n]().float() for n in sorted(_SPECTRA)] + [_HARD["rank8_noise1e-3"]().float()]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = effective_ranks(mats)
        torch.set_num_threads(2)
        threaded = effective_ranks(mats)
    finally:
        torch.set_num_threads(before)
    assert threaded == single


def test_effective_ranks_restores_thread_count() -> None:
    before = torch.get_num_threads()
    effective_ranks([torch.randn(64, 64) for _ in range(5)])
    assert torch.get_num_threads() == before


def test_effective_rank_of_parameter_builds_no_graph() -> None:
    p = nn.Parameter(torch.randn(64, 64))
    assert effective_rank(p) > 1.0
    assert p.grad is None


class _Net(nn.Module):
    """Two blocks of same-shaped matrices plus an embedding and small/1-D parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(300, 64)
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(64, 128)
        self.proj = nn.Linear(128, 64, bias=False)
        self.small = nn.Linear(64, 8)
        nn.init.zeros_(self.proj.weight)


def test_structural_snapshot_selects_and_classifies() -> None:
    net = _Net()
    snap = structural_snapshot(net)
    assert set(snap.sizes) == {"wte.weight", "fc1.weight", "fc2.weight", "proj.weight"}
    assert snap.zero == ("proj.weight",)
    assert set(snap.ranks) == {"wte.weight", "fc1.weight", "fc2.weight"}
    assert snap.sizes["wte.weight"] == 64 and snap.non_finite == ()
    assert snap.mean_rank == pytest.approx(sum(snap.ranks.values()) / 3)


@pytest.mark.parametrize(
    ("include", "exclude", "expected"),
    [
        (None, ("wte*",), {"fc1.weight", "fc2.weight", "proj.weight"}),
        (("fc*",), (), {"fc1.weight", "fc2.weight"}),
        (("fc*",), ("fc2*",), {"fc1.weight"}),
        (("nothing*",), (), set()),
    ],
)
def test_structural_snapshot_filters(include, exclude, expected) -> None:
    assert set(structural_snapshot(_Net(), include=include, exclude=exclude).sizes) == expected


def test_structural_snapshot_min_dim() -> None:
    assert "small.weight" in structural_snapshot(_Net(), min_dim=8).sizes
    assert len(structural_snapshot(_Net(), min_dim=64).sizes) == 4
    assert structural_snapshot(_Net(), min_dim=65).sizes == {}


def test_structural_snapshot_rejects_bare_string_pattern() -> None:
    with pytest.raises(TypeError, match="sequence"):
        structural_snapshot(_Net(), exclude="wte*")


def test_structural_snapshot_non_finite_listed_and_mean_nan() -> None:
    net = _Net()
    with torch.no_grad():
        net.fc1.weight[0, 0] = math.inf
    snap = structural_snapshot(net)
    assert snap.non_finite == ("fc1.weight",)
    assert "fc1.weight" not in snap.ranks
    assert math.isnan(snap.mean_rank)


def test_structural_snapshot_is_picklable() -> None:
    snap = structural_snapshot(_Net())
    assert pickle.loads(pickle.dumps(snap)) == snap


def test_filled_from_repairs_zero_reference() -> None:
    net = _Net()
    ref = structural_snapshot(net)
    with torch.no_grad():
        net.proj.weight.normal_()
    later = structural_snapshot(net)
    fixed = ref.filled_from(later)
    assert fixed.zero == ()
    assert fixed.ranks["proj.weight"] == later.ranks["proj.weight"]
    assert fixed.ranks["fc1.weight"] == ref.ranks["fc1.weight"]
    assert ref.filled_from(ref) is ref


def test_rank_retention_identical_is_one() -> None:
    snap = structural_snapshot(_Net())
    assert rank_retention(snap, snap) == pytest.approx(1.0)


def test_rank_retention_collapse_and_zero_now() -> None:
    ref = StructuralSnapshot(ranks={"a": 40.0, "b": 20.0}, sizes={"a": 64, "b": 64})
    half = StructuralSnapshot(ranks={"a": 20.0, "b": 10.0}, sizes={"a": 64, "b": 64})
    zeroed = StructuralSnapshot(ranks={"a": 30.0}, sizes={"a": 64, "b": 64}, zero=("b",))
    assert rank_retention(half, ref) == pytest.approx(0.5)
    assert rank_retention(zeroed, ref) == pytest.approx(30.0 / 60.0)


def test_rank_retention_ignores_unmeasurable_reference_entries() -> None:
    ref = StructuralSnapshot(ranks={"a": 40.0}, sizes={"a": 64, "z": 64}, zero=("z",))
    now = StructuralSnapshot(ranks={"a": 20.0, "z": 50.0}, sizes={"a": 64, "z": 64})
    assert rank_retention(now, ref) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "current",
    [
        StructuralSnapshot(ranks={"a": 1.0}, sizes={"a": 64, "b": 64}, non_finite=("b",)),
        StructuralSnapshot(ranks={"c": 1.0}, sizes={"c": 64}),
        StructuralSnapshot(),
    ],
)
def test_rank_retention_nan_cases(current: StructuralSnapshot) -> None:
    ref = StructuralSnapshot(ranks={"a": 4.0, "b": 4.0}, sizes={"a": 64, "b": 64})
    assert math.isnan(rank_retention(current, ref))


def _set_grads(net: _Net, g1: torch.Tensor, g2: torch.Tensor) -> None:
    net.fc1.weight.grad = g1.clone()
    net.fc2.weight.grad = g2.clone()


@pytest.mark.parametrize(("sign", "expected"), [(1.0, 1.0), (-1.0, -1.0), (2.5, 1.0)])
def test_gradient_coherence_identical_and_opposite(sign: float, expected: float) -> None:
    net = _Net()
    g = torch.randn(128, 64)
    _set_grads(net, g, sign * g)
    assert gradient_coherence(net) == pytest.approx(expected, abs=1e-5)


def test_gradient_coherence_orthogonal_near_zero() -> None:
    net = _Net()
    g1 = torch.zeros(128, 64)
    g2 = torch.zeros(128, 64)
    g1[0], g2[1] = 1.0, 1.0
    _set_grads(net, g1, g2)
    assert gradient_coherence(net) == pytest.approx(0.0, abs=1e-6)


def test_gradient_coherence_nan_cases() -> None:
    net = _Net()
    assert math.isnan(gradient_coherence(net))  # no gradients at all
    _set_grads(net, torch.zeros(128, 64), torch.randn(128, 64))
    assert math.isnan(gradient_coherence(net))  # the only pair has a zero gradient
    bad = torch.randn(128, 64)
    bad[0, 0] = math.nan
    _set_grads(net, bad, torch.randn(128, 64))
    assert math.isnan(gradient_coherence(net))


def test_gradient_coherence_from_backward() -> None:
    net = _Net()
    x = torch.randn(16, 64)
    (net.fc1(x).sum() + net.fc2(x).sum()).backward()
    # Both layers see the same input and the same upstream gradient: identical gradients.
    assert gradient_coherence(net) == pytest.approx(1.0, abs=1e-5)

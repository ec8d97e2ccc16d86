"""Benchmark: structural_snapshot against a plain per-matrix ``torch.linalg.svdvals`` loop.

Run: ``python -m optuna_triage.bench``. Builds the weight matrices of autoresearch's depth-8 GPT
(d=512: per layer c_q, c_k, c_v, c_proj 512x512, mlp c_fc 2048x512, mlp c_proj 512x2048; plus the
8192x512 token embedding and lm_head), times both ways in one run (median of ``--repeats``),
checks every effective rank agrees within 0.5 %, and prints the ratio. Some layers are made low
rank and some get a decaying spectrum, so agreement is checked across spectra, not only on
random matrices (which the Gram shortcut finds easiest). It also prints which way each matrix
was measured (fp32 Gram, fp64 Gram, svdvals) and, per shape, the time the snapshot would take if
every fp32 Gram result were accepted unchecked: the ceiling of the Gram method on this machine
(those unchecked ranks are wrong by up to 3 % on the low-rank layers; they are timed, never used).
Then, if the ``train`` package is importable, it times one optimizer step of the ``--preset cpu``
model and prints the snapshot's cost as a fraction of it. Exit status 1 if the ranks disagree.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from optuna_triage import _metrics
from optuna_triage._metrics import _entropy_rank, effective_ranks, structural_snapshot

TOLERANCE = 5e-3  # relative agreement required between the two ways


def build_gpt_matrices(depth: int = 8, dim: int = 512, vocab: int = 8192, seed: int = 0) -> nn.Module:
    """A module holding the 2-D weights of an autoresearch GPT, with varied spectra.

    Layers ``depth // 4`` and ``depth // 2`` are low rank (8 and 64) plus faint noise; layer
    ``3 * depth // 4`` has a power-law spectrum; the rest are Gaussian as at init.
    """
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn.c_q": (dim, dim), "attn.c_k": (dim, dim), "attn.c_v": (dim, dim),
              "attn.c_proj": (dim, dim), "mlp.c_fc": (4 * dim, dim), "mlp.c_proj": (dim, 4 * dim)}
    special = {depth // 4: ("low_rank", 8), depth // 2: ("low_rank", 64), 3 * depth // 4: ("power", 1.0)}
    params: dict[str, nn.Parameter] = {}
    for layer in range(depth):
        kind, arg = special.get(layer, ("gaussian", 0))
        for name, (rows, cols) in shapes.items():
            if kind == "low_rank":
                m = torch.randn(rows, arg, generator=g) @ torch.randn(arg, cols, generator=g)
                m += 1e-3 * torch.randn(rows, cols, generator=g)
            elif kind == "power":
                k = min(rows, cols)
                u, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
                v, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
                m = (u * torch.arange(1, k + 1.0) ** -arg) @ v.T
            else:
                m = torch.randn(rows, cols, generator=g)
            params[f"h.{layer}.{name}".replace(".", "_")] = nn.Parameter(m / cols**0.5)
    params["wte"] = nn.Parameter(torch.randn(vocab, dim, generator=g))
    params["lm_head"] = nn.Parameter(0.001 * torch.randn(vocab, dim, generator=g))
    module = nn.Module()
    for name, p in params.items():
        module.register_parameter(name, p)
    return module


def svdvals_loop_one(matrix: torch.Tensor) -> float:
    """Effective rank of one matrix the plain way: fp32 ``svdvals``."""
    with torch.no_grad():
        return float(_entropy_rank(torch.linalg.svdvals(matrix.float())[None])[0])


def svdvals_loop(model: nn.Module) -> dict[str, float]:
    """What the original proposal does: one ``svdvals`` per matrix, same effective-rank formula."""
    return {name: svdvals_loop_one(p) for name, p in model.named_parameters()
            if p.ndim == 2 and min(p.shape) >= 64}


def measurement_paths(model: nn.Module) -> Counter[str]:
    """How many matrices the snapshot measures with an fp32 Gram, an fp64 Gram, or svdvals."""
    paths: Counter[str] = Counter()
    with torch.no_grad():
        for p in model.parameters():
            a = p.detach().float()
            scale = float(a.abs().max())
            if not 0 < scale < math.inf:
                continue  # zero or non-finite: no decomposition at all
            a = a / scale
            if _metrics._gram_rank(a, torch.float32)[1] <= _metrics._GRAM_TOLERANCE:
                paths["fp32 Gram"] += 1
            elif _metrics._gram_rank(a, torch.float64)[1] <= _metrics._GRAM_TOLERANCE:
                paths["fp64 Gram"] += 1
            else:
                paths["svdvals"] += 1
    return paths


@contextmanager
def unchecked_fp32() -> Iterator[None]:
    """Accept every fp32 Gram result (no fallback): for timing the method's ceiling only."""
    saved = _metrics._GRAM_TOLERANCE
    _metrics._GRAM_TOLERANCE = math.inf
    try:
        yield
    finally:
        _metrics._GRAM_TOLERANCE = saved


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _by_shape(model: nn.Module) -> dict[tuple[int, ...], list[str]]:
    groups: dict[tuple[int, ...], list[str]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(tuple(p.shape), []).append(name)
    return groups


def _shape_seconds(params: list[nn.Parameter], repeats: int) -> tuple[float, float, float]:
    """Median seconds of the svdvals loop, the snapshot and its unchecked fp32 ceiling on ``params``."""
    loop = statistics.median(_seconds(lambda: [svdvals_loop_one(p) for p in params]) for _ in range(repeats))
    snap = statistics.median(_seconds(lambda: effective_ranks(params)) for _ in range(repeats))
    with unchecked_fp32():
        ceiling = statistics.median(_seconds(lambda: effective_ranks(params)) for _ in range(repeats))
    return loop, snap, ceiling


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: first-call allocations and library initialisation are not the steady state
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def train_step_fraction(snapshot_seconds_fn: Callable[[nn.Module], float], repeats: int) -> str:
    """Times one optimizer step of the ``--preset cpu`` model; '' if ``train`` is unavailable."""
    try:  # imported lazily: optuna_triage never depends on the GPT code
        from train.loop import preset_config
        from train.model import GPT
        from train.optim import build_optimizer
    except ImportError as exc:
        return f"train step: skipped (train package not importable: {exc})"
    cfg = preset_config("cpu", device="cpu")
    vocab = 8192  # the prepared tokenizer's default size
    model = GPT(cfg.gpt_config(vocab))
    model.init_weights()
    opt = build_optimizer(model, cfg)
    accum = max(1, cfg.total_batch_size // (cfg.device_batch_size * cfg.seq_len))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (cfg.device_batch_size, cfg.seq_len), generator=g)
    y = torch.randint(0, vocab, (cfg.device_batch_size, cfg.seq_len), generator=g)

    def step() -> None:
        for _ in range(accum):
            (model(x, y) / accum).backward()
        opt.step()
        model.zero_grad(set_to_none=True)

    step_s = _median_seconds(step, repeats)
    snap_s = snapshot_seconds_fn(model)
    n = len(structural_snapshot(model).sizes)
    return (f"train step (--preset cpu: depth {cfg.depth}, n_embd {cfg.n_embd}, {accum} micro-batch(es) of "
            f"{cfg.device_batch_size}x{cfg.seq_len}): {step_s * 1e3:.0f} ms; snapshot of its {n} matrices: "
            f"{snap_s * 1e3:.1f} ms = {snap_s / step_s:.2f} of one step")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m optuna_triage.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median; default 5)")
    parser.add_argument("--depth", type=int, default=8, help="GPT depth (default 8: 48 block matrices)")
    parser.add_argument("--dim", type=int, default=512, help="model width (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random matrices")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both methods (default: torch's choice)")
    parser.add_argument("--no-train-step", action="store_true", help="skip the training-step comparison")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.depth < 1 or args.dim < 64:
        parser.error(f"--depth must be >= 1 and --dim >= 64, got {args.depth} and {args.dim}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests)


def _run(args: argparse.Namespace) -> int:
    model = build_gpt_matrices(args.depth, args.dim, seed=args.seed)
    n = sum(1 for p in model.parameters())
    print(f"{n} matrices (depth {args.depth}, d={args.dim}, + wte/lm_head 8192x{args.dim}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    loop_ranks = svdvals_loop(model)
    snap = structural_snapshot(model)
    worst_name = max(loop_ranks, key=lambda k: abs(snap.ranks[k] / loop_ranks[k] - 1))
    worst = abs(snap.ranks[worst_name] / loop_ranks[worst_name] - 1)
    # Alternate the two ways so a change in machine load hits both; the ratio is the median of the
    # per-repeat ratios, each measured back to back.
    svdvals_loop(model), structural_snapshot(model)  # warm-up
    pairs = [(_seconds(lambda: svdvals_loop(model)), _seconds(lambda: structural_snapshot(model)))
             for _ in range(args.repeats)]
    loop_s = statistics.median(a for a, _ in pairs)
    snap_s = statistics.median(b for _, b in pairs)
    print(f"svdvals loop:         {loop_s * 1e3:8.1f} ms")
    print(f"structural_snapshot:  {snap_s * 1e3:8.1f} ms")
    print(f"speed-up:             {statistics.median(a / b for a, b in pairs):8.2f}x "
          f"(per repeat: {', '.join(f'{a / b:.2f}' for a, b in pairs)})")
    with unchecked_fp32():
        ceiling_s = statistics.median(_seconds(lambda: structural_snapshot(model)) for _ in range(args.repeats))
    print(f"ceiling, every fp32 Gram accepted unchecked (not exact, timing only): {ceiling_s * 1e3:.1f} ms = "
          f"{loop_s / ceiling_s:.2f}x")
    print("paths: " + ", ".join(f"{n} {path}" for path, n in sorted(measurement_paths(model).items())))
    print(f"  {'per shape (median, ms)':<22} {'svdvals loop':>12} {'snapshot':>17} {'fp32 ceiling':>17}")
    named = dict(model.named_parameters())
    for shape, names in _by_shape(model).items():
        lo, sn, ce = _shape_seconds([named[n] for n in names], args.repeats)
        label = f"{len(names)} x {shape[0]}x{shape[1]}"
        print(f"  {label:<22} {lo * 1e3:12.1f} {sn * 1e3:9.1f} {lo / sn:6.2f}x {ce * 1e3:9.1f} {lo / ce:6.2f}x")
    ok = worst <= TOLERANCE
    print(f"worst rank disagreement: {worst * 100:.3f} % ({worst_name}: {snap.ranks[worst_name]:.2f} vs "
          f"{loop_ranks[worst_name]:.2f}) -> {'OK' if ok else 'FAIL'} (limit {TOLERANCE * 100:.1f} %)")
    if not args.no_train_step:
        print(train_step_fraction(
            lambda m: _median_seconds(lambda: structural_snapshot(m), args.repeats), args.repeats))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

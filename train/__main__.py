"""python -m train: one training run, ending with autoresearch's greppable summary after a ``---`` line.

Exit status: 0 done, 1 FAIL (divergence) or triage kill, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import types
import typing

from train.config import DEVICES, PRESETS, TrainConfig
from train.optim import MATRIX_OPTIMIZERS

# Summary keys in print order; the triage ones are left out when --triage-time is 0.
SUMMARY_KEYS = ("val_bpb", "training_seconds", "total_seconds", "peak_memory_mb", "num_steps", "num_params_M",
                "depth", "tokens_per_sec", "eff_rank_init", "eff_rank_final", "rank_retention", "grad_coherence")
TRIAGE_KEYS = ("eff_rank_init", "eff_rank_final", "rank_retention", "grad_coherence")
_FORMATS = {"val_bpb": "{:.6f}", "training_seconds": "{:.1f}", "total_seconds": "{:.1f}",
            "peak_memory_mb": "{:.1f}", "num_steps": "{}", "num_params_M": "{:.2f}", "depth": "{}",
            "tokens_per_sec": "{:.0f}", "eff_rank_init": "{:.2f}", "eff_rank_final": "{:.2f}",
            "rank_retention": "{:.4f}", "grad_coherence": "{:.4f}"}
_HELP = {
    "preset": f"preset ({', '.join(PRESETS)}); default: gpu on CUDA, else cpu",
    "device": f"device ({', '.join(DEVICES)}); default auto",
    "time_budget": "training seconds (default unless --step-budget; excludes start-up and the first steps)",
    "step_budget": "optimizer steps instead of seconds (reproducible)",
    "triage_time": "triage checkpoint in the budget's unit; 0 disables triage output",
    "triage_kill": "kill (exit 1) when rank retention at the checkpoint is below this fraction in (0, 1]",
    "measure_every": "extra retention measurements every N budget units (default budget/10)",
    "matrix_optimizer": f"optimizer for block matrices ({', '.join(MATRIX_OPTIMIZERS)})",
    "threads": "CPU threads (default: one per core); 1 is far faster on a machine busy with other work",
    "cache_dir": "prepared data (default: $OPTUNA_TRIAGE_CACHE, else ~/.cache/optuna-triage)",
    "seed": "seed of the weights and the data order",
    "depth": "transformer layers",
    "aspect_ratio": "model width per layer (n_embd = depth x aspect ratio, rounded up to whole heads)",
    "head_dim": "attention head width",
    "n_kv_head": "key/value heads (grouped-query attention); 0 = one per query head",
    "window_pattern": "sliding-window pattern over layers, S = half context, L = full (last layer always L)",
    "seq_len": "context length in tokens",
    "device_batch_size": "rows per micro-batch",
    "total_batch_size": "tokens per optimizer step (gradient accumulation makes up the rest)",
    "matrix_lr": "learning rate of the block matrices (Muon, or AdamW with --matrix-optimizer adamw)",
    "embedding_lr": "AdamW learning rate of the token and value embeddings",
    "unembedding_lr": "AdamW learning rate of lm_head",
    "scalar_lr": "AdamW learning rate of the per-layer residual scalars",
    "weight_decay": "weight decay of the block matrices, decaying linearly to 0 over the run",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "warmup_ratio": "fraction of the budget spent warming the learning rate up",
    "warmdown_ratio": "fraction of the budget spent decaying the learning rate at the end",
    "final_lr_frac": "learning rate at the end, as a fraction of the peak",
    "startup_steps": "first steps not counted against a time budget (warm-up, compilation)",
    "eval_tokens": "validation tokens of the final val_bpb (fixed per preset)",
    "compile": "torch.compile the model (CUDA only)",
    "log_every": "print a step line every N steps",
}


def _help(name: str) -> str:
    """A flag's help: its own text where the name alone does not say enough; every default is the preset's."""
    text = _HELP[name]
    return text if name in ("preset", "device", "cache_dir") else f"{text} (default: the preset's)"


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """One kebab-case flag per TrainConfig field; unset flags take the preset's value."""
    parser = _OneLineParser(prog="python -m train", description=__doc__.splitlines()[0])
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_help(f.name))
            continue
        if f.name in ("time_budget",):
            kind = _positive_float
        elif f.name in ("step_budget",):
            kind = _positive_int
        choices = {"preset": list(PRESETS), "device": list(DEVICES),
                   "matrix_optimizer": list(MATRIX_OPTIMIZERS)}.get(f.name)
        parser.add_argument(flag, type=kind, default=None, choices=choices, metavar=f.name.upper(),
                            help=_help(f.name))
    return parser


def _format(key: str, value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return _FORMATS.get(key, "{}").format(value)


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run :func:`train.loop.train`, print the summary; returns the exit status."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args["time_budget"] is not None and args["step_budget"] is not None:
        parser.error("give either --time-budget or --step-budget, not both")
    preset = args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    # Imported here so `--help` and flag errors stay fast.
    from train.loop import TrainingDiverged, TriageKilled, preset_config, train
    from train.prepare import DataError

    try:
        config = preset_config(preset, **overrides)
        config.validate()
        summary = train(config, log=lambda *a: print(*a, flush=True))
    except (ValueError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TriageKilled:
        return 1  # the loop already printed the kill line
    except TrainingDiverged as exc:
        print(f"FAIL: {exc}", flush=True)
        return 1
    keys = [k for k in SUMMARY_KEYS if config.triage_time > 0 or k not in TRIAGE_KEYS]
    print("---")
    width = max(len(k) for k in keys) + 2
    for key in keys:
        print(f"{key + ':':<{width}}{_format(key, summary[key])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Muon + AdamW: orthogonalisation, parameter groups, schedules."""

from __future__ import annotations

import pytest
import torch

from train.model import GPT, GPTConfig
from train.config import TrainConfig
from train.optim import apply_schedules, build_optimizer, lr_multiplier, muon_momentum, orthogonalize


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=16, vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, n_embd=64))
    model.init_weights()
    return model


@pytest.mark.parametrize("shape", [(2, 32, 32), (3, 64, 16), (1, 16, 64)])
def test_orthogonalize_pushes_singular_values_towards_one(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape)
    out = orthogonalize(g)
    assert out.shape == g.shape
    s = torch.linalg.svdvals(out)
    # Muon's quintic iteration lands singular values in a band around 1, not exactly on it; the
    # smallest ones of a random square matrix are still on their way after 5 steps.
    assert s.max() < 1.3 and s.median() > 0.7 and s.min() > 0.4
    assert torch.allclose(orthogonalize(100 * g), out, atol=1e-4)  # the scale of the gradient is gone


@pytest.mark.parametrize("progress, expected", [
    (0.0, 1.0), (0.4, 1.0), (0.5, 1.0), (0.75, 0.55), (1.0, 0.1),
])
def test_lr_multiplier_warmdown_to_final_fraction(progress, expected):
    assert lr_multiplier(progress, warmup_ratio=0.0, warmdown_ratio=0.5, final_lr_frac=0.1) == pytest.approx(expected)


def test_lr_multiplier_warmup():
    assert lr_multiplier(0.05, warmup_ratio=0.1, warmdown_ratio=0.5, final_lr_frac=0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("step, expected", [(0, 0.85), (150, 0.90), (300, 0.95), (1000, 0.95)])
def test_muon_momentum_ramps(step, expected):
    assert muon_momentum(step) == pytest.approx(expected)


@pytest.mark.parametrize("matrix_optimizer, kinds", [("muon", {"adamw", "muon"}), ("adamw", {"adamw"})])
def test_build_optimizer_covers_every_parameter_once(matrix_optimizer, kinds):
    model = make_model()
    optimizer = build_optimizer(model, TrainConfig(matrix_optimizer=matrix_optimizer))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(list(model.parameters()))
    assert {g["kind"] for g in optimizer.param_groups} == kinds
    for group in optimizer.param_groups:
        if group["kind"] == "muon":
            assert len({tuple(p.shape) for p in group["params"]}) == 1


def test_build_optimizer_scales_adam_lrs_with_width():
    model = make_model()  # n_embd 64: scale sqrt(768 / 64)
    optimizer = build_optimizer(model, TrainConfig(unembedding_lr=0.004))
    head = next(g for g in optimizer.param_groups if g["params"][0] is model.lm_head.weight)
    assert head["lr"] == pytest.approx(0.004 * (768 / 64) ** 0.5)


def test_build_optimizer_rejects_unknown_matrix_optimizer():
    with pytest.raises(ValueError, match="matrix_optimizer"):
        build_optimizer(make_model(), TrainConfig(matrix_optimizer="sgd"))


@pytest.mark.parametrize("matrix_optimizer", ["muon", "adamw"])
def test_optimizer_step_reduces_loss_and_leaves_gradients_alone(matrix_optimizer):
    model = make_model()
    lr = 0.04 if matrix_optimizer == "muon" else 0.004
    optimizer = build_optimizer(model, TrainConfig(matrix_optimizer=matrix_optimizer, matrix_lr=lr))
    x = torch.randint(0, 50, (4, 16))
    y = torch.randint(0, 50, (4, 16))
    first = model(x, y)
    for step in range(15):
        apply_schedules(optimizer, step / 15, step, 0.0, 0.5, 0.0)
        loss = model(x, y)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        # Gradient coherence is measured after the step: the optimizer must not touch .grad.
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        optimizer.zero_grad(set_to_none=True)
    assert model(x, y).item() < first.item() - 1.0


def test_apply_schedules_decays_matrix_weight_decay_only():
    optimizer = build_optimizer(make_model(), TrainConfig(weight_decay=0.2))
    multiplier = apply_schedules(optimizer, progress=0.75, step=150, warmup_ratio=0.0, warmdown_ratio=0.5,
                                 final_lr_frac=0.0)
    assert multiplier == pytest.approx(0.5)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["initial_lr"] * 0.5)
        if group["kind"] == "muon":
            assert group["weight_decay"] == pytest.approx(0.05)
            assert group["momentum"] == pytest.approx(0.90)
        else:
            assert group["weight_decay"] == 0.0

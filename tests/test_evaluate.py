"""evaluate_bpb against hand-computed cases, with a fake model whose per-token losses are known."""

from __future__ import annotations

import math

import pytest
import torch

from train.evaluate import evaluate_bpb


class FixedLossModel(torch.nn.Module):
    """Returns, for each target token, the loss ``losses[target]`` (so every value is known)."""

    def __init__(self, losses: list[float]) -> None:
        super().__init__()
        self.losses = torch.tensor(losses)
        self.calls = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        assert reduction == "none"
        self.calls += 1
        return self.losses[y.clamp_min(0)] * (y >= 0)


# token id:        0 (special)  1    2    3
TOKEN_BYTES = torch.tensor([0, 1, 2, 4], dtype=torch.int32)
LOSSES = [9.0, 0.5, 3.0, 2.0]


def batches(*rows: list[list[int]]):
    for targets in rows:
        y = torch.tensor(targets)
        yield torch.zeros_like(y), y


def test_evaluate_bpb_hand_computed():
    # Targets 1, 2, 0, 3: the special token 0 (loss 9) is excluded from nats AND bytes.
    bpb = evaluate_bpb(FixedLossModel(LOSSES), batches([[1, 2, 0, 3]]), TOKEN_BYTES, num_tokens=4)
    assert bpb == pytest.approx((0.5 + 3.0 + 2.0) / (math.log(2) * (1 + 2 + 4)))


def test_evaluate_bpb_sums_over_batches_not_averages_of_batches():
    first, second = [[1, 1], [1, 1]], [[2, 2], [3, 0]]
    bpb = evaluate_bpb(FixedLossModel(LOSSES), batches(first, second), TOKEN_BYTES, num_tokens=8)
    assert bpb == pytest.approx((4 * 0.5 + 2 * 3.0 + 2.0) / (math.log(2) * (4 * 1 + 2 * 2 + 4)))
    per_batch = [4 * 0.5 / (math.log(2) * 4), (2 * 3.0 + 2.0) / (math.log(2) * (2 * 2 + 4))]
    assert bpb != pytest.approx(sum(per_batch) / 2)


@pytest.mark.parametrize("num_tokens, expected_calls", [(1, 1), (4, 1), (7, 1), (8, 2), (100, 3)])
def test_evaluate_bpb_uses_whole_batches(num_tokens, expected_calls):
    model = FixedLossModel(LOSSES)
    evaluate_bpb(model, batches([[1, 2]] * 2, [[3, 3]] * 2, [[2, 2]] * 2), TOKEN_BYTES, num_tokens)
    assert model.calls == expected_calls


def test_evaluate_bpb_ignores_minus_one_targets():
    bpb = evaluate_bpb(FixedLossModel(LOSSES), batches([[2, -1]]), TOKEN_BYTES, num_tokens=2)
    assert bpb == pytest.approx(3.0 / (math.log(2) * 2))


def test_evaluate_bpb_uniform_model_is_log_vocab_per_byte():
    vocab = 16
    token_bytes = torch.ones(vocab, dtype=torch.int32)

    class Uniform(torch.nn.Module):
        def forward(self, x, y, reduction="mean"):
            logits = torch.zeros(*y.shape, vocab)
            return torch.nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1), reduction="none").view(y.shape)

    y = torch.randint(0, vocab, (2, 8))
    assert evaluate_bpb(Uniform(), iter([(y, y)]), token_bytes, 16) == pytest.approx(math.log2(vocab))


@pytest.mark.parametrize("rows, num_tokens, message", [
    ([[1, 2]], 0, "positive"),
    ([], 4, "no validation batches"),
    ([[0, 0]], 2, "no bytes"),
])
def test_evaluate_bpb_rejects_degenerate_input(rows, num_tokens, message):
    with pytest.raises(ValueError, match=message):
        evaluate_bpb(FixedLossModel(LOSSES), batches(*([r] for r in rows)), TOKEN_BYTES, num_tokens)

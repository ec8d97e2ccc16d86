"""The GPT: shapes, losses, causality, sliding windows, zero-initialised matrices, config checks."""

from __future__ import annotations

import math

import pytest
import torch

from train.model import GPT, GPTConfig, has_value_embedding, window_sizes

VOCAB = 97


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(**overrides) -> GPT:
    config = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    config.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    model.init_weights()
    return model


@pytest.mark.parametrize("n_layer, n_head, n_kv_head, pattern", [
    (1, 2, 2, "L"),
    (2, 2, 1, "SSSL"),   # grouped-query attention
    (3, 4, 2, "SL"),
])
def test_gpt_forward_shapes_and_losses(n_layer, n_head, n_kv_head, pattern):
    model = make_model(n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, window_pattern=pattern)
    x = torch.randint(0, VOCAB, (3, 20))
    y = torch.randint(0, VOCAB, (3, 20))
    logits = model(x)
    assert logits.shape == (3, 20, VOCAB)
    assert logits.abs().max() <= 15.0  # logit softcap
    per_token = model(x, y, reduction="none")
    assert per_token.shape == (3, 20)
    loss = model(x, y)
    assert loss.shape == ()
    assert torch.allclose(loss, per_token.mean(), atol=1e-5)
    # lm_head starts tiny (std 0.001): the initial prediction is close to uniform.
    assert abs(loss.item() - math.log(VOCAB)) < 0.05


def test_gpt_loss_ignores_minus_one_targets():
    model = make_model()
    x = torch.randint(0, VOCAB, (2, 8))
    y = torch.randint(0, VOCAB, (2, 8))
    masked = y.clone()
    masked[:, 4:] = -1
    per_token = model(x, masked, reduction="none")
    assert torch.all(per_token[:, 4:] == 0)
    assert torch.allclose(model(x, masked), model(x, y, reduction="none")[:, :4].mean(), atol=1e-5)


def test_gpt_is_causal():
    model = make_model(n_layer=3, window_pattern="SSL")
    x = torch.randint(0, VOCAB, (1, 16))
    changed = x.clone()
    changed[0, 10] = (changed[0, 10] + 1) % VOCAB
    before, after = model(x), model(changed)
    assert torch.allclose(before[:, :10], after[:, :10], atol=1e-6)
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_gpt_zero_init_matrices_are_the_output_projections_and_gates():
    model = make_model(n_layer=3)
    zero = {name for name, p in model.named_parameters() if p.ndim == 2 and not p.any()}
    expected = {f"transformer.h.{i}.{m}.c_proj.weight" for i in range(3) for m in ("attn", "mlp")}
    expected |= {f"transformer.h.{i}.attn.ve_gate.weight" for i in range(3) if has_value_embedding(i, 3)}
    assert zero == expected
    assert torch.all(model.resid_lambdas == 1.0) and torch.allclose(model.x0_lambdas, torch.full((3,), 0.1))


def test_gpt_value_embeddings_on_alternating_layers_ending_with_the_last():
    model = make_model(n_layer=4)
    assert sorted(model.value_embeds) == ["1", "3"]
    assert [b.attn.ve_gate is not None for b in model.transformer.h] == [False, True, False, True]


@pytest.mark.parametrize("pattern, n_layer, expected", [
    ("SSSL", 4, [16, 16, 16, 32]),
    ("SSSL", 2, [16, 32]),            # the last layer is always long
    ("L", 3, [32, 32, 32]),
    ("SL", 5, [16, 32, 16, 32, 32]),
])
def test_window_sizes_follow_the_pattern(pattern, n_layer, expected):
    config = GPTConfig(sequence_len=32, vocab_size=VOCAB, n_layer=n_layer, n_head=2, n_kv_head=2, n_embd=64,
                       window_pattern=pattern)
    assert window_sizes(config) == expected


def test_sliding_window_mask_limits_attention_distance():
    model = make_model(window_pattern="SSSL")
    mask = model.mask_16
    i, j = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    assert torch.equal(mask, (j <= i) & (i - j <= 16))


def test_gpt_init_weights_is_deterministic_and_rebuilds_buffers():
    a, b = make_model(), make_model()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with torch.device("meta"):
        meta = GPT(a.config)
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.equal(meta.cos, a.cos) and torch.equal(meta.mask_16, a.mask_16)


def test_gpt_rejects_too_long_sequences():
    with pytest.raises(ValueError, match="exceeds"):
        make_model()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("overrides, message", [
    (dict(n_embd=65), "multiple of n_head"),
    (dict(n_kv_head=3, n_head=4, n_embd=64), "must divide"),
    (dict(window_pattern="SXL"), "window_pattern"),
    (dict(n_head=64, n_kv_head=64, n_embd=64), "even"),
])
def test_gpt_config_rejects_bad_shapes(overrides, message):
    config = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=2, n_embd=64)
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        GPTConfig(**config)

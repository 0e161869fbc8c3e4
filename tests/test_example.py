"""Smoke test of examples/train_tiny.py: a few training steps through fused_attn.flash on the CPU."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fused_attn

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_tiny.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_tiny", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_tiny_few_steps(monkeypatch):
    ex = load_example()
    vocab = len(set(ex.load_text()))
    model = ex.TinyLM(vocab, d_model=128, n_heads=4, n_layers=2, window=8, max_len=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    calls = []
    real_flash = fused_attn.flash

    def counting_flash(q, k, v, **kw):
        calls.append(kw)
        return real_flash(q, k, v, **kw)

    monkeypatch.setattr(fused_attn, "flash", counting_flash)
    losses = ex.main(steps=5, batch_size=4, seq_len=32, window=8, seed=0, device="cpu", log_every=0,
                     model=model)

    assert len(losses) == 5
    assert all(math.isfinite(x) for x in losses)
    # Attention went through fused_attn.flash with the causal sliding window, once per layer per step.
    assert len(calls) == 5 * 2
    assert all(kw == {"causal": True, "window": (8, 0)} for kw in calls)
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        assert not torch.equal(p.detach(), before[name]), f"{name}: unchanged after 5 AdamW steps"
    # The attention projections in particular received a non-zero gradient through flash.
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_train_tiny_attention_choices(monkeypatch):
    # --attention softmax / linear route every layer through flash(causal=True) / linear_attention.
    ex = load_example()
    vocab = len(set(ex.load_text()))
    seen = []
    real_flash, real_linear = fused_attn.flash, fused_attn.linear_attention
    monkeypatch.setattr(fused_attn, "flash", lambda q, k, v, **kw: seen.append(("flash", kw)) or real_flash(q, k, v, **kw))
    monkeypatch.setattr(fused_attn, "linear_attention",
                        lambda q, k, v, **kw: seen.append(("linear", kw)) or real_linear(q, k, v, **kw))
    for attention, want in (("softmax", ("flash", {"causal": True})), ("linear", ("linear", {"causal": True}))):
        seen.clear()
        model = ex.TinyLM(vocab, d_model=32, n_heads=2, n_layers=2, max_len=16, attention=attention)
        losses = ex.main(steps=2, batch_size=2, seq_len=16, seed=0, device="cpu", log_every=0, model=model)
        assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
        assert seen == [want] * 4, seen
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"attention: expected one of \('softmax', 'window', 'linear'\), got 'x'"):
        ex.TinyLM(vocab, attention="x")

"""fused_attn as a transformers attention backend, on tiny randomly initialised models built from configs
(no download): Llama (GQA), Mistral (sliding window), Gemma 2 (softcap + sliding window). Against
attn_implementation="eager": logits in fp32 under the STYLE.md rule (eager in float64 is the reference),
with no, left and right padding; greedy generate() token for token; one training step's gradients."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is the optional 'hf' extra")

from conftest import assert_rule, max_err  # noqa: E402
from fused_attn.integrations import transformers as fa_hf  # noqa: E402

fa_hf.register()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread avoids the cost of waking a thread pool for every small op (with two
    threads on a busy 2-core machine, generate() took 30x longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0, pad_token_id=0,
              bos_token_id=1, eos_token_id=None)


def config(kind):
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON)
    if kind == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=7)
    if kind == "gemma2":
        # a small softcap and window so that both change the result at these lengths
        return transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=6, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=30.0, query_pre_attn_scalar=16)
    raise ValueError(kind)


KINDS = ["llama", "mistral", "gemma2"]


_MODELS = {}


def models(kind):
    """(eager fp32, eager fp64, fused_attn fp32) with the same random weights, in eval mode."""
    if kind not in _MODELS:
        torch.manual_seed(0)
        eager = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation="eager")
        eager.eval()
        fused = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation="fused_attn")
        fused.load_state_dict(eager.state_dict())
        fused.eval()
        ref = transformers.AutoModelForCausalLM.from_config(config(kind), attn_implementation="eager")
        ref.load_state_dict(eager.state_dict())
        ref.double().eval()
        _MODELS[kind] = (eager, ref, fused)
    return _MODELS[kind]


def batch(padding, b=3, s=21, seed=0):
    """input_ids and attention_mask (B, S) with real lengths 21, 16, 9 padded left or right."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, COMMON["vocab_size"], (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    if padding != "none":
        for i, n in enumerate((s, s - 5, s - 12)):
            if padding == "left":
                mask[i, :s - n] = 0
            else:
                mask[i, n:] = 0
    ids = ids.masked_fill(mask == 0, COMMON["pad_token_id"])
    return ids, mask


def per_sequence(model, ids, mask):
    """Logits of each sequence run alone without padding (positions as in the padded batch): the padded
    batch's answer at its real tokens, free of what a backend does with pad rows (eager in float64 turns
    fully masked pad rows into NaN, which then reaches real rows through the next layer's keys)."""
    rows = []
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        pos = torch.arange(ids.shape[1])[real].unsqueeze(0)
        rows.append(model(input_ids=ids[i, real].unsqueeze(0), position_ids=pos, use_cache=False).logits[0])
    return torch.cat(rows)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_eager(kind, padding):
    eager, ref, fused = models(kind)
    ids, mask = batch(padding)
    with torch.no_grad():
        got = fused(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
        base = per_sequence(eager, ids, mask)
        want = per_sequence(ref, ids, mask)
        padded_eager = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
    assert_rule(f"{kind}/{padding} logits", got, want, base, torch.float32)
    # and eager on the same padded batch agrees with its own unpadded runs (the comparison is fair)
    assert_rule(f"{kind}/{padding} eager padded", padded_eager, want, base, torch.float32)


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_matches_eager(kind, padding):
    eager, _, fused = models(kind)
    ids, mask = batch(padding, seed=1)
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = eager.generate(input_ids=ids, attention_mask=mask, **kw)
        got = fused.generate(input_ids=ids, attention_mask=mask, **kw)
    assert got.shape == want.shape == (3, ids.shape[1] + 32)
    assert torch.equal(got, want), f"first difference at token {(got != want).nonzero()[0].tolist()}"


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generate_static_cache_matches_eager(kind):
    """A static cache is longer than the tokens seen so far: its unfilled slots must stay unseen."""
    eager, _, fused = models(kind)
    ids, mask = batch("left", seed=4)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        want = eager.generate(input_ids=ids, attention_mask=mask, **kw)
        got = fused.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, want), f"first difference at token {(got != want).nonzero()[0].tolist()}"
    # a forward in two chunks through a static cache, without any attention mask
    ids, _ = batch("none", seed=5)
    logits = []
    for m in (eager, fused):
        cache = transformers.StaticCache(config=m.config, max_cache_len=40)
        with torch.no_grad():
            logits.append(torch.cat([m(input_ids=ids[:, s], past_key_values=cache).logits for s in
                                     (slice(0, 13), slice(13, 21))], dim=1))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def token_loss_sum(model, ids, mask):
    """Summed next-token cross-entropy over the real tokens, from the padded batch in one call."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][pairs].double(), ids[:, 1:][pairs], reduction="sum")


def token_loss_sum_per_sequence(model, ids, mask):
    total = 0
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        total = total + token_loss_sum(model, ids[i, real].unsqueeze(0), mask[i, real].unsqueeze(0))
    return total


@pytest.mark.parametrize("kind", KINDS)
def test_training_step_gradients_match_eager(kind):
    """Gradients of one training step on a right-padded batch: fused_attn on the padded batch against eager
    on each sequence alone (float64 reference, float32 baseline)."""
    eager, ref, fused = models(kind)
    ids, mask = batch("right", seed=2)
    grads = []
    for m, loss_fn in ((fused, token_loss_sum), (ref, token_loss_sum_per_sequence),
                       (eager, token_loss_sum_per_sequence)):
        m.train()
        m.zero_grad()
        loss_fn(m, ids, mask).backward()
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None})
        m.zero_grad()
        m.eval()
    got, want, base = grads
    assert got.keys() == want.keys() and len(got) > 10
    for name in got:
        assert_rule(f"{kind} grad {name}", got[name], want[name], base[name], torch.float32)


def test_packed_position_ids_match_separate_sequences():
    """position_ids restarting in one row (packed documents, no mask, no cache) attend within each document."""
    _, _, fused = models("llama")
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 96, (n,), generator=g) for n in (7, 12, 5)]
    packed = torch.cat(docs).unsqueeze(0)
    pos = torch.cat([torch.arange(len(d)) for d in docs]).unsqueeze(0)
    with torch.no_grad():
        got = fused(input_ids=packed, position_ids=pos, use_cache=False).logits[0]
        want = torch.cat([fused(input_ids=d.unsqueeze(0), use_cache=False).logits[0] for d in docs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unserved_arguments_raise():
    _, _, fused = models("llama")
    attn = fused.model.layers[0].self_attn
    q = torch.zeros(1, 4, 5, 16)
    k = v = torch.zeros(1, 2, 5, 16)
    with pytest.raises(ValueError, match="dropout"):
        fa_hf.attention_forward(attn, q, k, v, None, dropout=0.1)
    with pytest.raises(ValueError, match="attention_mask"):
        fa_hf.attention_forward(attn, q, k, v, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="s_aux"):
        fa_hf.attention_forward(attn, q, k, v, None, s_aux=torch.zeros(4))

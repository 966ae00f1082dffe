"""favorplus.transformers: the "favorplus" attention implementation inside real transformers
models (tiny configs, random weights, CPU).

The reference is independent of favorplus' code: a test-only attention implementation
("fp_reference") computes FAVOR+ the quadratic way from the same projection buffer,
phi(x) = exp(W x - |x|^2 / 2) / sqrt(m) on sqrt(scale)-scaled queries and keys, with
transformers' own dense SDPA masks (padding, causal, cache offsets). Exact attention
("eager") is the reference where FAVOR+ should approach it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import favorplus as fp  # noqa: E402
import favorplus.transformers as fpt  # noqa: E402

VOCAB = 100


# --- the independent reference ------------------------------------------------------------


def _reference_attention(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs
):
    """FAVOR+ written out quadratically in float64, with SDPA's dense masks."""
    w = module.favorplus_projection.to(torch.float64)
    q, k, v = (x.to(torch.float64) for x in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    q, k = q * math.sqrt(scale), k * math.sqrt(scale)

    def phi(x):
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    a = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, Lq, Lk)
    lq, lk = a.shape[-2:]
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and lq > 1:  # SDPA's is_causal: top-left aligned
            a = a * torch.ones(lq, lk, dtype=torch.bool).tril()
    else:
        a = a * attention_mask[:, :, :, :lk]
    den = a.sum(-1, keepdim=True)
    weights = a / torch.where(den == 0, 1.0, den)
    out = (weights @ v).to(query.dtype)
    return out.transpose(1, 2).contiguous(), weights.to(query.dtype)


AttentionInterface.register("fp_reference", _reference_attention)
AttentionMaskInterface.register("fp_reference", sdpa_mask)


# --- tiny models ---------------------------------------------------------------------------


def _config(family, **overrides):
    common = dict(vocab_size=VOCAB)
    if family == "bert":
        cfg = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        )
    elif family == "roberta":
        cfg = transformers.RobertaConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            **common,
        )
    elif family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, **common)
    elif family == "llama":
        cfg = transformers.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            **common,
        )
    elif family == "mistral":
        cfg = transformers.MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **common,
        )
    elif family == "vit":
        cfg = transformers.ViTConfig(
            image_size=16,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        )
    else:
        raise AssertionError(family)
    for name, value in overrides.items():
        setattr(cfg, name, value)
    return cfg


ENCODERS = ["bert", "roberta"]
DECODERS = ["gpt2", "llama", "qwen2", "mistral"]


def _model(family, impl="favorplus", causal_lm=False, dtype=torch.float64, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = _config(family, **overrides)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(cfg, attn_implementation=impl)
    return model.to(dtype).eval()


def _ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _pixels(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g, dtype=torch.float64)


def _run(model, family, **kw):
    if family == "vit":
        return model(pixel_values=_pixels(), **kw).last_hidden_state
    return model(**kw).last_hidden_state


def _close(a, b, tol=1e-9):
    err = (a - b).abs().max().item()
    scale = max(b.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"max |a - b| = {err:.3g}, max |b| = {scale:.3g}"


def _with_reference(model, fn):
    """fn() under "favorplus", then under "fp_reference" (same weights and projections)."""
    fav = fn()
    model.set_attn_implementation("fp_reference")
    try:
        ref = fn()
    finally:
        model.set_attn_implementation("favorplus")
    return fav, ref


# --- registration --------------------------------------------------------------------------


def test_import_registers_attention_and_mask_function_idempotently():
    assert ALL_ATTENTION_FUNCTIONS["favorplus"] is fpt.favorplus_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["favorplus"] is fpt.favorplus_mask
    fpt.register()
    fpt.register()
    assert ALL_ATTENTION_FUNCTIONS["favorplus"] is fpt.favorplus_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["favorplus"] is fpt.favorplus_mask


# --- models against the independent reference ---------------------------------------------


@pytest.mark.parametrize("family", ENCODERS + DECODERS)
def test_text_models_equal_reference_with_padding(family):
    model = _model(family)
    ids = _ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    if family in ENCODERS:
        mask[1, 7:] = 0  # right padding
    else:
        mask[1, :3] = 0  # left padding, as for generation
    fav, ref = _with_reference(
        model, lambda: _run(model, family, input_ids=ids, attention_mask=mask)
    )
    keep = mask.bool()
    _close(fav[keep], ref[keep])


def test_vit_equals_reference():
    model = _model("vit")
    fav, ref = _with_reference(model, lambda: _run(model, "vit"))
    _close(fav, ref)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_many_features_approach_exact_attention(family):
    """With m = 4096 features the FAVOR+ estimate's relative error is O(1/sqrt(m)) ~ 2 %
    of the attention output; the hidden states then differ from eager attention by far
    less than between two different models (that differ by O(1))."""
    exact = _model(family, impl="eager")
    fav = _model(family, favorplus_num_features=4096)
    ids = _ids(2, 12)
    e = exact(input_ids=ids).last_hidden_state
    f = fav(input_ids=ids).last_hidden_state
    other = _model(family, impl="eager", seed=5)(input_ids=ids).last_hidden_state
    assert (f - e).norm() < 0.05 * (other - e).norm()
    assert (f - e).norm() > 0  # not exact attention in disguise


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_padding_contents_do_not_change_other_tokens(family):
    model = _model(family)
    ids = _ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    padded = slice(6, 9) if family == "bert" else slice(0, 3)
    mask[0, padded] = 0
    other = ids.clone()
    other[0, padded] = _ids(1, 3, seed=7)[0]
    a = model(input_ids=ids, attention_mask=mask).last_hidden_state
    b = model(input_ids=other, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    _close(a[keep], b[keep], tol=1e-12)
    # and the padding is not ignored: without the mask those tokens change the others
    c = model(input_ids=other).last_hidden_state
    assert (c[0, 3:6] - a[0, 3:6]).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_outputs_do_not_see_the_future(family):
    model = _model(family)
    ids = _ids(1, 8)
    later = ids.clone()
    later[0, 5:] = _ids(1, 3, seed=9)[0]
    a = model(input_ids=ids).last_hidden_state
    b = model(input_ids=later).last_hidden_state
    _close(a[:, :5], b[:, :5], tol=1e-12)


def test_set_attn_implementation_switches_an_eager_model():
    eager = _model("gpt2", impl="eager")
    ids = _ids(2, 7)
    exact = eager(input_ids=ids).last_hidden_state
    eager.set_attn_implementation("favorplus")
    switched = eager(input_ids=ids).last_hidden_state
    direct = _model("gpt2")(input_ids=ids).last_hidden_state
    _close(switched, direct, tol=1e-12)  # same weights, same seed: same projections
    assert (switched - exact).abs().max() > 1e-6


def test_bert_cross_attention_honours_encoder_padding():
    model = _model("bert", is_decoder=True, add_cross_attention=True)
    ids = _ids(2, 6)
    enc = torch.randn(2, 5, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    enc_mask = torch.ones(2, 5, dtype=torch.long)
    enc_mask[0, 3:] = 0

    def run(states):
        return model(
            input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=enc_mask
        ).last_hidden_state

    fav, ref = _with_reference(model, lambda: run(enc))
    _close(fav, ref)
    changed = enc.clone()
    changed[0, 3:] += 1.0
    _close(run(changed)[0], fav[0], tol=1e-12)


# --- projections ---------------------------------------------------------------------------


def test_projections_are_buffers_per_layer_reproducible_and_not_saved():
    model = _model("llama", favorplus_num_features=24)
    model(input_ids=_ids(1, 4))
    layers = model.layers
    w0 = layers[0].self_attn.favorplus_projection
    w1 = layers[1].self_attn.favorplus_projection
    assert w0.shape == (24, 8) and not torch.equal(w0, w1)
    again = _model("llama", favorplus_num_features=24, seed=3)  # other weights, same seed
    again(input_ids=_ids(1, 4))
    assert torch.equal(again.layers[1].self_attn.favorplus_projection, w1)
    assert not any("favorplus" in k for k in model.state_dict())
    assert "layers.0.self_attn.favorplus_projection" in dict(model.named_buffers())
    model.to(torch.float32)
    assert layers[0].self_attn.favorplus_projection.dtype == torch.float32


def test_redraw_projections_is_seeded_and_stored_in_the_config():
    model = _model("bert")
    ids = _ids(1, 6)
    before = model(input_ids=ids).last_hidden_state
    w = model.encoder.layer[0].attention.self.favorplus_projection.clone()
    assert fpt.redraw_projections(model, seed=11) == 2
    assert model.config.favorplus_seed == 11
    w11 = model.encoder.layer[0].attention.self.favorplus_projection.clone()
    assert not torch.equal(w, w11)
    after = model(input_ids=ids).last_hidden_state
    assert (after - before).abs().max() > 1e-6
    fpt.redraw_projections(model, seed=11)
    assert torch.equal(model.encoder.layer[0].attention.self.favorplus_projection, w11)
    fpt.redraw_projections(model)
    assert model.config.favorplus_seed != 11


def test_redraw_between_forward_and_backward_keeps_the_gradient():
    """redraw_projections between a causal forward pass and its backward pass: the
    gradient is that of the projection the forward pass used, also where the causal
    blocks are recomputed in the backward pass (the redraw replaces the buffers)."""
    from favorplus._backend import blocking as _backend

    model = _model("gpt2", dtype=torch.float32)  # the projection's own dtype: used as it is
    emb = torch.randn(2, 200, model.config.n_embd)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_backend, "BLOCK_NUMBERS", 256)  # blocks of a few tokens: recomputed
        cot = torch.randn(2, 200, model.config.n_embd)
        x = emb.clone().requires_grad_()

        def loss() -> torch.Tensor:
            return (model(inputs_embeds=x).last_hidden_state * cot).sum()

        (expected,) = torch.autograd.grad(loss(), x)
        pending = loss()
        assert fpt.redraw_projections(model, seed=7) == model.config.n_layer
        (got,) = torch.autograd.grad(pending, x)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        (redrawn,) = torch.autograd.grad(loss(), x)
        assert (redrawn - expected).abs().max() > 1e-6 * expected.abs().max()


# --- dropout and output_attentions ---------------------------------------------------------


def test_bert_dropout_in_training_and_none_in_eval():
    model = _model("bert", hidden_dropout_prob=0.0)  # attention dropout 0.1 (BERT's default)
    assert model.config.attention_probs_dropout_prob == 0.1
    ids = _ids(2, 8)
    ev = model(input_ids=ids).last_hidden_state
    _close(model(input_ids=ids).last_hidden_state, ev, tol=0)
    model.train()
    torch.manual_seed(0)
    t1 = model(input_ids=ids).last_hidden_state
    t2 = model(input_ids=ids).last_hidden_state
    assert (t1 - t2).abs().max() > 1e-6
    model.eval()
    nodrop = _model("bert", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _close(nodrop(input_ids=ids).last_hidden_state, ev, tol=1e-12)


def test_key_dropout_expectation_is_the_undropped_output():
    """Mean of N dropped outputs vs the undropped one, within 5 standard errors
    (SE = sample standard deviation / sqrt(N), per entry), fixed seed."""
    model = _model("bert")
    module = model.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 16, generator=g, dtype=torch.float64) * 0.5 for _ in range(3))
    base, _ = fpt.favorplus_attention_forward(module, q, k, v, None)
    torch.manual_seed(1)
    n = 4000
    draws = torch.stack(
        [fpt.favorplus_attention_forward(module, q, k, v, None, dropout=0.3)[0] for _ in range(n)]
    )
    se = draws.std(0) / math.sqrt(n)
    assert ((draws.mean(0) - base).abs() <= 5 * se + 1e-12).all()
    assert (draws.std(0) > 0).all()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_output_attentions_are_the_implicit_favor_weights(family):
    model = _model(family)
    ids = _ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0 if family == "bert" else 1
    if family != "bert":
        mask[1, :2] = 0
    fav, ref = _with_reference(
        model, lambda: model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    )
    assert len(fav) == 2 and fav[0].shape == (2, model.config.num_attention_heads, 7, 7)
    for a, b in zip(fav, ref):
        rows = mask.bool()[:, None, :, None].expand_as(a)
        _close(a[rows], b[rows])
        assert torch.all(a[1][..., ~mask[1].bool()] == 0)  # padding keys get no weight


# --- generation and caches -----------------------------------------------------------------


def _generate(model, ids, mask, **kw):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, **kw
    )


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_greedy_generation_same_with_every_cache(family):
    model = _model(family, causal_lm=True)
    ids = _ids(2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    plain = _generate(model, ids, mask, use_cache=False)
    assert plain.shape == (2, 13)
    for kw in ({}, {"cache_implementation": "static"}, {"cache": fpt.FavorplusCache()}):
        assert torch.equal(_generate(model, ids, mask, **kw), plain), kw


@pytest.mark.parametrize("cache_cls", ["dynamic", "static", "favorplus"])
def test_cached_steps_equal_one_forward(cache_cls):
    """Prompt in two chunks (5 + 3 tokens: chunked prefill, Lq < Lk) then single tokens:
    the logits equal those of one forward over the whole sequence."""
    model = _model("llama", causal_lm=True)
    ids = _ids(2, 11)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :2] = 0
    full = model(input_ids=ids, attention_mask=mask).logits
    if cache_cls == "dynamic":
        cache = transformers.DynamicCache()
    elif cache_cls == "static":
        cache = transformers.StaticCache(config=model.config, max_cache_len=16)
    else:
        cache = fpt.FavorplusCache()
    pieces = []
    for start, stop in ((0, 5), (5, 8), (8, 9), (9, 10), (10, 11)):
        out = model(
            input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, use_cache=True
        )
        pieces.append(out.logits)
    keep = mask.bool()
    _close(torch.cat(pieces, 1)[keep], full[keep], tol=1e-9)


def test_favorplus_cache_memory_does_not_grow():
    model = _model("llama", causal_lm=True, dtype=torch.float32)
    ids = _ids(1, 4)
    sizes = {}
    for new in (4, 24):
        cache = fpt.FavorplusCache()
        model.generate(
            input_ids=ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache=cache,
            pad_token_id=0,
        )
        sizes[new] = cache.nbytes
        dyn = transformers.DynamicCache()
        model.generate(
            input_ids=ids,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache=dyn,
            pad_token_id=0,
        )
        sizes[("dynamic", new)] = sum(
            x.numel() * x.element_size() for layer in dyn.layers for x in (layer.keys, layer.values)
        )
    assert sizes[4] == sizes[24] > 0
    assert sizes[("dynamic", 24)] > 3 * sizes[("dynamic", 4)]


def test_favorplus_cache_refuses_other_implementations():
    model = _model("llama", causal_lm=True, impl="eager")
    cache = fpt.FavorplusCache()
    with pytest.raises(Exception, match="favorplus"):
        for _ in range(2):
            model(input_ids=_ids(1, 3), cache=cache, use_cache=True)


# --- what FAVOR+ cannot compute is refused -------------------------------------------------


def test_sliding_window_shorter_than_the_sequence_is_refused():
    model = _model("mistral", sliding_window=4)
    with pytest.raises(ValueError, match="linear time"):
        model(input_ids=_ids(1, 10))
    # a window longer than the sequence is plain causal attention: computed
    fav, ref = _with_reference(model, lambda: model(input_ids=_ids(1, 4)).last_hidden_state)
    _close(fav, ref)


def test_packed_sequences_are_refused():
    model = _model("llama")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(ValueError, match="packed sequences"):
        model(input_ids=_ids(1, 6), position_ids=position_ids, use_cache=False)


def test_arbitrary_4d_mask_is_refused_and_a_causal_padding_one_is_computed():
    model = _model("llama")
    ids = _ids(1, 6)
    pattern = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    pattern[0, 0, 4, 1] = False  # not causal + padding
    with pytest.raises(ValueError):
        model(input_ids=ids, attention_mask=pattern)
    causal = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    additive = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    additive[~causal] = torch.finfo(torch.float64).min  # transformers' "masked" value
    expected = model(input_ids=ids).last_hidden_state
    _close(model(input_ids=ids, attention_mask=causal).last_hidden_state, expected, tol=1e-12)
    _close(model(input_ids=ids, attention_mask=additive).last_hidden_state, expected, tol=1e-12)


@pytest.mark.parametrize("name", ["softcap", "s_aux", "position_bias"])
def test_score_modifications_are_refused(name):
    model = _model("llama")
    q = torch.zeros(1, 4, 3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=name):
        fpt.favorplus_attention_forward(
            model.layers[0].self_attn, q, q, q, None, **{name: torch.ones(1)}
        )


def test_favor_mask_refuses_computation():
    mask = fpt.favorplus_mask(
        batch_size=2, q_length=3, kv_length=3, attention_mask=torch.ones(2, 3, dtype=torch.bool)
    )
    assert isinstance(mask, torch.Tensor) and mask.shape == (2, 1, 3, 3) and mask.causal
    assert mask.contiguous() is mask and mask.to("cpu").causal
    with pytest.raises(TypeError, match="FavorMask"):
        mask + 1
    with pytest.raises(TypeError, match="FavorMask"):
        mask[:, :, :, :2]


# --- performerize --------------------------------------------------------------------------


def test_performerize_converts_in_place_keeping_weights():
    model = _model("gpt2", impl="eager", causal_lm=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids(2, 6)
    exact = model(input_ids=ids).logits
    assert fpt.performerize(model, num_features=40, seed=3) is model
    assert model.config._attn_implementation == "favorplus"
    assert model.config.favorplus_num_features == 40 and model.config.favorplus_seed == 3
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    fav = model(input_ids=ids).logits
    assert model.transformer.h[1].attn.favorplus_projection.shape == (40, 8)
    assert (fav - exact).abs().max() > 1e-6
    direct = _model("gpt2", causal_lm=True, favorplus_num_features=40, favorplus_seed=3)
    direct.load_state_dict(before)
    _close(direct(input_ids=ids).logits, fav, tol=1e-12)


def test_performerize_numbers_modules_without_layer_index_in_model_order():
    model = _model("vit", impl="eager")
    fpt.performerize(model, seed=2)
    model(pixel_values=_pixels())
    first = model.layers[0].attention.favorplus_projection
    second = model.layers[1].attention.favorplus_projection
    assert not torch.equal(first, second)
    fpt.performerize(model, seed=2)  # again: the same draws
    model(pixel_values=_pixels())
    assert torch.equal(model.layers[0].attention.favorplus_projection, first)


def test_performerize_checks_its_arguments():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fpt.performerize(torch.nn.Linear(2, 2))
    model = _model("bert", impl="eager")
    with pytest.raises(ValueError, match="num_features"):
        fpt.performerize(model, num_features=0)
    with pytest.raises(ValueError, match="seed"):
        fpt.performerize(model, seed=-1)
    with pytest.raises(ValueError, match="kernel"):
        fpt.performerize(model, kernel="gaussian")


def test_projection_follows_the_layer_to_the_draw_projection_law():
    """The buffer is draw_projection's matrix for the module's own seed sequence."""
    model = _model("gpt2", favorplus_num_features=16, favorplus_seed=4)
    model(input_ids=_ids(1, 3))
    rng = np.random.default_rng(np.random.SeedSequence([4, 0, 2 * 1]))
    expected = fp.draw_projection(16, 8, seed=rng, xp=torch, dtype=torch.float32)
    assert torch.equal(model.h[1].attn.favorplus_projection, expected)


# --- more families, as a user would switch them -------------------------------------------

MORE = {
    "distilbert": lambda: transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    ),
    "phi3": lambda: transformers.Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    ),
    "bart": lambda: transformers.BartConfig(
        vocab_size=VOCAB,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    ),
    "deit": lambda: transformers.DeiTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
    ),
}


@pytest.mark.parametrize("family", sorted(MORE))
def test_more_families_equal_reference(family):
    torch.manual_seed(0)
    model = AutoModel.from_config(MORE[family](), attn_implementation="favorplus")
    model = model.to(torch.float64).eval()
    ids = _ids(2, 9)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    if family == "deit":
        fav, ref = _with_reference(model, lambda: model(pixel_values=_pixels()).last_hidden_state)
        _close(fav, ref)
        return
    kw = dict(input_ids=ids, attention_mask=mask)
    if family == "bart":  # encoder padding reaches the decoder's cross-attention
        kw["decoder_input_ids"] = ids[:, :5]
    fav, ref = _with_reference(model, lambda: model(**kw).last_hidden_state)
    keep = mask.bool() if family != "bart" else torch.ones(2, 5, dtype=torch.bool)
    _close(fav[keep], ref[keep])


def test_save_and_load_keep_the_settings_and_checkpoints_stay_exact_compatible(tmp_path):
    model = _model("llama", favorplus_num_features=20, favorplus_seed=6)
    ids = _ids(2, 6)
    out = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, attn_implementation="favorplus")
    loaded = loaded.to(torch.float64).eval()
    assert loaded.config.favorplus_num_features == 20 and loaded.config.favorplus_seed == 6
    _close(loaded(input_ids=ids).last_hidden_state, out, tol=1e-12)
    exact = AutoModel.from_pretrained(tmp_path, attn_implementation="eager")  # same files
    exact.load_state_dict(model.state_dict(), strict=True)


def test_first_call_under_inference_mode_then_redraw_and_training():
    model = _model("bert", attention_probs_dropout_prob=0.0, dtype=torch.float32)
    ids = _ids(1, 5)
    with torch.inference_mode():
        model(input_ids=ids)
    assert not model.encoder.layer[0].attention.self.favorplus_projection.is_inference()
    fpt.redraw_projections(model, seed=1)  # in place: needs a normal tensor
    model.train()
    model(input_ids=ids).last_hidden_state.sum().backward()
    assert model.encoder.layer[0].attention.self.query.weight.grad is not None

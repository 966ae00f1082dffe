"""favorplus.transformers with every projection kind and estimator (issue 14): the config
settings, OPRF / SADERF running statistics per attention module, causal leak-freedom,
checkpoints and generation (tiny configs, random weights, CPU, no hub).

The expected outputs come from the functional :func:`favorplus.favor_attention`, called
by a test-only attention implementation ("fp_check") with the module's projection and
the kernel the documented semantics prescribe: the config's name in bidirectional calls
(own statistics), ``OPRF(statistics=...)`` / ``SADERF(statistics=...)`` built here from
the module's running buffers as they were before the call in causal calls.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AttentionInterface, AutoModel, AutoModelForCausalLM  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import favorplus as fp  # noqa: E402
import favorplus.transformers as fpt  # noqa: E402

VOCAB = 100
KINDS = ["orthogonal", "iid", "simplex"]
KERNELS = ["softmax", "softmax_hyperbolic", "softmax_oprf", "softmax_saderf"]
ESTIMATORS = ["softmax_oprf", "softmax_saderf"]
STATS = (
    "running_query_mean",
    "running_query_sq_mean",
    "running_key_mean",
    "running_key_sq_mean",
)


def _config(family):
    if family == "bert":
        return transformers.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    raise AssertionError(family)


def _model(family, kernel="softmax_oprf", kind="orthogonal", causal_lm=False, momentum=0.1):
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if causal_lm else AutoModel
    model = cls.from_config(_config(family)).to(torch.float64).eval()
    fpt.performerize(
        model, num_features=16, seed=3, kernel=kernel, kind=kind, statistics_momentum=momentum
    )
    return model


def _ids(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _attention_modules(model):
    return [m for m in model.modules() if getattr(m, "favorplus_projection", None) is not None]


def _stats(module):
    return tuple(getattr(module, n).detach().clone() for n in STATS)


# --- the functional check -------------------------------------------------------------------

_CHECKS: list[tuple[str, float]] = []


def _expected(module, query, key, value, mask, scaling):
    """The functional favor_attention with the documented parameters."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    kernel = module.config.favorplus_kernel
    causal = mask.causal if mask is not None else bool(module.is_causal)
    key_mask = None if mask is None or mask.key_mask is None else mask.key_mask[:, None, :]
    if causal and kernel in ESTIMATORS:
        estimator = fp.OPRF if kernel == "softmax_oprf" else fp.SADERF
        kernel = estimator(statistics=fp.FeatureStatistics(*_stats(module)))
    out = fp.favor_attention(
        query,
        key,
        value,
        module.favorplus_projection,
        kernel=kernel,
        causal=causal,
        key_mask=key_mask,
        scale=scaling,
    )
    return out.transpose(1, 2), "causal" if causal else "bidirectional"


def _check_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kw):
    expected = None
    if getattr(module, "favorplus_projection", None) is not None:
        # Before the call: a training call updates the statistics after its output.
        expected, what = _expected(module, query, key, value, attention_mask, scaling)
    out, weights = fpt.favorplus_attention_forward(
        module, query, key, value, attention_mask, dropout, scaling, **kw
    )
    if expected is None:  # the first call drew the projection: check a second call
        expected, what = _expected(module, query, key, value, attention_mask, scaling)
        if module.training and module.config.favorplus_kernel in ESTIMATORS:
            what = None  # the statistics moved since: not comparable
    if what is not None:
        _CHECKS.append((what, (out - expected).abs().max().item()))
    return out, weights


AttentionInterface.register("fp_check", _check_attention)
AttentionMaskInterface.register("fp_check", fpt.favorplus_mask)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_every_kind_and_kernel_equals_the_functional_attention(family, kind, kernel):
    """Bidirectional (BERT, with padding) and causal (GPT-2) calls, in training mode (the
    statistics move between calls) and in eval mode, equal favor_attention called with
    the module's projection and the kernel the semantics prescribe."""
    model = _model(family, kernel=kernel, kind=kind)
    model.set_attn_implementation("fp_check")
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, 6:] = 0
    _CHECKS.clear()
    model.train()
    for seed in (1, 2):
        model(input_ids=_ids(2, 9, seed=seed), attention_mask=mask)
    model.eval()
    model(input_ids=ids, attention_mask=mask)
    kinds = {what for what, _ in _CHECKS}
    assert kinds == {"bidirectional" if family == "bert" else "causal"}
    assert len(_CHECKS) >= 4
    assert max(err for _, err in _CHECKS) <= 1e-12, _CHECKS
    if kernel in ESTIMATORS:
        tracked = [int(m.num_batches_tracked) for m in _attention_modules(model)]
        assert tracked == [2, 2]
        assert all(_stats(m)[0].abs().sum() > 0 for m in _attention_modules(model))


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_drawn_with_the_configured_kind(kind):
    model = _model("gpt2", kernel="softmax", kind=kind)
    model(input_ids=_ids(1, 3))
    rng = np.random.default_rng(np.random.SeedSequence([3, 0, 2 * 1]))
    expected = fp.draw_projection(16, 8, kind=kind, seed=rng, xp=torch, dtype=torch.float32)
    assert torch.equal(model.h[1].attn.favorplus_projection, expected)


# --- causal leak-freedom ----------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ESTIMATORS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("training", [False, True])
def test_causal_outputs_do_not_see_later_tokens(family, kernel, training):
    """Later inputs replaced by huge values or NaN leave earlier hidden states bit for bit
    the same, with non-zero running statistics, in eval and in training calls."""
    model = _model(family, kernel=kernel)
    model.train()
    model(input_ids=_ids(2, 8, seed=5))  # non-trivial running statistics
    model.train(training)
    embeds = model.get_input_embeddings()(_ids(2, 10)).detach()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = model(inputs_embeds=embeds).last_hidden_state
    for bad in (1e30, float("nan")):
        model.load_state_dict(state)
        changed = embeds.clone()
        changed[:, 6:] = bad
        out = model(inputs_embeds=changed).last_hidden_state
        assert torch.equal(out[:, :6], base[:, :6])
        assert not torch.equal(out[:, 6:], base[:, 6:])


@pytest.mark.parametrize("kernel", ESTIMATORS)
def test_decoder_cross_attention_does_not_see_later_tokens(kernel):
    """An encoder-decoder (Bart): the decoder's cross-attention is bidirectional over the
    encoder's keys, but its queries are the decoder's tokens in order, so it takes the
    running statistics too. Later decoder tokens leave earlier logits bit for bit the
    same, and decoding token by token with a cache equals one forward pass (float64)."""
    config = transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_ffn_dim=64, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    bart = transformers.BartForConditionalGeneration(config).double()
    fpt.performerize(bart, kernel=kernel, num_features=16)
    bart.train()
    bart(input_ids=_ids(4, 8, seed=9), decoder_input_ids=_ids(4, 6, seed=10))
    bart.eval()
    src, dec = _ids(2, 8, seed=1), _ids(2, 6, seed=3)
    later = dec.clone()
    later[:, 3:] = _ids(2, 3, seed=4)
    base = bart(input_ids=src, decoder_input_ids=dec).logits
    moved = bart(input_ids=src, decoder_input_ids=later).logits
    assert torch.equal(moved[:, :3], base[:, :3])
    assert not torch.equal(moved[:, 3:], base[:, 3:])
    encoded = bart.get_encoder()(input_ids=src)
    cache = transformers.EncoderDecoderCache(DynamicCache(), DynamicCache())
    steps = [
        bart(encoder_outputs=encoded, decoder_input_ids=dec[:, t : t + 1], cache=cache).logits
        for t in range(dec.shape[1])
    ]
    got = torch.cat(steps, 1).detach().numpy()
    np.testing.assert_allclose(got, base.detach().numpy(), rtol=0, atol=1e-12)


# --- running statistics: training updates, eval freezes -----------------------------------


def _recorded_qk(model, fn):
    """The queries and keys each attention module received during fn()."""
    seen = {}

    def record(module, query, key, value, attention_mask, *args, **kw):
        seen.setdefault(id(module), []).append((query.detach().clone(), key.detach().clone()))
        return fpt.favorplus_attention_forward(
            module, query, key, value, attention_mask, *args, **kw
        )

    AttentionInterface.register("fp_record", record)
    AttentionMaskInterface.register("fp_record", fpt.favorplus_mask)
    model.set_attn_implementation("fp_record")
    try:
        fn()
    finally:
        model.set_attn_implementation("favorplus")
    return seen


def _per_head(x):  # (batch, heads, L, d) -> (heads, d)
    return x.mean(dim=(0, 2))


@pytest.mark.parametrize("momentum", [0.25, None])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_training_updates_the_statistics_and_eval_freezes_them(family, momentum):
    model = _model(family, kernel="softmax_saderf", momentum=momentum)
    modules = _attention_modules(model) or [
        m for m in model.modules() if hasattr(m, "num_batches_tracked")
    ]
    assert len(modules) == 2
    assert all(int(m.num_batches_tracked) == 0 for m in modules)
    assert all(not any(s.any() for s in _stats(m)) for m in modules)
    model.train()
    batches = [_ids(2, 7, seed=s) for s in (1, 2, 3)]
    seen = _recorded_qk(model, lambda: [model(input_ids=b) for b in batches])
    for module in modules:
        calls = seen[id(module)]
        assert len(calls) == 3
        groups = calls[0][0].shape[1] // calls[0][1].shape[1]
        expected = [torch.zeros_like(_per_head(calls[0][0])) for _ in STATS]
        for n, (q, k) in enumerate(calls):
            k = k.repeat_interleave(groups, dim=1)
            batch = (_per_head(q), _per_head(q * q), _per_head(k), _per_head(k * k))
            f = 1.0 if n == 0 else (momentum if momentum is not None else 1.0 / (n + 1))
            expected = [e + f * (x - e) for e, x in zip(expected, batch)]
        for got, want in zip(_stats(module), expected):
            assert torch.allclose(got, want.to(got.dtype), rtol=1e-6, atol=1e-7)
        assert int(module.num_batches_tracked) == 3
    frozen = [(_stats(m), int(m.num_batches_tracked)) for m in modules]
    model.eval()
    model(input_ids=_ids(2, 7, seed=9))
    for module, (stats, count) in zip(modules, frozen):
        assert all(torch.equal(a, b) for a, b in zip(_stats(module), stats))
        assert int(module.num_batches_tracked) == count


def test_training_padding_is_left_out_of_the_statistics():
    """Padded keys of a BERT batch do not enter the running key statistics."""
    model = _model("bert", kernel="softmax_oprf")
    model.train()
    ids = _ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    other = ids.clone()
    other[1, 5:] = 7
    model(input_ids=ids, attention_mask=mask)
    first = _stats(_attention_modules(model)[0])
    model2 = _model("bert", kernel="softmax_oprf")
    model2.train()
    model2(input_ids=other, attention_mask=mask)
    second = _stats(_attention_modules(model2)[0])
    # Layer 0's keys at unpadded positions do not depend on the padded tokens' ids.
    assert torch.allclose(first[2], second[2], rtol=0, atol=1e-12)
    assert torch.allclose(first[3], second[3], rtol=0, atol=1e-12)


# --- checkpoints -------------------------------------------------------------------------------


def test_state_dict_round_trip_and_older_checkpoints():
    model = _model("gpt2", kernel="softmax_oprf", causal_lm=True)
    names = [k for k in model.state_dict() if "running_" in k or "num_batches_tracked" in k]
    assert len(names) == 2 * 5  # four statistics and the count, per layer
    model.train()
    model(input_ids=_ids(2, 8, seed=4))
    model.eval()
    ids = _ids(1, 6)
    state = model.state_dict()
    logits = model(input_ids=ids).logits

    fresh = _model("gpt2", kernel="softmax_oprf", causal_lm=True)
    assert not torch.equal(fresh(input_ids=ids).logits, logits)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh(input_ids=ids).logits, logits)

    # An older checkpoint (exact or FAVOR+ softmax, no statistics) loads strictly and
    # resets the statistics to zero: A = 0, i.e. FAVOR+ in causal calls.
    old = {k: v for k, v in state.items() if k not in names}
    fresh.load_state_dict(old, strict=True)
    for module in _attention_modules(fresh):
        assert not any(s.any() for s in _stats(module))
        assert int(module.num_batches_tracked) == 0
    plain = _model("gpt2", kernel="softmax", causal_lm=True)
    plain.load_state_dict(old, strict=True)
    assert torch.allclose(fresh(input_ids=ids).logits, plain(input_ids=ids).logits, atol=1e-12)
    # A checkpoint with part of the statistics is an error, as in torch.
    partial = {k: v for k, v in state.items() if not k.endswith("running_key_mean")}
    with pytest.raises(RuntimeError, match="running_key_mean"):
        fresh.load_state_dict(partial, strict=True)


def test_model_built_with_the_settings_registers_statistics_on_first_call(tmp_path):
    cfg = _config("gpt2")
    cfg.favorplus_kernel = "softmax_saderf"
    cfg.favorplus_projection_kind = "simplex"
    cfg.favorplus_statistics_momentum = None
    model = AutoModel.from_config(cfg, attn_implementation="favorplus")
    model.train()
    model(input_ids=_ids(2, 5))
    assert int(model.h[0].attn.num_batches_tracked) == 1
    assert "h.1.attn.running_key_sq_mean" in model.state_dict()
    model.config.save_pretrained(tmp_path)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert loaded.favorplus_kernel == "softmax_saderf"
    assert loaded.favorplus_projection_kind == "simplex"
    assert loaded.favorplus_statistics_momentum is None


def _tracking_modules(model):
    return [m for m in model.modules() if getattr(m, "num_batches_tracked", None) is not None]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_from_pretrained_restores_the_statistics_and_the_attention(tmp_path, estimator):
    model = _model("gpt2", kernel=estimator, kind="simplex", causal_lm=True)
    model.train()
    model(input_ids=_ids(3, 9, seed=5))
    model.eval()
    ids = _ids(2, 7)
    logits = model(input_ids=ids).logits
    # Small shards: the statistics are spread over several files.
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1

    # The class's own from_pretrained drops them (they start at zero) and uses sdpa.
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64)
    assert plain.config._attn_implementation != "favorplus"

    for cls in (transformers.GPT2LMHeadModel, AutoModelForCausalLM):
        loaded, info = fpt.from_pretrained(
            cls, tmp_path, dtype=torch.float64, output_loading_info=True
        )
        assert type(loaded) is transformers.GPT2LMHeadModel
        assert loaded.config._attn_implementation == "favorplus"
        assert not info["missing_keys"] and not info["unexpected_keys"]
        for saved, mine in zip(_tracking_modules(model), _tracking_modules(loaded)):
            assert all(torch.equal(a, b) for a, b in zip(_stats(saved), _stats(mine)))
            assert int(mine.num_batches_tracked) == int(saved.num_batches_tracked) == 1
        # Causal calls read the running statistics: the same logits only with them loaded.
        assert torch.equal(loaded.eval()(input_ids=ids).logits, logits)

    # The base model from the head model's checkpoint (transformers strips the prefix).
    base = fpt.from_pretrained(transformers.GPT2Model, tmp_path, dtype=torch.float64)
    assert torch.equal(
        base.h[1].attn.running_key_sq_mean, model.transformer.h[1].attn.running_key_sq_mean
    )


def test_from_pretrained_of_a_kernel_without_statistics(tmp_path):
    model = _model("bert", kernel="softmax_hyperbolic", kind="iid")
    ids = _ids(2, 6)
    hidden = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = fpt.from_pretrained(AutoModel, tmp_path, dtype=torch.float64).eval()
    assert loaded.config.favorplus_kernel == "softmax_hyperbolic"
    assert loaded.config.favorplus_projection_kind == "iid"
    assert not _tracking_modules(loaded)
    # The same projections, drawn again from the saved seed: the same outputs.
    assert torch.equal(loaded(input_ids=ids).last_hidden_state, hidden)


def test_from_pretrained_without_statistics_or_settings(tmp_path):
    # Saved with FAVOR+ softmax but a config naming OPRF: no statistics in the files,
    # so they start at zero (A = 0) and are not reported missing.
    model = _model("gpt2", kernel="softmax", causal_lm=True)
    model.config.favorplus_kernel = "softmax_oprf"
    model.save_pretrained(tmp_path / "none")
    loaded, info = fpt.from_pretrained(
        AutoModelForCausalLM, tmp_path / "none", output_loading_info=True
    )
    assert not info["missing_keys"]
    for module in _tracking_modules(loaded):
        assert not any(s.any() for s in _stats(module))
        assert int(module.num_batches_tracked) == 0
    assert len(_tracking_modules(loaded)) == 2

    # Part of a module's statistics: refused, naming the module.
    trained = _model("gpt2", kernel="softmax_oprf", causal_lm=True)
    state = {
        k: v
        for k, v in trained.state_dict().items()
        if k != "transformer.h.1.attn.running_key_mean"
    }
    trained.save_pretrained(tmp_path / "part", state_dict=state)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn"):
        fpt.from_pretrained(AutoModelForCausalLM, tmp_path / "part")

    # An exact model's checkpoint has no favorplus settings: refused, saying what to do.
    exact = AutoModelForCausalLM.from_config(_config("gpt2"))
    exact.save_pretrained(tmp_path / "exact")
    with pytest.raises(ValueError, match="performerize"):
        fpt.from_pretrained(AutoModelForCausalLM, tmp_path / "exact")
    with pytest.raises(TypeError, match="model_class"):
        fpt.from_pretrained(torch.nn.Linear, tmp_path / "exact")


def test_performerize_back_to_softmax_drops_the_statistics():
    model = _model("bert", kernel="softmax_oprf")
    assert any("running_query_mean" in k for k in model.state_dict())
    fpt.performerize(model, kernel="softmax")
    assert not any("running_" in k or "num_batches" in k for k in model.state_dict())


# --- settings are checked -----------------------------------------------------------------------


def test_settings_are_checked_naming_them():
    model = AutoModel.from_config(_config("bert"))
    with pytest.raises(ValueError, match="kind"):
        fpt.performerize(model, kind="gaussian")
    with pytest.raises(ValueError, match="kernel"):
        fpt.performerize(model, kernel="softmax_prf")
    with pytest.raises(ValueError, match="statistics_momentum"):
        fpt.performerize(model, kernel="softmax_oprf", statistics_momentum=0.0)
    with pytest.raises(TypeError, match="statistics_momentum"):
        fpt.performerize(model, kernel="softmax_oprf", statistics_momentum="0.1")
    for attr, value in (
        ("favorplus_projection_kind", "haar"),
        ("favorplus_kernel", "oprf"),
        ("favorplus_statistics_momentum", 2.0),
    ):
        cfg = _config("bert")
        setattr(cfg, attr, value)
        if attr == "favorplus_statistics_momentum":
            cfg.favorplus_kernel = "softmax_oprf"
        bad = AutoModel.from_config(cfg, attn_implementation="favorplus").train()
        with pytest.raises(ValueError, match=f"config.{attr}"):
            bad(input_ids=_ids(1, 4))


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ESTIMATORS)
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_same_tokens_with_every_cache(family, kernel):
    """Greedy tokens with FavorplusCache, DynamicCache and no cache are the same, and
    decoding reads the running statistics without changing them."""
    model = _model(family, kernel=kernel, causal_lm=True)
    model.train()
    for seed in (1, 2):
        model(input_ids=_ids(2, 8, seed=seed))
    model.eval()
    frozen = [_stats(m) for m in _attention_modules(model)]
    ids = _ids(2, 5, seed=7)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    none = model.generate(ids, use_cache=False, **common)
    dynamic = model.generate(ids, cache=DynamicCache(config=model.config), **common)
    favor = model.generate(ids, cache=fpt.FavorplusCache(), **common)
    assert torch.equal(none, dynamic)
    assert torch.equal(none, favor)
    for module, stats in zip(_attention_modules(model), frozen):
        assert all(torch.equal(a, b) for a, b in zip(_stats(module), stats))


def test_favorplus_cache_steps_equal_one_causal_forward_with_running_statistics():
    model = _model("llama", kernel="softmax_saderf", causal_lm=True)
    model.train()
    model(input_ids=_ids(2, 8, seed=3))
    model.eval()
    ids = _ids(2, 7, seed=8)
    full = model(input_ids=ids).logits
    cache = fpt.FavorplusCache()
    parts = [model(input_ids=ids[:, :4], cache=cache, use_cache=True).logits]
    for t in range(4, 7):
        parts.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    stepped = torch.cat(parts, dim=1)
    assert torch.allclose(stepped, full, rtol=1e-9, atol=1e-10)

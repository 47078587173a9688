"""The lean forward (mtplab.fastpath) is transformers' Llama forward, only without its per-call machinery: its
logits and hidden states must equal transformers' own, bit for bit, for every kind of pass the decoder makes."""
import pytest
import torch

import mtplab
from mtplab import fastpath, models
from mtplab.models import crop_cache, forward, new_cache
from mtplab.tree import build_tree


def passes(model, lean: bool) -> list:
    """Every kind of pass mtplab makes, on one cache: prefill, a one-token step, a 5-token verify, reading the last
    hidden states, reading layer inputs (EAGLE-3), a last-row-only pass, a rollback, a token-tree pass."""
    vocab = model.config.vocab_size
    ids = [(3 + 7 * i) % vocab for i in range(23)]
    cache, out = new_cache(model), []
    layers = len(model.model.layers)
    calls = []
    real = fastpath.forward

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with torch.inference_mode(), (torch.no_grad() if lean else fastpath.transformers_forward(model)):
        fastpath.forward = counted
        try:
            out.append(forward(model, ids[:17], cache)[0])
            out.append(forward(model, ids[17:18], cache)[0])
            out += forward(model, ids[18:23], cache, hidden=True)
            out += forward(model, [5, 6, 7], cache, hidden=[0, 1, layers], logits=False)
            crop_cache(cache, 19)  # roll back the verify's rejected rows
            out.append(forward(model, [9, 10], cache)[0])
            tree = build_tree([[11, 12, 13], [11, 14], [15]])
            out.append(forward(model, [16] + tree.tokens, cache, tree=tree)[0])
        finally:
            fastpath.forward = real
    assert bool(calls) == lean, "the lean path was (not) taken"
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_lean_forward_equals_transformers_bit_for_bit(seed):
    model = mtplab.tiny_random_target(vocab_size=64, seed=seed, num_layers=3).model
    assert fastpath.unsupported(model) is None
    lean, ref = passes(model, True), passes(model, False)
    assert [t.shape for t in lean] == [t.shape for t in ref]
    for a, b in zip(lean, ref):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_bundled_target_lean_forward_equals_transformers(bundled):
    assert fastpath.unsupported(bundled.model) is None
    for a, b in zip(passes(bundled.model, True), passes(bundled.model, False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # the kernel plan (and fused layers) on one side only


def test_other_models_and_modes_take_transformers_forward(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaModel

    tiny = mtplab.tiny_random_target().model
    monkeypatch.setenv("MTPLAB_KERNELS", "off")
    assert "MTPLAB_KERNELS=off" in fastpath.unsupported(tiny)
    monkeypatch.setenv("MTPLAB_KERNELS", "auto")
    with fastpath.transformers_forward(tiny):
        with fastpath.transformers_forward(tiny):  # nested: the outer block still holds after the inner one
            pass
        assert "transformers_forward" in fastpath.unsupported(tiny)
    assert fastpath.unsupported(tiny) is None
    tiny.train()
    assert "training mode" in fastpath.unsupported(tiny)
    tiny.eval()

    class Custom(LlamaForCausalLM):  # a subclass may change what forward does
        pass
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1)
    assert "not transformers' LlamaForCausalLM" in fastpath.unsupported(Custom(cfg).eval())
    scaled = LlamaForCausalLM(LlamaConfig(**{**cfg.to_dict(), "rope_parameters": {
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}})).eval()
    assert "rope_type 'dynamic'" in fastpath.unsupported(scaled)
    assert isinstance(tiny.model, LlamaModel)


def test_bad_layer_ids_are_refused_on_the_lean_path():
    model = mtplab.tiny_random_target(num_layers=2).model
    with pytest.raises(ValueError, match=r"layer ids must be in \[0, 2\]"):
        forward(model, [1, 2], new_cache(model), hidden=[3])


def test_user_model_is_untouched_by_the_lean_path(tmp_path):
    """The lean path only reads the model: afterwards generate and pickling work and give what they gave before."""
    import pickle

    target = mtplab.tiny_random_target(vocab_size=64, seed=2)
    x = torch.tensor([[1, 2, 3]])
    before = target.model.generate(x, max_new_tokens=6, do_sample=False)
    with torch.inference_mode():
        models.forward(target.model, [1, 2, 3, 4], new_cache(target.model), hidden=[0, 2])
    assert torch.equal(target.model.generate(x, max_new_tokens=6, do_sample=False), before)
    assert not target.model._forward_hooks and not any(m._forward_pre_hooks for m in target.model.modules())
    pickle.loads(pickle.dumps(target.model))


@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_cache_appends_in_place_across_steps_and_rollbacks(grad_mode):
    """A step writes its rows into the cache's buffer and a rollback only shortens the views; the whole cache is
    copied only when the buffer is full. (Under inference_mode a view has no ``_base``: checking it made every step
    copy the whole cache.) The contents equal a fresh prefill of the same tokens."""
    model = mtplab.tiny_random_target(vocab_size=64, seed=0, num_layers=2).model
    ids = [(3 + 7 * i) % 64 for i in range(40)]
    with grad_mode():
        cache = new_cache(model)
        forward(model, ids[:20], cache)
        buffers = [layer.keys.data_ptr() for layer in cache.layers]
        room = cache.layers[0]._kbuf.shape[-2]
        for n in range(20, 36, 4):  # verify 4 tokens, keep 3, then a one-token step
            forward(model, ids[n:n + 4], cache)
            crop_cache(cache, n + 3)
            forward(model, [ids[n + 3]], cache)
        assert cache.get_seq_length() == 36 <= room
        assert [layer.keys.data_ptr() for layer in cache.layers] == buffers, "the cache was copied"
        assert all(layer.values.data_ptr() == layer._vbuf.data_ptr() for layer in cache.layers)
        fresh = new_cache(model)
        forward(model, ids[:36], fresh)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)


def fused_calls(monkeypatch) -> list:
    """Records the row count of every pass that takes the fused C layers."""
    calls, real = [], fastpath._fused_layers

    def counted(decoder, x, *a, **k):
        calls.append(x.shape[0])
        return real(decoder, x, *a, **k)

    monkeypatch.setattr(fastpath, "_fused_layers", counted)
    return calls


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_layers_equal_the_lean_forward(seed, monkeypatch):
    """The fused C layers compute the same passes (steps, verifies, hidden states, layer inputs, a rollback, a token
    tree) to float rounding; the 17-token prefill (more than 16 rows) takes the PyTorch layers."""
    model = mtplab.tiny_random_target(vocab_size=64, seed=seed, num_layers=3).model
    lean = passes(model, True)
    calls = fused_calls(monkeypatch)
    with fastpath.fused_forward(model):
        fused = passes(model, True)
    assert calls == [1, 5, 3, 2, 6]
    for a, b in zip(fused, lean):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_attention_keeps_large_scores_exact():
    """Attention scores far beyond exp's float range (sharp heads): the fused softmax subtracts the row's maximum
    first, as SDPA does, so it still matches the lean forward."""
    model = mtplab.tiny_random_target(vocab_size=64, seed=4, num_layers=2).model
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(40.0)
            layer.self_attn.k_proj.weight.mul_(40.0)
    lean = passes(model, True)
    with fastpath.fused_forward(model):
        fused = passes(model, True)
    for a, b in zip(fused, lean):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_pass_rows_equal_one_token_steps_bit_for_bit():
    """Each row of a fused pass is computed on its own, in the same order: a verify over 5 tokens gives every row
    exactly what 5 one-token steps give (logits and hidden states), so speculative and plain decoding see the same
    numbers."""
    model = mtplab.tiny_random_target(vocab_size=64, seed=3, num_layers=3).model
    ids = [(5 + 11 * i) % 64 for i in range(22)]
    with torch.inference_mode(), fastpath.fused_forward(model):
        cache = new_cache(model)
        forward(model, ids[:17], cache)
        logits, hidden = forward(model, ids[17:22], cache, hidden=True)
        crop_cache(cache, 17)
        steps = [forward(model, [t], cache, hidden=True) for t in ids[17:22]]
    assert torch.equal(logits, torch.cat([s[0] for s in steps]))
    assert torch.equal(hidden, torch.cat([s[1] for s in steps]))


def test_fused_layers_step_aside_for_hooks_autograd_and_models_they_cannot_run(monkeypatch):
    model = mtplab.tiny_random_target(vocab_size=64, seed=0, num_layers=2).model
    calls = fused_calls(monkeypatch)
    with fastpath.fused_forward(model):
        seen = []
        handle = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
        with torch.inference_mode():
            forward(model, [1, 2], new_cache(model))
        handle.remove()
        assert seen == [1] and calls == []  # a hook on a linear runs: the pass took the PyTorch layers
        forward(model, [1, 2], new_cache(model))  # autograd on: the C layers have no backward
        assert calls == []
        with torch.inference_mode():
            forward(model, [1, 2], new_cache(model))
        assert calls == [2]
    model.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        with fastpath.fused_forward(model):
            pass
    model.config.hidden_act = "silu"
    monkeypatch.setenv("MTPLAB_KERNELS", "off")
    with pytest.raises(ValueError, match="MTPLAB_KERNELS=off"):
        with fastpath.fused_forward(model):
            pass


@pytest.mark.slow
def test_bundled_target_through_the_fused_layers(bundled):
    """On the bundled model: the fused passes equal the lean forward to float rounding, and greedy speculative
    decoding with the shipped drafter gives transformers' generate token for token."""
    model = bundled.model
    lean = passes(model, True)
    with fastpath.fused_forward(model):
        fused = passes(model, True)
        ids = bundled.encode("Explain why the sky is blue.")
        trace = mtplab.SpeculativeDecoder(bundled, mtplab.load_drafter("mtp"), num_draft_tokens=3,
                                          schedule="constant").generate(ids, max_new_tokens=40)
    for a, b in zip(fused, lean):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False)[0, len(ids):].tolist()
    assert trace.token_ids == want

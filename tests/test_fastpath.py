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
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # the kernel plan may engage on one side only


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

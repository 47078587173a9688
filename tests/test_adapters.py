"""Adapters for real MTP drafters, checked against transformers' own assisted generation on tiny random models.

* Gemma 4: a ``Gemma4ForCausalLM`` target + ``Gemma4AssistantForCausalLM`` against
  ``model.generate(..., assistant_model=assistant)`` (transformers' ``SinglePositionMultiTokenCandidateGenerator``);
* DeepSeek-V3 with its MTP layers against ``model.generate(..., use_mtp=True)`` (``MTPCandidateGenerator``).

Random drafters are almost never right, so the drafters here are made "near copies": they mostly carry the target's
hidden state through to the target's LM head and therefore draft "the token the target just predicted" again, which is
right whenever the tiny target repeats itself (tiny random models do, a lot). Their own layers still contribute, so a
wrong cache or attention input changes the drafts.
"""
import huggingface_hub.constants
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from scipy.stats import chisquare
from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, Gemma4AssistantConfig, Gemma4AssistantForCausalLM,
                          Gemma4ForCausalLM, Gemma4TextConfig)
from transformers.generation.candidate_generator import (MTPCandidateGenerator,
                                                         SinglePositionMultiTokenCandidateGenerator)
from transformers.modeling_layers import MtpModel

import mtplab
from mtplab import SpeculativeDecoder, sampling
from mtplab.models import forward, new_cache
from mtplab.sampling import SamplingConfig

from conftest import tiny

PROMPT = [1, 2, 3, 4, 5, 6, 1, 2, 3]
H = 32  # hidden size of every tiny model here


# --- tiny models ----------------------------------------------------------------------------------------------------
def gemma4_layers(n, vocab, window):
    return dict(vocab_size=vocab, hidden_size=H, intermediate_size=2 * H, num_hidden_layers=n, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=window,
                layer_types=["sliding_attention", "full_attention"] * (n // 2), max_position_embeddings=512,
                initializer_range=0.2, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def gemma4_pair(seed=0, vocab=64, window=64, sparse_head=False, kv_shared_layers=2):
    """A 4-layer Gemma 4 target whose last 2 layers share KV (as in gemma-4-E2B) and a 2-layer near-copy assistant."""
    torch.manual_seed(seed)
    target = Gemma4ForCausalLM(Gemma4TextConfig(**gemma4_layers(4, vocab, window), num_kv_shared_layers=kv_shared_layers,
                                                hidden_size_per_layer_input=8, vocab_size_per_layer_input=vocab))
    config = Gemma4AssistantConfig(
        text_config=dict(model_type="gemma4_text", **gemma4_layers(2, vocab, window), hidden_size_per_layer_input=0,
                         vocab_size_per_layer_input=0),
        backbone_hidden_size=H, use_ordered_embeddings=sparse_head, num_centroids=4, centroid_intermediate_top_k=2)
    assistant = Gemma4AssistantForCausalLM(config)
    with torch.no_grad():
        assistant.pre_projection.weight.copy_(torch.cat([0.02 * torch.randn(H, H), torch.eye(H)], dim=1))
        assistant.post_projection.weight.copy_(torch.eye(H))
        assistant.lm_head.weight.copy_(target.lm_head.weight)
        for layer in assistant.model.layers:
            layer.post_attention_layernorm.weight.mul_(0.3)
            layer.post_feedforward_layernorm.weight.mul_(0.3)
        if sparse_head:  # the centroid head of the E2B/E4B assistants: only the tokens of the top-2 of 4 clusters
            assistant.masked_embedding.token_ordering.copy_(torch.randperm(vocab))
    return target.eval(), assistant.eval()


def deepseek_with_mtp(folder, num_mtp_layers, seed=3, vocab=64):
    """A 2-layer DeepSeek-V3 checkpoint folder whose MTP layers sit where DeepSeek's do (``model.layers.{2, 3, ..}``),
    loaded back like a real one."""
    torch.manual_seed(seed)
    config = DeepseekV3Config(
        vocab_size=vocab, hidden_size=H, intermediate_size=2 * H, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, num_mtp_layers=num_mtp_layers, max_position_embeddings=512,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = DeepseekV3ForCausalLM(config)
    mtp = MtpModel(model, num_mtp_layers)
    with torch.no_grad():
        for layer in mtp.layers:  # near copy: [embedding, hidden] -> mostly the hidden half, then a damped copy of
            layer.mtp_block.load_state_dict(model.model.layers[-1].state_dict())  # the target's last (MoE) layer
            for norm in (layer.enorm, layer.hnorm, layer.post_norm):
                norm.weight.fill_(1.0)
            layer.eh_proj.weight.copy_(torch.cat([0.02 * torch.randn(H, H), torch.eye(H)], dim=1))
            layer.mtp_block.self_attn.o_proj.weight.mul_(0.6)
            layer.mtp_block.mlp.experts.down_proj.mul_(0.6)
            layer.mtp_block.mlp.shared_experts.down_proj.weight.mul_(0.6)
    model.save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    for key, value in mtp.state_dict().items():  # layers.{j}.[mtp_block.]x -> model.layers.{2 + j}.x
        if key.startswith("layers."):
            _, j, rest = key.split(".", 2)
            weights[f"model.layers.{2 + int(j)}.{rest.removeprefix('mtp_block.')}"] = value.contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    # DeepSeek-V3 names its MTP weights by layer number (61, for the real 61-layer model): name ours
    pattern = [rf"model\.layers\.{2 + j}\..*" for j in range(num_mtp_layers)]
    return pattern


def load_deepseek(folder, pattern):
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the MTP weights are "unexpected" to the target itself
    try:
        model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    model._keys_to_ignore_on_load_unexpected = pattern
    return model


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """``num_mtp_layers -> loaded target model`` (1 and 2 MTP layers)."""
    out = {}
    for n in (1, 2):
        folder = tmp_path_factory.mktemp(f"deepseek-mtp{n}")
        out[n] = load_deepseek(folder, deepseek_with_mtp(folder, n))
    return out


def chi_square_p(observed, expected):
    """p-value of a chi-square test, the cells expected fewer than 5 times pooled into one."""
    keep = expected >= 5
    obs = torch.cat([observed[keep], observed[~keep].sum()[None]]).numpy()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).numpy()
    if exp[-1] == 0:
        assert obs[-1] == 0
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs, exp * obs.sum() / exp.sum())


# --- transformers' own runs, instrumented -----------------------------------------------------------------------------
def hf_assisted(model, ids, max_new_tokens, generator_cls, fix_stale_kv_row=False, **kwargs):
    """transformers' assisted generation; returns (new tokens, drafted tokens per round, accepted count per round).

    ``fix_stale_kv_row``: drop the last row of the verify pass's shared KV states (see test_gemma4_matches_transformers).
    """
    drafts, accepted = [], []
    get, update = generator_cls.get_candidates, generator_cls.update_candidate_strategy

    def get_candidates(self, input_ids, **kw):
        outputs = kw.get("model_outputs")
        if fix_stale_kv_row and outputs is not None and not kw.get("is_first_iteration"):
            n = input_ids.shape[1] - 1  # the target's KV holds every token but the newest
            outputs.shared_kv_states = {t: (k[:, :, :n], v[:, :, :n]) for t, (k, v) in outputs.shared_kv_states.items()}
        candidates, logits = get(self, input_ids, **kw)
        drafts.append(candidates[0, input_ids.shape[1]:].tolist())
        return candidates, logits

    def update_candidate_strategy(self, input_ids, scores, num_matches):
        accepted.append(int(num_matches))
        return update(self, input_ids, scores, num_matches)

    with pytest.MonkeyPatch.context() as m, torch.inference_mode():
        m.setattr(generator_cls, "get_candidates", get_candidates)
        m.setattr(generator_cls, "update_candidate_strategy", update_candidate_strategy)
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(ids):].tolist(), drafts, accepted


def hf_plain(model, ids, max_new_tokens):
    with torch.inference_mode():
        return model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0, len(ids):].tolist()


def assert_same_rounds(trace, hf_drafts, hf_accepted):
    """Round by round: what mtplab drafted is what transformers drafted (mtplab drafts fewer where only the budget is
    left; transformers' MTP drafts num_mtp_layers tokens anyway and cuts after), and as many were accepted."""
    ours = [r.draft_ids for r in trace.rounds]
    assert len(ours) == len(hf_drafts)
    assert [d[: len(o)] for d, o in zip(hf_drafts, ours)] == ours
    assert [r.num_accepted for r in trace.rounds] == hf_accepted


# --- Gemma 4 assistant -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("seed", [0, 2])
def test_gemma4_matches_transformers(seed, k):
    """Same tokens as transformers' assisted generation and as plain greedy decoding; the same drafts and accepted
    counts, round by round, as transformers once its off-by-one is fixed.

    transformers slices the verify pass's shared KV states to the new sequence length, which after a partial
    acceptance keeps one row of the first rejected draft (the target's KV holds every token but the newest). The
    adapter reads the target's rolled-back cache instead; without the fix the drafts differ after a rejection (the
    output cannot: verification is lossless either way)."""
    target, assistant = gemma4_pair(seed)
    assistant.generation_config.num_assistant_tokens = k
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    n = 30
    want = hf_plain(target, PROMPT, n)
    trace = SpeculativeDecoder(mtplab.Target(target), mtplab.Gemma4AssistantDrafter(assistant),
                               num_draft_tokens=k, schedule="constant").generate(PROMPT, max_new_tokens=n)
    assert trace.token_ids == want
    hf_tokens, _, _ = hf_assisted(target, PROMPT, n, SinglePositionMultiTokenCandidateGenerator, assistant_model=assistant)
    assert hf_tokens == want
    _, drafts, accepted = hf_assisted(target, PROMPT, n, SinglePositionMultiTokenCandidateGenerator,
                                      fix_stale_kv_row=True, assistant_model=assistant)
    assert_same_rounds(trace, drafts, accepted)
    assert trace.rounds[0].num_drafted == 0  # as transformers: the first round is a plain target step
    assert all(r.draft_start_position == r.context_len - 2 for r in trace.rounds if r.num_drafted)
    assert trace.metrics.accepted > 0 and (k == 1 or max(r.num_accepted for r in trace.rounds) > 1)


@pytest.mark.parametrize("kv_shared_layers", [2, 0])
def test_gemma4_past_the_sliding_window(kv_shared_layers):
    """A sliding window of 8 and 40 new tokens: the target's sliding layers and the assistant's reads of their KV
    roll back correctly past the window (greedy output = transformers' plain decoding). Also for a target without
    KV-shared layers, where the assistant reads the target's last layer of each kind (transformers 5.23's own
    assisted generation fails there with a KeyError: such targets return no shared KV states)."""
    target, assistant = gemma4_pair(seed=0, window=8, kv_shared_layers=kv_shared_layers)
    want = hf_plain(target, PROMPT, 40)
    trace = SpeculativeDecoder(mtplab.Target(target), mtplab.Gemma4AssistantDrafter(assistant),
                               num_draft_tokens=4, schedule="constant").generate(PROMPT, max_new_tokens=40)
    assert trace.token_ids == want
    assert trace.metrics.accepted > 0
    assert trace.rounds[-1].target_cache_len == len(PROMPT) + 40 - 1


def test_gemma4_sampled_drafts_follow_q():
    """The tokens the adapter draws follow the q it reports (sparse centroid head: q is not zero outside the chosen
    clusters, as transformers' masked logits are finite). 2000 draws of two drafted tokens, chi-square on both."""
    v = 8
    target, assistant = gemma4_pair(seed=1, vocab=v, sparse_head=True)
    t = mtplab.Target(target)
    drafter = mtplab.Gemma4AssistantDrafter(assistant)
    drafter.bind(t)
    cfg = SamplingConfig(1.0)
    ids = PROMPT[:5]
    with torch.inference_mode():  # the state a decoder leaves after the prompt and its plain first round
        cache = mtplab.models.new_cache(target)
        logits, hidden = mtplab.models.forward(target, ids, cache, hidden=True)
        drafter.reset(ids)
        drafter.observe(hidden, cache)
        assert drafter.propose(ids, 2, cfg, None).tokens == []  # the first round drafts nothing
        ids = ids + [int(torch.argmax(logits[-1]))]
        g = torch.Generator().manual_seed(0)
        n = 2000
        first, joint, expected_first, expected_joint = (torch.zeros(v), torch.zeros(v, v), torch.zeros(v),
                                                        torch.zeros(v, v))
        for _ in range(n):
            d = drafter.propose(ids, 2, cfg, g, hidden[-1])
            x1, x2 = d.tokens
            first[x1] += 1
            joint[x1, x2] += 1
            expected_first += d.q[0]
            expected_joint[x1] += d.q[1]  # given the first draw, the second follows q[1]
    for obs, exp in ((first, expected_first), (joint.flatten(), expected_joint.flatten())):
        stat, pvalue = chi_square_p(obs, exp)
        assert pvalue > 1e-3, f"drafted tokens do not follow q (chi2={stat:.1f}, p={pvalue:.2g})"


def test_gemma4_sampling_follows_the_target():
    """The real decoder with the assistant, sampling (temperature 1, top-k 6): tokens 2 and 3, decided by the first
    round that drafts (2 tokens), follow the target's distribution (marginal over token 1). Seeded chi-square, 600 runs."""
    v = 8
    target, assistant = gemma4_pair(seed=1, vocab=v, sparse_head=True)
    cfg = SamplingConfig(1.0, top_k=6)
    ctx = PROMPT[:5]
    dec = SpeculativeDecoder(mtplab.Target(target), mtplab.Gemma4AssistantDrafter(assistant), num_draft_tokens=2, schedule="constant",
                             temperature=cfg.temperature, top_k=cfg.top_k, record=False)
    n = 600
    counts = torch.zeros(v * v)
    drafted = 0
    for seed in range(n):
        trace = dec.generate(ctx, max_new_tokens=4, seed=seed)
        y = trace.token_ids
        counts[y[1] * v + y[2]] += 1
        drafted += trace.rounds[1].num_drafted
    assert drafted == 2 * n
    with torch.inference_mode():
        dist = lambda ids: sampling.probs(target(torch.tensor(ids)).logits[:, -1], cfg).double()
        p1 = dist([ctx])[0]
        p2 = dist([ctx + [a] for a in range(v)])  # [y1, y2]
        p3 = dist([ctx + [a, b] for a in range(v) for b in range(v)]).view(v, v, v)  # [y1, y2, y3]
    expected = (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten() * n
    stat, pvalue = chi_square_p(counts, expected)
    assert pvalue > 1e-3, f"speculative samples do not follow the target (chi2={stat:.1f}, p={pvalue:.2g})"


# --- DeepSeek-V3 MTP layers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_mtp_layers", [1, 2])
def test_builtin_mtp_matches_transformers(deepseek, num_mtp_layers):
    """Same tokens as ``generate(use_mtp=True)`` and as plain greedy decoding, and the same drafts and accepted counts
    round by round (transformers' MTP always drafts num_mtp_layers tokens, so γ = num_mtp_layers)."""
    model = deepseek[num_mtp_layers]
    n = 30
    want = hf_plain(model, PROMPT, n)
    hf_tokens, drafts, accepted = hf_assisted(model, PROMPT, n, MTPCandidateGenerator, use_mtp=True)
    assert hf_tokens == want
    drafter = mtplab.BuiltinMTPDrafter()
    trace = SpeculativeDecoder(mtplab.Target(model), drafter, num_draft_tokens=num_mtp_layers, schedule="constant").generate(PROMPT, n)
    assert trace.token_ids == want
    assert_same_rounds(trace, drafts, accepted)
    assert trace.metrics.accepted > 0 and max(r.num_accepted for r in trace.rounds) == num_mtp_layers
    if num_mtp_layers == 2:  # both cache paths ran: rows redone after a rejection, kept after full acceptance
        assert {0, 2} <= {r.num_accepted for r in trace.rounds}


@pytest.mark.parametrize("gamma", [1, 2])
def test_builtin_mtp_drafts_as_if_from_scratch(deepseek, gamma):
    """With 2 MTP layers, every round's draft equals what the layers draft when run from scratch over the whole
    context: their caches were extended, cut back and redone correctly. γ=1 is a case transformers never runs (its MTP
    always drafts num_mtp_layers tokens): the second layer's newest rows then come from a draft nobody verified."""
    model = deepseek[2]
    target = mtplab.Target(model)
    trace = SpeculativeDecoder(target, mtplab.BuiltinMTPDrafter(), num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 30)
    assert trace.token_ids == hf_plain(model, PROMPT, 30) and trace.metrics.accepted > 0
    fresh = mtplab.BuiltinMTPDrafter()
    fresh.bind(target)
    ids = PROMPT + trace.token_ids
    with torch.inference_mode():
        for r in trace.rounds:
            if r.num_drafted:
                ctx = ids[: r.context_len]
                _, hidden = forward(model, ctx[:-1], new_cache(model), hidden=True)
                fresh.reset(ctx)
                fresh.first_round = False
                fresh.observe(hidden, None)
                assert fresh.propose(ctx, r.num_draft_tokens, SamplingConfig(), None).tokens == r.draft_ids


def test_builtin_mtp_logits_are_transformers_own(deepseek):
    """``BuiltinMTPDrafter.logits`` (public API) computes what ``MtpModel`` computes with its private
    ``_project_to_logits``, also with a muP width multiplier and a padded vocabulary (as Inkling's configs have)."""
    drafter = mtplab.BuiltinMTPDrafter.from_target(mtplab.Target(deepseek[1]))
    states = torch.randn(1, 3, H)
    config = drafter.mtp.config
    with torch.inference_mode():
        assert torch.equal(drafter.logits(states), drafter.mtp._project_to_logits(states))
        config.logits_mup_width_multiplier, config.unpadded_vocab_size = 4.0, 60
        try:
            got = drafter.logits(states)
            assert got.shape[-1] == 60 and torch.equal(got, drafter.mtp._project_to_logits(states))
        finally:
            del config.logits_mup_width_multiplier, config.unpadded_vocab_size


# --- the decoder hook both adapters use ---------------------------------------------------------------------------------
class Recorder(mtplab.PromptLookupDrafter):
    uses_target_hidden = True

    def reset(self, prompt_ids, target_hidden=None):
        super().reset(prompt_ids, target_hidden)
        self.seen = []

    def observe(self, target_hidden, target_cache):
        self.seen.append((len(target_hidden), target_cache.get_seq_length()))


def test_observe_gets_every_final_hidden_state_once():
    target = tiny()
    drafter = Recorder()
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(PROMPT, max_new_tokens=20)
    rows = [m for m, _ in drafter.seen]
    assert rows == [len(PROMPT) - 1] + [r.num_accepted + 1 for r in trace.rounds]
    assert [c for _, c in drafter.seen] == list(torch.tensor(rows).cumsum(0))  # the cache holds exactly those
    assert sum(rows) == len(PROMPT) + 20 - 1


# --- load_pair and errors --------------------------------------------------------------------------------------------
def save_tokenizer(folder, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def test_load_pair_from_local_folders(tmp_path, monkeypatch):
    target, assistant = gemma4_pair(seed=0)
    target.save_pretrained(tmp_path / "gemma")
    save_tokenizer(tmp_path / "gemma", 64)
    assistant.save_pretrained(tmp_path / "gemma-assistant")  # Google's naming: <target>-assistant
    t, drafter = mtplab.load_pair(str(tmp_path / "gemma"))
    assert isinstance(drafter, mtplab.Gemma4AssistantDrafter)
    trace = SpeculativeDecoder(t, drafter, num_draft_tokens=3, schedule="constant").generate("t1 t2 t3 t4 t5 t6 t1 t2 t3", 20)
    assert trace.token_ids == hf_plain(target, PROMPT, 20)

    pattern = deepseek_with_mtp(tmp_path / "deepseek", 1)
    save_tokenizer(tmp_path / "deepseek", 64)
    monkeypatch.setattr(DeepseekV3ForCausalLM, "_keys_to_ignore_on_load_unexpected", pattern)
    t, drafter = mtplab.load_pair(tmp_path / "deepseek")
    assert isinstance(drafter, mtplab.BuiltinMTPDrafter) and drafter.num_layers == 1
    trace = SpeculativeDecoder(t, drafter, num_draft_tokens=1, schedule="constant").generate("t1 t2 t3 t4 t5 t6 t1 t2 t3", 20)
    assert trace.token_ids == hf_plain(t.model, PROMPT, 20)


def test_load_pair_offline_raises_transformers_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network attempt at all
    with pytest.raises(OSError, match="huggingface.co"):
        mtplab.load_pair("google/gemma-4-E2B-it")


def test_adapter_errors(deepseek):
    with pytest.raises(ValueError, match="num_mtp_layers"):
        SpeculativeDecoder(tiny(), mtplab.BuiltinMTPDrafter())
    _, assistant = gemma4_pair(vocab=64)
    with pytest.raises(ValueError, match="64 tokens"):
        SpeculativeDecoder(tiny(vocab_size=32), mtplab.Gemma4AssistantDrafter(assistant))
    with pytest.raises(TypeError, match="Gemma4AssistantForCausalLM"):
        mtplab.Gemma4AssistantDrafter(tiny().model)
    with pytest.raises(ValueError, match="load_pair needs"):
        mtplab.load_pair(None)

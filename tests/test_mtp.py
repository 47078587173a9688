"""mtplab's MTP drafter on tiny random targets: exactness (greedy and sampled), save/load, training (the one
trainer: loss, draft vocabulary, acceptance, resume and its refusals, both data paths), bad checkpoints."""
import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, sampling
from mtplab.drafters.mtp import MTPDrafter, MTPHead
from mtplab.sampling import SamplingConfig
from mtplab.train import conditional_acceptance, draft_vocabulary, train_on_sequences, vllm_acceptance

from conftest import tiny
from test_distribution import CONFIGS, CTX, V, dist, first_token_dist, target_joint, two_token_dist

PROMPT = [1, 2, 3, 4, 5, 6, 1, 2, 3]


def random_mtp(target, seed=0, vocab_ids=None, context_attention=False):
    torch.manual_seed(seed)
    head = MTPHead(target.model.config.hidden_size, num_layers=2, context_attention=context_attention)
    for p in head.parameters():  # a random head with peaky, varied outputs
        torch.nn.init.normal_(p, std=0.3)
    return MTPDrafter(head, vocab_ids)


@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("vocab", [None, list(range(0, 64, 2))])
def test_greedy_mtp_equals_plain(gamma, vocab):
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    trace = SpeculativeDecoder(target, random_mtp(target, vocab_ids=vocab), num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want
    assert all(r.draft_start_position == r.context_len - 2 for r in trace.rounds if r.num_drafted)
    if vocab:
        assert all(t % 2 == 0 for r in trace.rounds for t in r.draft_ids)  # drafts stay in the draft vocabulary


def mtp_q(target, drafter, cfg):
    """The drafter's q for the first drafted position at a context, and for the second after drafting x1."""
    drafter.bind(target)

    def state(ctx):
        with torch.inference_mode():
            h = target.model(torch.tensor([ctx[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
            return drafter.head(h, drafter.embed(torch.tensor(ctx[-1])))

    def q_first(ctx):
        with torch.inference_mode():
            return sampling.probs(drafter.logits(state(ctx)), cfg).double()

    def q_next(ctx, x1):
        with torch.inference_mode():
            s2 = drafter.head(state(ctx), drafter.embed(torch.tensor(x1)))
            return sampling.probs(drafter.logits(s2), cfg).double()

    return q_first, q_next


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_distribution_mtp(cfg):
    target = tiny(vocab_size=V)
    drafter = random_mtp(target, vocab_ids=[0, 1, 2, 3, 5])  # a restricted draft vocabulary: q = 0 elsewhere
    q_first, q_next = mtp_q(target, drafter, cfg)
    assert torch.allclose(first_token_dist(target, q_first, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    joint = two_token_dist(target, q_first, CTX, cfg, q_next)
    assert torch.allclose(joint, target_joint(target, CTX, cfg), atol=1e-9)


def test_chi_square_mtp_on_real_decoder():
    from scipy.stats import chisquare

    target = tiny(vocab_size=V)
    dec = SpeculativeDecoder(target, random_mtp(target), num_draft_tokens=3, schedule="constant", temperature=1.0, record=False)
    n, counts = 1000, torch.zeros(V * V)
    for seed in range(n):
        y = dec.generate(CTX, max_new_tokens=2, seed=seed).token_ids
        counts[y[0] * V + y[1]] += 1
    expected = target_joint(target, CTX, SamplingConfig(1.0)).flatten() * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).numpy()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).numpy()
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_head_norms_are_torchs_rmsnorm_as_the_shipped_head_was_trained():
    """The shipped head loads into torch.nn.RMSNorm modules (same state-dict keys) with eps 1e-5, and they compute
    the hand-written norm it was trained with (weight * x * rsqrt(mean(x^2) + eps)) up to float32 rounding."""
    from mtplab.drafters.mtp import shipped_path

    head = MTPDrafter.load(shipped_path()).head
    norms = [m for m in head.modules() if isinstance(m, torch.nn.RMSNorm)]
    assert len(norms) == 3 + head.config["num_layers"] and all(m.eps == 1e-5 for m in norms)
    torch.manual_seed(0)
    for m in norms:
        for scale in (1e-3, 1.0, 100.0):
            x = torch.randn(5, m.weight.shape[0]) * scale
            want = m.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
            torch.testing.assert_close(m(x), want, rtol=1e-6, atol=1e-6)


# --- context copying (the shipped drafter's context_ngram) ------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("ngram", [1, 2, 3])
def test_greedy_mtp_with_context_copy_equals_plain(gamma, ngram):
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    drafter = random_mtp(target)
    drafter.context_ngram = ngram
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_distribution_mtp_with_context_copy(cfg):
    """Copied tokens are deterministic (q one-hot), the others sampled from the head: verification stays exact.
    CTX = [1, 2, 3, 1, 2] ends in the 2-gram [1, 2] seen before, so position 1 copies 3; position 2 copies only
    after x1 = 3 (the 2-gram [2, 3]) and otherwise samples from the head."""
    from mtplab.drafters.prompt_lookup import lookup
    from mtplab.sampling import one_hot

    target = tiny(vocab_size=V)
    drafter = random_mtp(target, vocab_ids=[0, 1, 2, 3, 5])
    drafter.context_ngram = 2
    q_first_head, q_next_head = mtp_q(target, drafter, cfg)

    def copied(ids, q):
        c = lookup(ids, 1, 3, 2)
        return one_hot(c[0], q) if c else q

    q_first = lambda ctx: copied(ctx, q_first_head(ctx))
    q_next = lambda ctx, x1: copied(ctx + [x1], q_next_head(ctx, x1))
    # the drafter's own q rows are the ones the enumeration assumes
    with torch.inference_mode():
        h = target.model(torch.tensor([CTX[:-1]]), output_hidden_states=True).hidden_states[-1][0, -1]
        for seed in range(8):
            d = drafter.propose(CTX, 2, cfg, torch.Generator().manual_seed(seed), h)
            assert torch.allclose(d.q[0].double(), q_first(CTX), atol=1e-6)
            assert torch.allclose(d.q[1].double(), q_next(CTX, d.tokens[0]), atol=1e-6)
    assert d.tokens[0] == 3
    assert torch.allclose(two_token_dist(target, q_first, CTX, cfg, q_next), target_joint(target, CTX, cfg), atol=1e-9)


def test_the_context_copy_needs_the_last_n_tokens():
    """copy_or_choose (shared by the MTP and EAGLE-3 drafters): copy only where the last n..3 tokens occurred
    before, the longest match first and its latest occurrence; else the head's own choice and q, untouched."""
    from mtplab.drafters.prompt_lookup import copy_or_choose

    logits = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])
    q, greedy = torch.softmax(logits, -1), SamplingConfig()
    seq = [1, 2, 3, 9, 2]  # the last token (2) occurred before, followed by 3; the last 2-gram [9, 2] did not
    for ngram, want in ((None, 10), (3, 10), (2, 10), (1, 3)):
        token, got = copy_or_choose(seq, logits, q, ngram, greedy, torch.Generator())
        assert token == want, ngram
        assert got is q if want == 10 else torch.equal(got, sampling.one_hot(3, q))
    seq = [4, 5, 6, 4, 5, 7, 9, 5]  # [4, 5] was followed by 6 and 7; the last token 5 latest by 7
    assert copy_or_choose(seq, logits, q, 1, greedy, torch.Generator())[0] == 7
    seq = [4, 5, 6, 8, 9, 4, 5, 7, 8, 9]  # 3-gram [7, 8, 9]: no; 2-gram [8, 9] was followed by 4
    assert copy_or_choose(seq, logits, q, 2, greedy, torch.Generator())[0] == 4
    seq = [1, 2, 3, 4, 2, 3, 5, 1, 2, 3]  # the 3-gram [1, 2, 3] (then 4) wins over the later 2-gram [2, 3] (then 5)
    assert copy_or_choose(seq, logits, q, 1, greedy, torch.Generator())[0] == 4


def test_context_ngram_is_checked():
    head = MTPHead(32, 1)
    for bad in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match=r"context_ngram must be None or an integer in \[1, 3\]"):
            MTPDrafter(head, context_ngram=bad)


# --- training: mtplab.train.train_on_sequences, the one trainer -------------------------------------------------

HEADS = ((1, 64), (2, None), (1, 64, True))  # the third reads the context
QUIET = dict(progress=False, log=lambda *_: None)


def sampled_sequences(target, n, length, seed=0, answer_start=3):
    """``n`` ``(ids, answer_start)`` pairs: PROMPT[:3] and the target's own sampled continuation."""
    gen = SpeculativeDecoder(target, None, temperature=1.0)
    return [(PROMPT[:3] + gen.generate(PROMPT[:3], length, seed=seed + s).token_ids, answer_start) for s in range(n)]


@pytest.fixture(scope="module")
def trained_seq(tmp_path_factory):
    target = tiny(vocab_size=64, seed=0)
    seqs = sampled_sequences(target, 30, 45)
    out = tmp_path_factory.mktemp("mtpseq")
    drafters = train_on_sequences(target, seqs, out, heads=HEADS, draft_vocab_size=48, steps=120, batch_size=8,
                                  lr=3e-3, val_size=6, log_every=40, checkpoint_every=40, **QUIET)
    return target, seqs, out, drafters


def test_training_lowers_the_loss_and_raises_acceptance(trained_seq):
    target, _, out, drafters = trained_seq
    assert len(drafters) == 3 and drafters[2].head.attn is not None
    for d in drafters:
        first, last = d.history[0], d.history[-1]
        assert [h["step"] for h in d.history] == [40, 80, 120]
        assert last["val_loss"] < first["val_loss"] - 0.05, (first, last)  # after the steep first 40 steps
        for key in ("conditional_acceptance", "vllm_acceptance"):
            assert len(last[key]) == 4 and 0 <= min(last[key]) <= max(last[key]) <= 1
        assert last["vllm_acceptance"][0] == last["conditional_acceptance"][0]  # the same at the first position
        assert last["vllm_acceptance"] == sorted(last["vllm_acceptance"], reverse=True)
    assert drafters[1].history[-1]["conditional_acceptance"][0] > drafters[1].history[0]["conditional_acceptance"][0]
    assert len(drafters[0].vocab_ids) == 48
    m = SpeculativeDecoder(target, drafters[1], num_draft_tokens=3, schedule="constant").generate(PROMPT, 40).metrics
    assert m.accepted > 0


def test_trained_heads_are_saved_and_load_back(trained_seq, tmp_path):
    target, _, out, drafters = trained_seq
    back = MTPDrafter.load(out / "head1")
    assert back.head.config["num_layers"] == 2 and back.meta["steps"] == 120 and back.meta["unroll"] == 4
    assert torch.equal(back.vocab_ids, drafters[1].vocab_ids) and back.meta["history"] == drafters[1].history
    a = SpeculativeDecoder(target, drafters[1], num_draft_tokens=3, schedule="constant").generate(PROMPT, 20)
    b = SpeculativeDecoder(target, back, num_draft_tokens=3, schedule="constant").generate(PROMPT, 20)
    # saved in float16: the drafts may differ in the last bits, the output never does (greedy = plain)
    assert a.token_ids == b.token_ids
    full = MTPDrafter.load(drafters[1].save(tmp_path / "fp32"))  # saved at full precision: the very same drafts
    a = SpeculativeDecoder(target, drafters[1], num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    b = SpeculativeDecoder(target, full, num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    assert [r.draft_ids for r in a.rounds] == [r.draft_ids for r in b.rounds] and a.token_ids == b.token_ids
    assert back.context_ngram is full.context_ngram is None  # the trainer saves the head alone
    drafters[1].context_ngram = 2
    try:  # a drafter's context copy is saved with it (and loaded back)
        assert MTPDrafter.load(drafters[1].save(tmp_path / "copying")).context_ngram == 2
    finally:
        drafters[1].context_ngram = None


def test_a_finished_run_resumes_to_more_steps(trained_seq):
    target, seqs, out, _ = trained_seq
    lines = []
    train_on_sequences(target, seqs, out, heads=HEADS, draft_vocab_size=48, steps=130, batch_size=8, val_size=6,
                       log_every=10, progress=False, log=lines.append)
    assert lines[0] == "resuming from step 120 of 130" and any(line.startswith("step 130 head 1") for line in lines)
    assert [h["step"] for h in MTPDrafter.load(out / "head1").meta["history"]] == [40, 80, 120, 130]


def test_bad_checkpoints_are_refused(trained_seq, tmp_path):
    _, _, out, _ = trained_seq
    with pytest.raises(ValueError, match="hidden size 32, but the target .* has hidden size 48"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=64, hidden_size=48), MTPDrafter.load(out / "head1"))
    with pytest.raises(ValueError, match="drafts token ids up to .* beyond the target .*vocabulary of 16"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=16), MTPDrafter.load(out / "head1"))
    with pytest.raises(ValueError, match="is not an MTP drafter folder"):
        MTPDrafter.load(tmp_path)


def test_acceptance_per_position_conditional_and_as_vllm_counts_it():
    from types import SimpleNamespace

    from mtplab.trace import per_position_acceptance

    m = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [0, 0, 1, 1]]).bool()  # [3 positions, 4 drafts]
    # accepted through position 0: drafts 0, 1, 3; through 1: 0, 3; through 2: 3 (draft 2's later matches count not)
    assert vllm_acceptance(m) == pytest.approx([3 / 4, 2 / 4, 1 / 4])
    assert conditional_acceptance(m) == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    # the decoder's per-position acceptance (vLLM's count) of rounds that drafted 3 and accepted these prefixes
    rounds = [SimpleNamespace(num_drafted=3, num_accepted=int(m[:, d].cumprod(0).sum())) for d in range(4)]
    assert per_position_acceptance(rounds)[0] == pytest.approx(vllm_acceptance(m))


def test_draft_vocabulary_counts_only_the_tokens_to_learn():
    seqs = [([9, 9, 9, 1, 2, 2, 3, 3, 3], 3), ([9, 4, 3, 2], 1)]  # 9 is only ever in a prompt
    assert draft_vocabulary(seqs, 2).tolist() == [2, 3]  # 3: four times, 2: three times, 1 and 4 once
    assert draft_vocabulary(seqs, 100).tolist() == [1, 2, 3, 4]  # at most the tokens seen, sorted
    assert draft_vocabulary([(ids, 0) for ids, _ in seqs], 1).tolist() == [9]  # answer_start 0: the whole text
    assert draft_vocabulary(seqs, None) is None


def reference_loss(target, head, vocab_ids, seqs, unroll, weights):
    """The training loss and greedy matches written out position by position, one sequence at a time."""
    model = target.model
    embed = model.get_input_embeddings()
    vocab = torch.arange(target.vocab_size) if vocab_ids is None else torch.tensor(vocab_ids)
    lm_head = model.get_output_embeddings().weight.detach().float()[vocab]
    seeds = max(len(ids) for ids, _ in seqs) - unroll  # seeds per row of the padded batch
    terms, matches = [[] for _ in range(unroll)], []
    for ids, start in seqs:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
        hidden, p = out.hidden_states[-1][0].float(), torch.softmax(out.logits[0].float(), -1)
        for t in range(min(seeds, len(ids))):
            s, row = hidden[t], []
            for j in range(1, unroll + 1):
                if t + j + 1 >= len(ids):  # step j drafts token t+j+1: there is none
                    break
                s = head(s, embed(torch.tensor(ids[t + j])).float())
                logq = torch.log_softmax(lm_head @ s, -1)
                q_target = p[t + j][vocab] / p[t + j][vocab].sum()  # the target's next-token distribution
                if t + j + 1 >= start:
                    terms[j - 1].append(-(q_target * logq).sum())
                row.append(bool(vocab[logq.argmax()] == p[t + j].argmax()))
            if t + 2 >= start and t + unroll + 1 < len(ids):  # the whole draft is text to learn
                matches.append(row)
    loss = sum(w * torch.stack(x).mean() for w, x in zip(weights, terms)) / sum(weights)
    return loss, torch.tensor(matches).T


@pytest.mark.parametrize("vocab_ids", [None, list(range(0, 64, 3)) + [1, 5]], ids=["whole-vocab", "draft-vocab"])
def test_the_training_loss_is_the_unrolled_self_distillation_loss(trained_seq, vocab_ids):
    from mtplab.train import _draft_head, _pad_batch, _sequence_loss, _teacher, _teacher_rows

    target, seqs, _, drafters = trained_seq
    seqs = [(seqs[0][0], 3), (seqs[1][0][:30], 8), (seqs[2][0][:20], 0)]  # lengths differ (padding), starts too
    head = drafters[1].head  # trained: its drafts agree with the target now and then
    ids_t = None if vocab_ids is None else torch.tensor(sorted(vocab_ids))
    weights = [0.8 ** j for j in range(4)]
    ids, mask, answer = _pad_batch(seqs, 0, "cpu")
    hidden, final, top = _teacher(target.model, ids, mask)
    lm_head_t, vocab_map = _draft_head(target, ids_t)
    pw = _teacher_rows(final, lm_head_t, answer)  # only where the next token is one to learn
    with torch.no_grad():
        loss, matches, seeds = _sequence_loss(head, lambda x: target.model.get_input_embeddings()(x).float(),
                                              lm_head_t, vocab_map, hidden, ids, answer, pw, top, 4, weights)
        want_loss, want_matches = reference_loss(target, head, None if ids_t is None else ids_t.tolist(), seqs, 4,
                                                 weights)
    torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5)
    assert torch.equal(matches.flatten(1)[:, seeds.flatten()], want_matches)
    assert want_matches.any()  # the check saw some agreement to count


def test_cached_target_outputs_train_the_same_heads(tmp_path):
    target = tiny(vocab_size=64, seed=0)
    seqs = sampled_sequences(target, 20, 20)
    kw = dict(heads=((1, 32),), draft_vocab_size=40, steps=10, batch_size=4, val_size=2, log_every=5, **QUIET)
    plain = train_on_sequences(target, seqs, tmp_path / "plain", **kw)[0]
    cached = train_on_sequences(target, seqs, tmp_path / "cached", cache_teacher=True, **kw)[0]
    for a, b in zip(plain.head.parameters(), cached.head.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert [h["val_loss"] for h in plain.history] == pytest.approx([h["val_loss"] for h in cached.history], rel=1e-4)


RUN = dict(heads=((1, 32),), draft_vocab_size=40, steps=12, batch_size=4, val_size=2, log_every=4,
           checkpoint_every=4, progress=False)


@pytest.mark.parametrize("kind", ["mtp", "eagle3"])
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, kind):
    """Cut after step 9 (MTP heads) or 5 (an EAGLE-3 head) of 12: the resumed run ends with the same weights and
    history as the uninterrupted one (same batches, schedule and optimizer state), for both kinds of head."""
    import mtplab.train as train

    run = RUN if kind == "mtp" else dict(RUN, heads=["eagle3"])
    cut = 11 if kind == "mtp" else 6  # target passes: 4 training steps, 1 validation, (4 steps, 1 validation,) 1 more
    target = tiny(vocab_size=64, seed=0)
    seqs = sampled_sequences(target, 20, 20)
    whole = train_on_sequences(target, seqs, tmp_path / "whole", log=lambda *_: None, **run)[0]
    real, calls = train._teacher, []

    def cut_off(*args):
        calls.append(1)
        if len(calls) == cut:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "_teacher", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train_on_sequences(target, seqs, tmp_path / "cut", log=lambda *_: None, **run)
    monkeypatch.setattr(train, "_teacher", real)
    lines = []
    again = train_on_sequences(target, seqs, tmp_path / "cut", log=lines.append, **run)[0]
    assert lines[0] == f"resuming from step {8 if kind == 'mtp' else 4} of 12"
    for a, b in zip(whole.head.state_dict().values(), again.head.state_dict().values()):
        assert torch.equal(a, b)  # the same batches, schedule and optimizer state: the same weights
    drop = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert drop(again.history) == drop(whole.history) and [h["step"] for h in again.history] == [4, 8, 12]


def test_batches_are_drawn_in_groups_of_like_length():
    """A group of batches: GROUP * batch_size training sequences drawn by the run's generator, cut after sorting by
    length, so no two batches' length ranges overlap; the same generator state draws the same batches."""
    import mtplab.train as train

    lengths = [int(n) for n in torch.randint(10, 400, (300,), generator=torch.Generator().manual_seed(1))]
    pool = list(range(0, 300, 2))  # the training indices (the others held out)
    batches = train._length_grouped(pool, lengths, 4, torch.Generator().manual_seed(0))
    assert len(batches) == train.GROUP and all(len(b) == 4 for b in batches)
    assert all(i in pool for b in batches for i in b)
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(hi <= lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # cut after sorting: ranges apart
    assert spans[-1][1] - spans[0][0] > 100  # a real spread of lengths, so the check above means something
    again = train._length_grouped(pool, lengths, 4, torch.Generator().manual_seed(0))
    assert again == batches
    order = [min(lengths[i] for i in b) for b in batches]
    assert order != sorted(order) and order != sorted(order, reverse=True)  # used in random order


def test_a_warm_restart_goes_on_counting_steps(tmp_path):
    target = tiny(vocab_size=64, seed=0)
    seqs = sampled_sequences(target, 20, 20)
    train_on_sequences(target, seqs, tmp_path, log=lambda *_: None, **RUN)
    lines = []
    d = train_on_sequences(target, seqs, tmp_path, restart=True, log=lines.append, **dict(RUN, steps=8))[0]
    assert lines[0] == "restarting from step 12"
    assert [h["step"] for h in d.history] == [4, 8, 12, 16, 20] and MTPDrafter.load(tmp_path / "head0").meta["steps"] == 20


@pytest.mark.parametrize("change, message", [
    (dict(data="drop"), r"trained with data of 20 sequences, .*, not data of 19 sequences"),
    (dict(data="edit"), r"trained with data of 20 sequences, 460 tokens, 400 trained on \(sha256 \w+\), not data of "
                        r"20 sequences, 460 tokens, 400 trained on \(sha256"),
    (dict(heads=((2, 32),)), r"trained with heads 1x32, not heads 2x32"),
    (dict(heads=((1, 32, True),)), r"trained with heads 1x32, not heads 1x32\+ctx"),
    (dict(draft_vocab_size=30), r"trained with draft_vocab_size 40, not draft_vocab_size 30"),
    (dict(unroll=3), r"trained with unroll 4, not unroll 3"),
    (dict(target=dict(hidden_size=48)), r"trained with target tiny-llama-v64-l2-s0 \(hidden size 32, vocabulary 64\), "
                                        r"not target tiny-llama-v64-l2-s0 \(hidden size 48, vocabulary 64\)"),
    (dict(target=dict(vocab_size=80)), r"\(hidden size 32, vocabulary 64\), not target tiny-llama-v80-l2-s0 "
                                       r"\(hidden size 32, vocabulary 80\)"),
], ids=["fewer-sequences", "other-tokens", "deeper-head", "context-head", "draft-vocab", "unroll", "hidden-size",
        "vocabulary"])
def test_a_checkpoint_of_another_run_is_refused(tmp_path, change, message):
    target = tiny(vocab_size=64, seed=0)
    seqs = sampled_sequences(target, 20, 20)
    run = dict(RUN, steps=2)
    train_on_sequences(target, seqs, tmp_path, log=lambda *_: None, **run)
    stamp = (tmp_path / "checkpoint.pt").read_bytes()
    change = dict(change)
    data = change.pop("data", None)
    if data == "drop":
        seqs = seqs[:-1]
    elif data == "edit":
        seqs = [(ids[:-1] + [(ids[-1] + 1) % 64], start) if i == 7 else (ids, start) for i, (ids, start) in enumerate(seqs)]
    if "target" in change:
        target = mtplab.tiny_random_target(**dict(dict(vocab_size=64, hidden_size=32), **change.pop("target")))
    with pytest.raises(ValueError, match=message) as e:
        train_on_sequences(target, seqs, tmp_path, log=lambda *_: None, **dict(run, **change))
    assert f"use another output folder (--out) or delete {tmp_path / 'checkpoint.pt'}" in str(e.value)
    assert (tmp_path / "checkpoint.pt").read_bytes() == stamp  # left as it was


def test_a_checkpoint_that_records_no_run_is_refused(tmp_path):
    target = tiny(vocab_size=64, seed=0)
    torch.save(dict(head={}, opt={}, sched={}, vocab_ids=None, step=3, history=[]), tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="written by an older mtplab trainer .* cannot be resumed safely"):
        train_on_sequences(target, sampled_sequences(target, 20, 20), tmp_path, **RUN)


def test_both_kinds_of_data_train_through_the_one_trainer(tmp_path, monkeypatch, capsys):
    """`mtplab train-drafter --data docs` and `--data answers` hand their sequences to train_on_sequences, and
    switching --data on the same --out is refused with a message (it was a KeyError)."""
    from mtplab import cli, datagen, models, train

    target = tiny(vocab_size=64, seed=0)
    docs = [(ids, 0) for ids, _ in sampled_sequences(target, 12, 20)]  # docs: the whole text is learned
    answers = sampled_sequences(target, 12, 20, seed=100)
    monkeypatch.setattr(models, "load_target", lambda name: target)
    monkeypatch.setattr(train, "docs_sequences", lambda target, max_tokens, block_size: docs)
    monkeypatch.setattr(datagen, "build_answer_corpus", lambda target, out, **kw: answers)
    real, calls = train.train_on_sequences, []
    monkeypatch.setattr(train, "train_on_sequences", lambda target, seqs, *a, **kw: calls.append(seqs) or real(target, seqs, *a, **kw))
    args = ["train-drafter", "--steps", "3", "--batch-size", "4", "--heads", "1", "--draft-vocab", "32"]
    assert cli.main(args + ["--out", str(tmp_path / "docs")]) == 0
    assert cli.main(args + ["--out", str(tmp_path / "answers"), "--data", "answers"]) == 0
    assert calls == [docs, answers]
    for name, seqs in (("docs", docs), ("answers", answers)):
        state = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)
        assert state["run"]["data"] == train.data_fingerprint(seqs) and state["step"] == 3
        assert MTPDrafter.load(tmp_path / name / "head0").meta["steps"] == 3
    assert "saved mtp to" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(args + ["--out", str(tmp_path / "docs"), "--data", "answers"])
    assert e.value.code == 2 and "belongs to another run: it was trained with data of 12 sequences" in capsys.readouterr().err
    # --val dev: validated on the target's answers to the dev prompts, trained on all the data
    dev = sampled_sequences(target, 4, 20, seed=200)
    monkeypatch.setattr(datagen, "dev_answers", lambda target, out: dev)
    assert cli.main(args + ["--out", str(tmp_path / "dev"), "--val", "dev"]) == 0
    run = torch.load(tmp_path / "dev" / "checkpoint.pt", weights_only=True)["run"]
    assert run["val_data"] == train.data_fingerprint(dev) and run["data"] == train.data_fingerprint(docs)
    assert "val_data" not in torch.load(tmp_path / "docs" / "checkpoint.pt", weights_only=True)["run"]


@pytest.mark.slow
def test_docs_sequences_are_blocks_of_whole_chats(bundled):
    from mtplab.train import chat_sequences, docs_sequences, stdlib_texts

    chats = chat_sequences(bundled, stdlib_texts(["json", "textwrap"]))
    seqs = docs_sequences(bundled, modules=["json", "textwrap"], max_tokens=300, per_text=300, block_size=128)
    # 300 tokens a text: two whole blocks each; blocks until 300 tokens: json's two, then textwrap's first
    assert seqs == [(chats[0][:128], 0), (chats[0][128:256], 0), (chats[1][:128], 0)]


# --- context attention (MTPHead(context_attention=True)) ---------------------------------------------------------

def attention_drafter(target, seed=0, vocab_ids=None):
    drafter = random_mtp(target, seed=seed, vocab_ids=vocab_ids, context_attention=True)
    assert drafter.head.attn.o.weight.abs().sum() > 0  # random, so that the attention changes the drafts
    return drafter


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_mtp_with_context_attention_equals_plain(gamma):
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    drafter = attention_drafter(target)
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want
    assert len(drafter._rows) == len(PROMPT) + 40 - 1  # a row per final position but the newest


def test_context_attention_reads_the_context():
    """The same seed state and token draft differently when the memory differs, and a fresh block (zero output
    projection) leaves the head's drafts exactly as without it."""
    target = tiny()
    drafter = attention_drafter(target)
    drafter.bind(target)
    h = torch.randn(target.model.config.hidden_size)
    rows = torch.randn(8, target.model.config.hidden_size)
    states = []
    for ids in ([1, 2, 3, 4, 5, 6, 7, 8, 9], [9, 9, 9, 9, 9, 9, 9, 8, 9]):
        drafter.reset(ids)
        drafter.observe(rows, None)
        with torch.inference_mode():
            states.append(drafter.step(h[None], [ids[-1]], drafter.context(ids))[0])
    assert not torch.allclose(states[0], states[1])
    torch.nn.init.zeros_(drafter.head.attn.o.weight)
    with torch.inference_mode():
        assert torch.allclose(drafter.step(h[None], [9], drafter.context([9, 9, 9, 9, 9, 9, 9, 8, 9]))[0],
                              drafter.head(h, drafter.embed(torch.tensor(9))))


def test_the_trainer_unrolls_context_attention_as_drafting_does():
    """train._draft_states for a context-attention head: step j from seed t is the drafter's state after the target
    read positions 0..t (the memory) and the head stepped through the true tokens t+1..t+j, as drafting steps."""
    from mtplab.models import forward, new_cache
    from mtplab.train import _draft_states

    target = tiny()
    drafter = attention_drafter(target)
    drafter.bind(target)
    ids, unroll = PROMPT + [4, 1, 2, 9, 3], 3  # repeats: the memory's token matches count
    with torch.inference_mode():
        rows = forward(target.model, ids, new_cache(target.model), hidden=True, logits=False)[1]
        states = _draft_states(drafter.head, drafter.embed, rows[None], torch.tensor([ids]), unroll)
        for t in (1, 5, len(ids) - unroll - 1):
            drafter.reset(ids[:t + 2])
            drafter.observe(list(rows[:t + 1]), None)
            context, s = drafter.context(ids[:t + 2]), rows[t][None]
            for j in range(1, unroll + 1):
                s = drafter.step(s, [ids[t + j]], context)
                torch.testing.assert_close(s[0], states[j - 1][0, t], rtol=0, atol=1e-5)


def test_context_attention_needs_the_targets_hidden_states():
    target = tiny()
    drafter = attention_drafter(target)
    drafter.bind(target)
    drafter.reset(PROMPT)
    h = torch.randn(target.model.config.hidden_size)
    with pytest.raises(ValueError, match="needs the target's hidden states of all 8 earlier positions .* it has 0"):
        drafter.propose(PROMPT, 2, SamplingConfig(), torch.Generator(), h)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_distribution_mtp_with_context_attention(cfg):
    target = tiny(vocab_size=V)
    drafter = attention_drafter(target, vocab_ids=[0, 1, 2, 3, 5])
    drafter.bind(target)

    def seeded(ctx):  # the drafter as the decoder leaves it before drafting at ctx: memory of ctx[:-1]
        with torch.inference_mode():
            hs = target.model(torch.tensor([ctx[:-1]]), output_hidden_states=True).hidden_states[-1][0]
        drafter.reset(ctx)
        drafter.observe(hs, None)
        return hs[-1], drafter.context(ctx)

    def q_first(ctx):
        h, context = seeded(ctx)
        with torch.inference_mode():
            return sampling.probs(drafter.logits(drafter.step(h[None], [ctx[-1]], context)[0]), cfg).double()

    def q_next(ctx, x1):
        h, context = seeded(ctx)
        with torch.inference_mode():
            s2 = drafter.step(drafter.step(h[None], [ctx[-1]], context), [x1], context)[0]
            return sampling.probs(drafter.logits(s2), cfg).double()

    h, _ = seeded(CTX)  # the drafter's own q rows are the ones the enumeration assumes
    for seed in range(4):
        with torch.inference_mode():
            d = drafter.propose(CTX, 2, cfg, torch.Generator().manual_seed(seed), h)
        assert torch.allclose(d.q[0].double(), q_first(CTX), atol=1e-6)
        assert torch.allclose(d.q[1].double(), q_next(CTX, d.tokens[0]), atol=1e-6)
        h, _ = seeded(CTX)
    assert torch.allclose(first_token_dist(target, q_first, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    assert torch.allclose(two_token_dist(target, q_first, CTX, cfg, q_next), target_joint(target, CTX, cfg), atol=1e-9)


def test_context_attention_save_load_gives_identical_drafts(trained_seq, tmp_path):
    target, _, out, drafters = trained_seq
    drafter = attention_drafter(target)
    drafter.save(tmp_path / "ctx")
    back = MTPDrafter.load(tmp_path / "ctx")
    assert back.head.config["context_attention"] is True
    a = SpeculativeDecoder(target, drafter, num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    b = SpeculativeDecoder(target, back, num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    assert [r.draft_ids for r in a.rounds] == [r.draft_ids for r in b.rounds] and a.token_ids == b.token_ids
    trained = MTPDrafter.load(out / "head2")
    assert trained.head.attn is not None and trained.head.attn.o.weight.abs().sum() > 0  # training moved it

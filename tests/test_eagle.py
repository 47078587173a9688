"""The EAGLE-3 drafter (mtplab.drafters.eagle) on tiny random targets: the hidden states it reads, exactness (greedy
and sampled), its own KV cache (drafting with it equals the training-time-test forward; rolled back it equals a fresh
prefill), save/load, training through the one trainer (loss, resume, refusals), and checks of bad input."""
import json

import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, kernels, sampling
from mtplab.drafters.eagle import Eagle3Drafter, Eagle3Head, default_target_layers
from mtplab.drafters.mtp import MTPDrafter
from mtplab.models import forward, new_cache
from mtplab.sampling import SamplingConfig
from mtplab.train import train_on_sequences

from conftest import tiny
from test_distribution import CONFIGS, CTX, V, dist, first_token_dist, target_joint, two_token_dist
from test_mtp import PROMPT, QUIET, sampled_sequences


def random_eagle(target, seed=0, vocab_ids=None):
    torch.manual_seed(seed)
    head = Eagle3Head.for_target(target.model.config)
    for p in head.parameters():  # a random head with peaky, varied outputs
        torch.nn.init.normal_(p, std=0.3)
    return Eagle3Drafter(head, vocab_ids)


def features(target, drafter, ids):
    """The target's hidden states at the drafter's layers for every position of ``ids``, from one full forward."""
    with torch.inference_mode():
        return forward(target.model, ids, new_cache(target.model), hidden=drafter.hidden_layers, logits=False)[1]


def test_hidden_layers_are_the_inputs_of_those_layers():
    target = tiny(num_layers=4)
    with torch.inference_mode():
        ref = target.model(torch.tensor([PROMPT]), output_hidden_states=True).hidden_states
        got = forward(target.model, PROMPT, new_cache(target.model), hidden=[0, 1, 3], logits=False)[1]
        last = forward(target.model, PROMPT, new_cache(target.model), hidden=[4], logits=False)[1]
    assert torch.equal(got, torch.cat([ref[0][0], ref[1][0], ref[3][0]], -1))
    norm = target.model.model.norm  # id 4 = the last layer's output before the final norm (transformers' [4] is after)
    assert torch.allclose(norm(last), ref[4][0], atol=1e-6) and not torch.allclose(last, ref[4][0])
    with pytest.raises(ValueError, match=r"layer ids must be in \[0, 4\] .* got \[5\]"):
        forward(target.model, PROMPT, new_cache(target.model), hidden=[1, 5])
    assert default_target_layers(30) == [2, 15, 27] and default_target_layers(4) == [1, 2, 3]
    with pytest.raises(ValueError, match=r"target_layers must be distinct layer ids in \[0, 4\]"):
        Eagle3Head.for_target(target.model.config, target_layers=[1, 1, 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An EAGLE-3 head trained for a few seconds on the tiny target's own text: it gets drafts accepted."""
    target = tiny(vocab_size=64, seed=0)
    plain, gen = SpeculativeDecoder(target, None, record=False), torch.Generator().manual_seed(0)
    prompts = [torch.randint(64, (6,), generator=gen).tolist() for _ in range(40)]
    seqs = [(p + plain.generate(p, 40).token_ids, 6) for p in prompts]  # the target's greedy text: learnable
    out = tmp_path_factory.mktemp("eagle")
    drafter = train_on_sequences(target, seqs, out, heads=["eagle3"], draft_vocab_size=48, steps=90, batch_size=8,
                                 lr=3e-3, val_size=6, log_every=30, checkpoint_every=30, **QUIET)[0]
    return target, seqs, out, drafter


def test_training_lowers_the_loss_and_raises_acceptance(trained):
    _, _, _, drafter = trained
    first, last = drafter.history[0], drafter.history[-1]
    assert [h["step"] for h in drafter.history] == [30, 60, 90]
    assert last["val_loss"] < first["val_loss"] - 0.1, (first, last)
    assert last["conditional_acceptance"][0] > first["conditional_acceptance"][0] + 0.05
    assert last["conditional_acceptance"][0] > 0.2 and len(last["vllm_acceptance"]) == 4
    assert len(drafter.vocab_ids) == 48


@pytest.mark.parametrize("ngram", [None, 1, 3])
@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_eagle_equals_plain_and_generate(trained, gamma, ngram):
    target, seqs, _, trained_drafter = trained
    drafter = Eagle3Drafter(trained_drafter.head, trained_drafter.vocab_ids, context_ngram=ngram)
    for prompt in (PROMPT, seqs[0][0][:12]):
        want = SpeculativeDecoder(target, None).generate(prompt, 40).token_ids
        with torch.inference_mode():
            hf = target.model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):]
        trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(prompt, 40)
        assert trace.token_ids == want == hf.tolist()
        assert all(r.draft_start_position == r.context_len - 2 for r in trace.rounds if r.num_drafted)
        if ngram is None:  # (a copied token may lie outside the draft vocabulary)
            assert set(t for r in trace.rounds for t in r.draft_ids) <= set(drafter.vocab_ids.tolist())
    assert trace.metrics.accepted > 0  # the comparison means something: drafts were accepted


def test_drafting_with_the_cache_equals_the_training_time_test():
    """Drafting step by step with the drafter's KV cache computes exactly what the training forward computes at
    every position at once (step s at position t: real rows <= t, then its own rows of steps 1..s)."""
    target = tiny(num_layers=4)
    drafter = random_eagle(target)
    drafter.bind(target)
    head, ids, steps = drafter.head, PROMPT + [7, 8, 9, 10], 3
    n = len(ids) - steps
    aux = features(target, drafter, ids)
    with torch.inference_mode():
        embeds = [drafter.embed(torch.tensor(ids[1 + s: 1 + s + n]))[None] for s in range(steps)]
        whole = head.unrolled(aux[None, :n], embeds, steps)
        for t in (2, n - 1):  # seeds in the middle and at the end
            g, cache = head.step(embeds[0][0, :t + 1], head.fc(aux[:t + 1]), torch.arange(t + 1))
            torch.testing.assert_close(g, whole[0][0, :t + 1], rtol=0, atol=1e-5)
            g = g[-1:]
            for s in range(1, steps):
                g, cache = head.step(drafter.embed(torch.tensor([ids[t + 1 + s]])), g, torch.tensor([t + s]), cache)
                torch.testing.assert_close(g[0], whole[s][0, t], rtol=0, atol=1e-5)


def test_the_cache_rolled_back_equals_a_fresh_prefill(trained):
    """After a decode (drafts added to its cache, then dropped at every rollback) the drafter's cache and its next
    draft equal those of a fresh drafter that reads the same text in one pass."""
    target, seqs, _, drafter = trained
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=4, schedule="constant")
    trace = dec.generate(PROMPT, 30)
    ids = PROMPT + trace.token_ids
    assert any(r.num_accepted < r.num_drafted for r in trace.rounds)  # rollbacks happened
    fresh = Eagle3Drafter(drafter.head, drafter.vocab_ids)
    fresh.bind(target)
    fresh.reset(ids)
    fresh.observe(features(target, fresh, ids[:-1]), None)
    with torch.inference_mode():
        used = drafter.propose(ids, 3, SamplingConfig(), torch.Generator())
        new = fresh.propose(ids, 3, SamplingConfig(), torch.Generator())
    assert used.tokens == new.tokens and used.start_position == new.start_position == len(ids) - 2
    assert drafter.cache_len == fresh.cache_len == len(ids) - 1 + 2  # every position, then the 2 draft steps' rows
    for a, b in zip(drafter._cache, fresh._cache):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    drafter.rollback(len(ids))
    assert drafter.cache_len == len(ids) - 1


@pytest.mark.parametrize("ngram", [None, 2])
@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_exact_distribution_eagle(cfg, ngram):
    """Exact sampling by enumeration over two drafted tokens, with the head alone and with the context copy: CTX =
    [1, 2, 3, 1, 2] ends in the 2-gram [1, 2] seen before, so position 1 copies 3 (q one-hot); position 2 copies
    only after x1 = 3 (the 2-gram [2, 3]) and otherwise samples from the head."""
    from mtplab.drafters.prompt_lookup import lookup

    target = tiny(vocab_size=V)
    drafter = random_eagle(target, vocab_ids=[0, 1, 2, 3, 5])  # a restricted draft vocabulary: q = 0 elsewhere
    drafter.context_ngram = ngram
    drafter.bind(target)

    def copied(ids, q):
        c = lookup(ids, 1, 3, ngram) if ngram else []
        return sampling.one_hot(c[0], q) if c else q

    def seeded(ctx):  # the drafter as the decoder leaves it before drafting at ctx
        drafter.reset(ctx)
        drafter.observe(features(target, drafter, ctx[:-1]), None)

    def q_first(ctx):
        seeded(ctx)
        with torch.inference_mode():
            drafter.propose(ctx, 1, cfg, torch.Generator())  # reads ctx: drafter._g is the first step's state
            return copied(ctx, sampling.probs(drafter.logits(drafter._g)[0], cfg).double())

    def q_next(ctx, x1):
        seeded(ctx)
        with torch.inference_mode():
            drafter.propose(ctx, 1, cfg, torch.Generator())
            g, _ = drafter.head.step(drafter.embed(torch.tensor([x1])), drafter._g, torch.tensor([len(ctx) - 1]),
                                     drafter._cache)
            return copied(ctx + [x1], sampling.probs(drafter.logits(g)[0], cfg).double())

    for seed in range(4):  # the drafter's own q rows are the ones the enumeration assumes
        seeded(CTX)
        with torch.inference_mode():
            d = drafter.propose(CTX, 2, cfg, torch.Generator().manual_seed(seed))
        assert torch.allclose(d.q[0].double(), q_first(CTX), atol=1e-6)
        assert torch.allclose(d.q[1].double(), q_next(CTX, d.tokens[0]), atol=1e-6)
        assert q_first(CTX)[4] == 0  # outside the draft vocabulary
        assert (d.tokens[0] == 3) if ngram else (q_first(CTX).max() < 1)  # copied, deterministically; or sampled
    assert torch.allclose(first_token_dist(target, q_first, CTX, cfg), dist(target, CTX, cfg), atol=1e-9)
    assert torch.allclose(two_token_dist(target, q_first, CTX, cfg, q_next), target_joint(target, CTX, cfg), atol=1e-9)


def test_chi_square_eagle_on_real_decoder():
    from scipy.stats import chisquare

    target = tiny(vocab_size=V)
    dec = SpeculativeDecoder(target, random_eagle(target), num_draft_tokens=3, schedule="constant", temperature=1.0,
                             top_k=6, record=False)
    n, counts = 800, torch.zeros(V * V)
    for seed in range(n):
        y = dec.generate(CTX, max_new_tokens=2, seed=seed).token_ids
        counts[y[0] * V + y[1]] += 1
    expected = target_joint(target, CTX, SamplingConfig(1.0, top_k=6)).flatten() * n
    keep = expected >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]]).numpy()
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]]).numpy()
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_save_and_load_give_identical_drafts(trained, tmp_path):
    target, _, out, drafter = trained
    back = mtplab.load_drafter(out / "head0", target)  # the trainer's float16 export
    assert isinstance(back, Eagle3Drafter) and back.meta["steps"] == 90 and back.meta["kind"] == "eagle3"
    assert torch.equal(back.vocab_ids, drafter.vocab_ids) and back.head.target_layers == drafter.head.target_layers
    run = lambda d, **kw: SpeculativeDecoder(target, d, num_draft_tokens=4, schedule="constant", **kw)
    assert run(back).generate(PROMPT, 20).token_ids == run(drafter).generate(PROMPT, 20).token_ids
    full = MTPDrafter.load(drafter.save(tmp_path / "fp32"))  # full precision: the very same drafts, sampled too
    a, b = run(drafter, temperature=0.8).generate(PROMPT, 30, seed=2), run(full, temperature=0.8).generate(PROMPT, 30, seed=2)
    assert [r.draft_ids for r in a.rounds] == [r.draft_ids for r in b.rounds] and a.token_ids == b.token_ids
    assert back.context_ngram is None  # the trainer saves the head alone
    copying = mtplab.load_drafter(out / "head0", target, context_ngram=2)  # the context copy, as `mtp` has it
    assert copying.context_ngram == 2 and copying.head is not back.head and copying.meta["steps"] == 90
    again = MTPDrafter.load(copying.save(tmp_path / "copying"))  # the setting is saved with the weights
    assert isinstance(again, Eagle3Drafter) and again.context_ngram == 2
    ids = [5, 6, 7, 8, 5, 6]  # ends in the 2-gram [5, 6] seen before: the first draft token copies 7
    again.bind(target)
    again.observe(features(target, again, ids[:-1]), None)
    with torch.inference_mode():
        d = again.propose(ids, 2, SamplingConfig(), torch.Generator())
    assert d.tokens[0] == 7 and d.q[0][7] == 1 and d.q[0].sum() == 1
    with pytest.raises(ValueError, match="EAGLE-3 drafter, which drafts a chain: tree does not apply"):
        mtplab.load_drafter(out / "head0", target, tree=dict(tree_width=2))
    with pytest.raises(ValueError, match=r"context_ngram must be None or an integer in \[1, 3\], got 4"):
        mtplab.load_drafter(out / "head0", target, context_ngram=4)


def test_bad_targets_and_states_are_refused(trained):
    target, _, out, drafter = trained
    back = lambda: mtplab.load_drafter(out / "head0")
    with pytest.raises(ValueError, match="made for hidden size 32 and a vocabulary of 64, but the target .* hidden "
                                         "size 48 and a vocabulary of 64"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=64, hidden_size=48), back())
    with pytest.raises(ValueError, match="hidden size 32 and a vocabulary of 80"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=80), back())
    deep = Eagle3Drafter(Eagle3Head.for_target(tiny(num_layers=4).model.config))  # reads layer 3 of a 2-layer target
    with pytest.raises(ValueError, match=r"reads target layers \[1, 2, 3\], but the target .* has 2 layers"):
        SpeculativeDecoder(target, deep)
    drafter.bind(target)
    drafter.reset(PROMPT)
    with pytest.raises(ValueError, match="needs the target's hidden states of all 8 earlier positions .* it has 0"):
        drafter.propose(PROMPT, 2, SamplingConfig(), torch.Generator())


def test_bfloat16_training_lowers_the_loss_and_bad_precision_is_refused(trained, tmp_path):
    """precision="bfloat16": the teacher pass and the head under autocast (the fast path on AMX CPUs) still
    learn; the saved drafter is float16 as always; its teacher store records the teacher's bfloat16. A precision
    outside the list is refused."""
    target, seqs, _, _ = trained
    drafter = train_on_sequences(target, seqs, tmp_path / "bf16", heads=["eagle3"], draft_vocab_size=48, steps=60,
                                 batch_size=8, lr=3e-3, val_size=6, log_every=20, checkpoint_every=60,
                                 precision="bfloat16", cache_teacher=tmp_path / "store", **QUIET)[0]
    assert json.loads((tmp_path / "store" / "teacher.json").read_text())["dtype"] == "bfloat16"
    first, last = drafter.history[0], drafter.history[-1]
    assert last["val_loss"] < first["val_loss"] - 0.1, (first, last)
    assert all(p.dtype == torch.float32 for p in drafter.head.parameters())
    fp32 = train_on_sequences(target, seqs, tmp_path / "fp32", heads=["eagle3"], draft_vocab_size=48, steps=60,
                              batch_size=8, lr=3e-3, val_size=6, log_every=20, checkpoint_every=60, **QUIET)[0]
    assert fp32.history[0]["val_loss"] != first["val_loss"]  # the same run but for the arithmetic: bf16 really ran
    with pytest.raises(ValueError, match=r"precision must be one of \('auto', 'float32', 'bfloat16'\), got 'half'"):
        train_on_sequences(target, seqs, tmp_path / "x", heads=["eagle3"], precision="half", **QUIET)


def test_the_trainer_refuses_mixed_heads_and_other_runs(trained, tmp_path):
    target, seqs, out, _ = trained
    with pytest.raises(ValueError, match="must read the same target hidden states"):
        train_on_sequences(target, seqs, tmp_path, heads=["eagle3", (1, 32)], steps=1, **QUIET)
    with pytest.raises(ValueError, match=r"trained with heads eagle3\(layers \[1, 2\], mlp 64\), not heads 1x32"):
        train_on_sequences(target, seqs, out, heads=[(1, 32)], draft_vocab_size=48, val_size=6, steps=91, **QUIET)
    with pytest.raises(ValueError, match="an eagle3 head spec takes target_layers and intermediate_size"):
        train_on_sequences(target, seqs, tmp_path, heads=[dict(kind="eagle3", layers=3)], **QUIET)


def test_validation_reads_exactly_the_given_sequences_and_never_trains_on_them(trained, tmp_path):
    """``val_sequences``: validation reads exactly them (the default split's held-out sequences given this way
    score what they scored held out: the same head at learning rate 0, the same draft vocabulary) and training
    never does (two runs that differ only in them train the same head, and validate differently); resuming with
    other validation sequences, or without, is refused."""
    target, seqs, _, _ = trained
    kw = dict(heads=["eagle3"], draft_vocab_size=48, batch_size=8, log_every=1, checkpoint_every=1, **QUIET)
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(0)).tolist()
    held, rest = [seqs[i] for i in order[:4]], [seqs[i] for i in order[4:]]  # (val_size: at most a tenth)
    split = train_on_sequences(target, seqs, tmp_path / "split", steps=1, lr=0.0, val_size=4, **kw)[0]
    given = train_on_sequences(target, rest, tmp_path / "given", steps=1, lr=0.0, val_sequences=held, **kw)[0]
    assert torch.equal(given.vocab_ids, split.vocab_ids)
    for key in ("val_loss", "conditional_acceptance", "decoded"):
        assert given.history[-1][key] == split.history[-1][key], key

    kw.update(lr=3e-3, log_every=10, checkpoint_every=10)
    a = train_on_sequences(target, rest, tmp_path / "a", steps=10, val_sequences=held, **kw)[0]
    b = train_on_sequences(target, rest, tmp_path / "b", steps=10, val_sequences=rest[:6], **kw)[0]
    for (name, x), y in zip(a.head.state_dict().items(), b.head.state_dict().values()):
        assert torch.equal(x, y), name
    assert a.history[-1]["val_loss"] != b.history[-1]["val_loss"]
    with pytest.raises(ValueError, match=r"validation on 4 given sequences \(sha256 \w{12}\), not validation on 6 "
                                         r"given sequences"):
        train_on_sequences(target, rest, tmp_path / "a", steps=20, val_sequences=rest[:6], **kw)
    with pytest.raises(ValueError, match=r"given sequences \(sha256 \w{12}\), not validation on held-out training"):
        train_on_sequences(target, rest, tmp_path / "a", steps=20, val_size=6, **kw)
    more = train_on_sequences(target, rest, tmp_path / "a", steps=20, val_sequences=held, **kw)[0]
    assert [h["step"] for h in more.history] == [10, 20]
    with pytest.raises(ValueError, match="needs sequences to train on and val_sequences to validate on, got 36 and 0"):
        train_on_sequences(target, rest, tmp_path / "c", val_sequences=[], **kw)


@pytest.mark.slow
def test_greedy_eagle_equals_plain_on_the_bundled_target(bundled):
    """A fresh EAGLE-3 head over layers 2, 15 and 27 of the bundled 30-layer target: whatever it drafts, the output
    is the target's greedy text (plain decoding and transformers' generate)."""
    drafter = random_eagle(bundled, vocab_ids=torch.arange(0, 8192))
    assert drafter.hidden_layers == [2, 15, 27]
    prompt = "Explain what a hash map is, in two sentences."
    plain = SpeculativeDecoder(bundled, None).generate(prompt, 24)
    ids = plain.prompt_ids
    with torch.inference_mode():
        hf = bundled.model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    for gamma in (1, 3, 7):
        trace = SpeculativeDecoder(bundled, drafter, num_draft_tokens=gamma, schedule="constant").generate(prompt, 24)
        assert trace.token_ids == plain.token_ids == hf[:len(trace.token_ids)]


def test_heads_from_the_command_line(tmp_path, monkeypatch, capsys):
    from mtplab import cli, models, train

    assert train.parse_heads("2x1536, 3x1280+ctx,eagle3,1") == [(2, 1536, False), (3, 1280, True), "eagle3",
                                                                  (1, None, False)]
    for bad in ("eagle", "2x", "0", "x12", "2x12+tree"):
        with pytest.raises(ValueError, match="a head is LAYERS"):
            train.parse_heads(bad)
    target = tiny(vocab_size=64, seed=0)
    seqs = [(ids, 0) for ids, _ in sampled_sequences(target, 12, 20)]
    monkeypatch.setattr(models, "load_target", lambda name: target)
    monkeypatch.setattr(train, "docs_sequences", lambda target, max_tokens, block_size: seqs)
    args = ["train-drafter", "--steps", "2", "--batch-size", "4", "--heads", "eagle3", "--draft-vocab", "32",
            "--teacher-store", "--out", str(tmp_path)]
    assert cli.main(args) == 0 and "saved eagle3 to" in capsys.readouterr().out
    assert isinstance(mtplab.load_drafter(tmp_path / "head0"), Eagle3Drafter)
    stored = json.loads((tmp_path / "teacher" / "teacher.json").read_text())  # --teacher-store: the target's outputs
    assert stored["done"] == len(seqs) and stored["hidden"] == train.make_head("eagle3", target).target_layers
    with pytest.raises(SystemExit) as e:
        cli.main(args[:-2] + ["--heads", "2x", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "a head is LAYERS" in capsys.readouterr().err


def test_propose_drafts_what_the_training_forward_predicts():
    """The drafter's q at every draft step equals the softmax of the training-time-test forward at the seed
    position, fed the same tokens: drafting and training read the same rows, tokens and positions."""
    target = tiny(num_layers=4)
    drafter = random_eagle(target, vocab_ids=torch.arange(0, 64, 2))
    drafter.bind(target)
    ids = PROMPT + [7, 8]
    m = len(ids) - 1
    drafter.reset(ids)
    drafter.observe(features(target, drafter, ids[:-1]), None)
    cfg = SamplingConfig(1.0)
    with torch.inference_mode():
        d = drafter.propose(ids, 3, cfg, torch.Generator().manual_seed(0))
        fed = ids + d.tokens
        embeds = [drafter.embed(torch.tensor(fed[1 + s: 1 + s + m]))[None] for s in range(3)]
        states = drafter.head.unrolled(features(target, drafter, ids[:-1])[None], embeds, 3)
        for s in range(3):
            q = sampling.probs(drafter.logits(states[s][0, m - 1]), cfg)
            torch.testing.assert_close(d.q[s], q, rtol=0, atol=1e-5)


def test_the_trainer_unrolls_the_drafting_steps():
    """train._draft_states for an EAGLE-3 head: step j from seed t is the drafter's state after reading positions
    0..t and then the true tokens t+2..t+j, one cached step at a time."""
    from mtplab.train import _draft_states

    target = tiny(num_layers=4)
    drafter = random_eagle(target)
    drafter.bind(target)
    head, ids, unroll = drafter.head, PROMPT + [7, 8, 9], 3
    aux = features(target, drafter, ids)
    with torch.inference_mode():
        states = _draft_states(head, drafter.embed, aux[None], torch.tensor([ids]), unroll)
        assert len(states) == unroll and states[0].shape[1] == len(ids) - unroll
        for t in (0, 4, len(ids) - unroll - 1):
            g, cache = head.step(drafter.embed(torch.tensor(ids[1:t + 2])), head.fc(aux[:t + 1]), torch.arange(t + 1))
            g = g[-1:]
            for j in range(unroll):
                if j:
                    g, cache = head.step(drafter.embed(torch.tensor([ids[t + 1 + j]])), g, torch.tensor([t + j]), cache)
                torch.testing.assert_close(head.norm(g)[0], states[j][0, t], rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec", ["eagle3", (1, 32), (1, 32, True)], ids=["eagle3", "mtp", "mtp+context"])
def test_the_head_runs_only_where_a_draft_is_learned(spec, monkeypatch):
    """The trainer runs the head only at the seeds whose drafts reach a token to learn (train._seeds; long prompts
    are most of a stage-B batch): the loss, its gradients and the greedy matches equal those of running it at every
    position, and the states at any seeds (repeated, unordered) equal the every-position states there."""
    from mtplab import train

    target = tiny(num_layers=4)
    torch.manual_seed(0)
    head = train.make_head(spec, target)
    for p in head.parameters():  # peaky, varied outputs; the context block's output is no longer zero
        torch.nn.init.normal_(p, std=0.3 if spec == "eagle3" else 0.1)
    request = head.target_layers if isinstance(head, Eagle3Head) else True
    gen = torch.Generator().manual_seed(1)
    seqs = [(torch.randint(0, target.vocab_size, (n,), generator=gen).tolist(), start)
            for n, start in ((24, 15), (17, 9), (20, 11), (9, 6))]  # lengths and prompts differ
    ids, mask, answer = train._pad_batch(seqs, 0, "cpu")
    hidden, final, top = train._teacher(target.model, ids, mask, request)
    lm_head_t, vocab_map = train._draft_head(target, None)
    pw = train._teacher_rows(final, lm_head_t, answer)
    embed = lambda x: target.model.get_input_embeddings()(x).detach().float()  # noqa: E731
    unroll, n = 3, ids.shape[1] - 3

    def every(masks):
        return torch.arange(n).expand(len(ids), n), torch.ones(len(ids), n, dtype=torch.bool)

    def run(seeds):
        monkeypatch.setattr(train, "_seeds", seeds)
        head.zero_grad()
        loss, matches, m = train._sequence_loss(head, embed, lm_head_t, vocab_map, hidden, ids, answer, pw, top,
                                                unroll, [1.0, 0.8, 0.64])
        loss.backward()
        return [loss, matches, m, *(q.grad.clone() for q in head.parameters() if q.grad is not None)]

    learned = [answer[:, j + 1:j + 1 + n] for j in range(1, unroll + 1)]  # step j from t drafts token t+j+1
    seeds, real = train._seeds([torch.nn.functional.pad(m, (0, n - m.shape[1])) for m in learned])
    # seed t drafts a token to learn iff start <= t+j+1 < length for some step j: t in [start-4, length-3], t < 21
    assert real.sum(1).tolist() == [10, 10, 11, 5] and seeds.shape == (4, 11)  # of 21 positions
    assert seeds[0, :10].tolist() == list(range(11, 21)) and seeds[3].tolist() == [2, 3, 4, 5, 6] + [0] * 6
    got, want = run(train._seeds), run(every)
    assert len(got) == len(want) > 5
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    some = torch.tensor([[5, 0, 5, 20], [2, 12, 1, 1], [0, 19, 7, 3], [4, 4, 4, 4]])
    with torch.no_grad():
        full = train._draft_states(head, embed, hidden, ids, unroll)
        part = train._draft_states(head, embed, hidden, ids, unroll, some)
    for f, q in zip(full, part):
        torch.testing.assert_close(q, f[torch.arange(4)[:, None], some], rtol=0, atol=1e-5)


def test_decoded_acceptance_is_what_the_decoder_measures(trained):
    """The trainer's validation number "as the decoder would see it" (train.decoded_acceptance over the training-time
    matches) equals the real greedy decoder's rounds over the same text: mean acceptance length and per position,
    at γ 1 and 3, drafts shrinking to fit the answer's end. Every-position counting (vllm_acceptance) differs:
    rounds start after rejections."""
    from mtplab import bench, train
    from mtplab.trace import mean_acceptance_length, per_position_acceptance

    target, seqs, _, drafter = trained
    lm_head_t, vocab_map = train._draft_head(target, drafter.vocab_ids)
    embed = target.model.get_input_embeddings()
    batch = [(ids, start) for ids, start in seqs[:6]]
    ids, mask, answer = train._pad_batch(batch, 0, "cpu")
    hidden, final, top = train._teacher(target.model, ids, mask, drafter.hidden_layers)
    with torch.no_grad():
        _, matches, _ = train._sequence_loss(drafter.head, lambda x: embed(x).float(), lm_head_t, vocab_map, hidden,
                                             ids, answer, train._teacher_rows(final, lm_head_t, answer), top, 4, [1.0] * 4)
    length = 30  # answers cut at 30 of their 40 tokens: seeds exist up to their end
    cut = answer & (torch.arange(ids.shape[1]) < 6 + length)
    for gamma in (1, 3):
        rounds = train.decoded_acceptance(matches, cut, gamma)
        real = bench.greedy_acceptance(target, drafter, [list(ids[:6]) for ids, _ in batch], gammas=(gamma,),
                                       max_new_tokens=length)[gamma]
        assert sum(r.num_accepted + 1 for r in rounds) == length * len(batch)
        assert mean_acceptance_length(rounds) == pytest.approx(real["mean_acceptance_length"])
        assert per_position_acceptance(rounds)[0] == pytest.approx(real["per_position_acceptance"])
    assert 0 < sum(r.num_accepted for r in rounds) < sum(r.num_drafted for r in rounds)  # accepts and rejects
    with pytest.raises(ValueError, match=r"gamma must be in \[1, 4\]"):
        train.decoded_acceptance(matches, cut, 5)
    assert drafter.history[-1]["decoded"]["gamma"] == 3
    assert 1 <= drafter.history[-1]["decoded"]["mean_acceptance_length"] <= 4


def test_a_run_starts_from_another_runs_heads_on_other_data(trained, tmp_path):
    """``init_from``: a new run on other data starts from another run's heads, optimizer and draft vocabulary (at
    learning rate 0 its head stays exactly the one it started from), its history goes on from there; a folder
    without a run, or a run of other heads, is refused."""
    target, seqs, out, drafter = trained
    kw = dict(heads=["eagle3"], draft_vocab_size=48, batch_size=8, val_size=4, log_every=1, **QUIET)
    again = train_on_sequences(target, seqs[:30], tmp_path / "more", steps=1, lr=0.0, init_from=out, **kw)[0]
    for (name, a), b in zip(again.head.state_dict().items(), drafter.head.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(again.vocab_ids, drafter.vocab_ids)
    assert [h["step"] for h in again.history] == [30, 60, 90, 91]
    with pytest.raises(ValueError, match="init_from must be the folder of an earlier training run"):
        train_on_sequences(target, seqs[:30], tmp_path / "none", steps=1, init_from=tmp_path / "nowhere", **kw)
    with pytest.raises(ValueError, match=r"init_from: .* trained heads eagle3\(layers \[1, 2\].*, not heads 2x32"):
        train_on_sequences(target, seqs[:30], tmp_path / "other", steps=1, init_from=out, **{**kw, "heads": [(2, 32)]})


def test_a_run_starts_from_a_saved_drafter(trained, tmp_path):
    """``init_from`` a saved drafter's folder (as shipped: no run, no optimizer): its head and draft vocabulary, a
    fresh optimizer (at learning rate 0 the head stays exactly the saved float16 one), the history goes on from its
    steps (a history saved without head numbers, as the shipped `mtp` head's, is read as head 0); a drafter of
    another head is refused."""
    target, seqs, out, drafter = trained
    kw = dict(heads=["eagle3"], draft_vocab_size=48, batch_size=8, val_size=4, log_every=1, **QUIET)
    old = [{k: v for k, v in h.items() if k != "head"} for h in drafter.history]  # (as mtp-smollm2-135m's)
    shipped = drafter.save(tmp_path / "shipped", dtype=torch.float16, target=target.name, steps=90, history=old)
    again = train_on_sequences(target, seqs[:30], tmp_path / "more", steps=1, lr=0.0, init_from=shipped, **kw)[0]
    for (name, a), b in zip(again.head.state_dict().items(), drafter.head.state_dict().values()):
        assert torch.equal(a, b.half().float()), name
    assert torch.equal(again.vocab_ids, drafter.vocab_ids)
    assert [h["step"] for h in again.history] == [30, 60, 90, 91]
    with pytest.raises(ValueError, match=r"init_from: .* holds a drafter heads eagle3\(layers \[1, 2\].*, not heads 2x32"):
        train_on_sequences(target, seqs[:30], tmp_path / "other", steps=1, init_from=shipped, **{**kw, "heads": [(2, 32)]})


# --- drafting from float16 copies (mtplab.kernels.HalfCopies), where measured faster ------------------------------
def half_eagle(target, seed=0, vocab_ids=None):
    """A random head whose weights are float16 values, as a saved and loaded drafter's are."""
    drafter = random_eagle(target, seed, vocab_ids)
    with torch.no_grad():
        for p in drafter.head.parameters():
            p.copy_(p.half().float())
    return drafter


def bound(target, drafter, choice, monkeypatch):
    """``drafter`` bound to ``target`` as if a drafting step had been measured faster by ``choice``."""
    monkeypatch.setattr(kernels, "timed_choice", lambda key, runs, **kw: choice)
    drafter.bind(target)
    return drafter


def needs_half():
    why = kernels.half_unavailable()
    if why is not None:
        pytest.fail(f"the float16 product cannot run here: {why}")


@pytest.mark.parametrize("rows, out, inner", [(1, 64, 48), (3, 50, 37), (5, 97, 40)])
def test_the_float16_product_is_f_linear_of_the_same_values(rows, out, inner):
    """Sizes off the kernel's 16-lane and 4-row blocks: its tails run too."""
    needs_half()
    w = torch.randn(out, inner).half().float()
    x, b = torch.randn(rows, inner), torch.randn(out)
    torch.testing.assert_close(kernels.half_linear(x, w.half().contiguous(), b), torch.nn.functional.linear(x, w, b),
                               rtol=1e-5, atol=1e-5)


def test_drafts_from_float16_copies_are_the_modules_drafts(monkeypatch):
    """The head's linears from float16 copies of the same values and the LM head rounded to float16 give the
    modules' draft probabilities up to that rounding and the same drafts; decoding stays exactly plain greedy."""
    needs_half()
    target = tiny(num_layers=4)
    ids = PROMPT + [7, 8, 9, 10]
    drafts = {}
    for choice in ("modules", "half"):
        drafter = bound(target, half_eagle(target, vocab_ids=torch.arange(0, target.vocab_size, 2)), choice,
                        monkeypatch)
        assert (drafter._half is not None) == (choice == "half")
        drafter.reset(ids)
        drafter.observe(features(target, drafter, ids[:-1]), None)
        with torch.inference_mode():
            drafts[choice] = drafter.propose(ids, 4, SamplingConfig(), torch.Generator())
        plain = SpeculativeDecoder(target, None).generate(PROMPT, 30).token_ids
        trace = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(PROMPT, 30)
        assert trace.token_ids == plain
    assert drafts["half"].tokens == drafts["modules"].tokens
    torch.testing.assert_close(drafts["half"].q, drafts["modules"].q, rtol=0, atol=2e-3)
    assert not torch.equal(drafts["half"].q, drafts["modules"].q)  # the float16 path did run


def test_the_measurement_times_the_modules_against_the_float16_copies(monkeypatch):
    """The two drafting steps timed at binding: one through the modules (no float16 product), one through the
    copies (head and LM head), each a step to draft logits; binding leaves the drafter's choice to the timing."""
    needs_half()
    target, runs, calls = tiny(num_layers=4), {}, []
    monkeypatch.setattr(kernels, "timed_choice", lambda key, r, **kw: runs.update(r) or "modules")
    drafter = half_eagle(target)
    drafter.bind(target)
    assert drafter._half is None and set(runs) == {"modules", "half"}
    real = kernels.half_linear
    monkeypatch.setattr(kernels, "half_linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
    with torch.inference_mode():
        runs["modules"]()
        assert calls == []
        runs["half"]()
    lm = drafter._lm_head_t
    assert (lm.shape[1], lm.shape[0]) in calls and len(calls) > 1  # the LM head's copy and the head's linears


def test_float16_copies_only_of_float16_values_and_while_fresh(monkeypatch):
    """A head trained in float32 gets no copies (with the reason); a head whose weights changed after binding
    drafts through its modules again."""
    needs_half()
    target = tiny(num_layers=4)
    assert "float16 values" in kernels.HalfCopies.of(random_eagle(target).head)
    drafter = bound(target, half_eagle(target), "half", monkeypatch)
    ids = PROMPT + [7, 8]
    with torch.no_grad():
        drafter.head.layers[0].mlp.down_proj.weight.mul_(2.0)
    assert not drafter._half.fresh()
    modules = Eagle3Drafter(drafter.head)
    modules.bind(target)
    modules._half = None
    for d in (drafter, modules):
        d.reset(ids)
        d.observe(features(target, d, ids[:-1]), None)
    with torch.inference_mode():
        got, want = (d.propose(ids, 3, SamplingConfig(), torch.Generator()) for d in (drafter, modules))
    assert got.tokens == want.tokens and torch.equal(got.q, want.q)
    monkeypatch.setenv("MTPLAB_KERNELS", "off")
    assert kernels.HalfCopies.of(half_eagle(target).head) == "MTPLAB_KERNELS=off"

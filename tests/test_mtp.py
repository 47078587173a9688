"""mtplab's MTP drafter on tiny random targets: exactness (greedy and sampled), save/load, training, bad checkpoints."""
import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, sampling
from mtplab.drafters.mtp import MTPDrafter, MTPHead
from mtplab.sampling import SamplingConfig
from mtplab.train import acceptance_by_position, collect_features, train_mtp_drafter

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    target = tiny(vocab_size=64, seed=0)
    gen = SpeculativeDecoder(target, None, temperature=1.0)
    seqs = [PROMPT[:3] + gen.generate(PROMPT[:3], 61, seed=s).token_ids for s in range(24)]
    feats = collect_features(target, seqs, block_size=32, progress=False)
    out = tmp_path_factory.mktemp("mtp")
    drafter = train_mtp_drafter(target, feats, out, steps=150, batch_size=8, log_every=50, lr=3e-3,
                                draft_vocab_size=48, progress=False, log=lambda *_: None)
    return target, feats, out, drafter


def test_training_lowers_the_loss_and_raises_acceptance(trained):
    target, _, _, drafter = trained
    first, last = drafter.history[0], drafter.history[-1]
    assert last["val_loss"] < first["val_loss"]
    assert len(last["acceptance"]) == 4
    assert last["acceptance"][0] > first["acceptance"][0] + 0.03, (first, last)
    m = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(PROMPT, 40).metrics
    assert m.accepted > 0


def test_save_load_round_trip_gives_identical_drafts(trained):
    target, _, out, drafter = trained
    back = MTPDrafter.load(out)
    assert torch.equal(back.vocab_ids, drafter.vocab_ids) and back.meta["unroll"] == 4
    a = SpeculativeDecoder(target, drafter, num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    b = SpeculativeDecoder(target, back, num_draft_tokens=4, schedule="constant", temperature=0.8).generate(PROMPT, 30, seed=2)
    assert [r.draft_ids for r in a.rounds] == [r.draft_ids for r in b.rounds] and a.token_ids == b.token_ids


def test_training_resumes_from_its_checkpoint(trained):
    target, feats, out, drafter = trained
    lines = []
    again = train_mtp_drafter(target, feats, out, steps=170, batch_size=8, log_every=10, progress=False, log=lines.append)
    assert lines[0] == "resuming from step 150" and again.history[-1]["step"] == 170


def test_bad_checkpoints_are_refused(trained, tmp_path):
    _, _, out, drafter = trained
    with pytest.raises(ValueError, match="hidden size 32, but the target .* has hidden size 48"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=64, hidden_size=48), MTPDrafter.load(out))
    with pytest.raises(ValueError, match="drafts token ids up to .* beyond the target .*vocabulary of 16"):
        SpeculativeDecoder(mtplab.tiny_random_target(vocab_size=16), MTPDrafter.load(out))
    with pytest.raises(ValueError, match="is not an MTP drafter folder"):
        MTPDrafter.load(tmp_path)


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


def test_acceptance_by_position_is_conditional():
    m = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 1]]).bool()  # [unroll=2, 4 positions]
    assert acceptance_by_position(m) == pytest.approx([0.75, 2 / 3])  # 2 of the 3 rounds that reached position 1


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


def test_context_ngram_is_checked():
    head = MTPHead(32, 1)
    for bad in (0, 4, 2.0, True):
        with pytest.raises(ValueError, match=r"context_ngram must be None or an integer in \[1, 3\]"):
            MTPDrafter(head, context_ngram=bad)


# --- training from token sequences (train_on_sequences, the shipped drafter's trainer) ---------------------------

HEADS = ((1, 64), (2, None), (1, 64, True))  # the third reads the context


@pytest.fixture(scope="module")
def trained_seq(tmp_path_factory):
    from mtplab.train import train_on_sequences

    target = tiny(vocab_size=64, seed=0)
    gen = SpeculativeDecoder(target, None, temperature=1.0)
    seqs = [(PROMPT[:3] + gen.generate(PROMPT[:3], 45, seed=s).token_ids, 3) for s in range(30)]
    out = tmp_path_factory.mktemp("mtpseq")
    drafters = train_on_sequences(target, seqs, out, heads=HEADS, draft_vocab_size=48, steps=120,
                                  batch_size=8, lr=3e-3, val_size=6, log_every=40, checkpoint_every=40,
                                  progress=False, log=lambda *_: None)
    return target, seqs, out, drafters


def test_train_on_sequences_lowers_the_loss(trained_seq):
    target, _, out, drafters = trained_seq
    assert len(drafters) == 3 and drafters[2].head.attn is not None
    for d in drafters:
        first, last = d.history[0], d.history[-1]
        assert last["val_loss"] < first["val_loss"], (first, last)
        assert len(last["acceptance"]) == 4 and 0 <= min(last["acceptance"]) <= max(last["acceptance"]) <= 1
    assert len(drafters[0].vocab_ids) == 48


def test_train_on_sequences_saves_and_resumes(trained_seq):
    from mtplab.train import train_on_sequences

    target, seqs, out, drafters = trained_seq
    back = MTPDrafter.load(out / "head1")
    assert back.head.config["num_layers"] == 2 and back.meta["steps"] == 120
    a = SpeculativeDecoder(target, drafters[1], num_draft_tokens=3, schedule="constant").generate(PROMPT, 20)
    b = SpeculativeDecoder(target, back, num_draft_tokens=3, schedule="constant").generate(PROMPT, 20)
    # saved in float16: the drafts may differ in the last bits, the output never does (greedy = plain)
    assert a.token_ids == b.token_ids
    lines = []
    train_on_sequences(target, seqs, out, heads=HEADS, draft_vocab_size=48, steps=130, batch_size=8,
                       val_size=6, log_every=10, progress=False, log=lines.append)
    assert lines[0] == "resuming from step 120 of 130" and any(line.startswith("step 130 head 1") for line in lines)


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

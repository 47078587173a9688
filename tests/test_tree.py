"""Tree drafts (mtplab.tree): the trie, the tree pass scoring every node as its branch alone would, the cache keeping
one branch, and the decoder's output staying the target's own (greedy) whatever the branches are."""
import pytest
import torch

from mtplab import SpeculativeDecoder
from mtplab.bench import greedy_acceptance
from mtplab.drafters.base import Draft, Drafter
from mtplab.models import crop_cache, forward, new_cache
from mtplab.sampling import SamplingConfig
from mtplab.trace import Trace
from mtplab.tree import best_branch, build_tree, keep_cache_rows, tree_inputs

from conftest import tiny
from test_mtp import PROMPT, random_mtp

BRANCHES = [[10, 11, 12, 13], [10, 11, 20], [30, 31], [10, 40]]


def test_build_tree_shares_prefixes():
    tree = build_tree(BRANCHES)
    assert tree.tokens == [10, 11, 12, 13, 20, 30, 31, 40]
    assert tree.parents == [-1, 0, 1, 2, 1, -1, 5, 0]
    assert tree.depths == [1, 2, 3, 4, 3, 1, 2, 2]
    assert tree.branches == [[0, 1, 2, 3], [0, 1, 4], [5, 6], [0, 7]]
    positions, mask = tree_inputs(tree, past=3)
    assert positions.tolist() == [[3, 4, 5, 6, 7, 6, 4, 5, 5]]
    assert mask.shape == (1, 1, 9, 12)
    assert mask[0, 0, :, :3].all()  # every row sees the context
    assert mask[0, 0, 5, 3:].tolist() == [True, True, True, False, False, True, False, False, False]  # node 4 (20)
    # argmax per row (0: pending, i+1: node i): 10 after pending, 11 after 10, 20 after 11 -> branch 1 gets 3
    assert best_branch(tree, [10, 11, 20, 0, 0, 0, 0, 0, 0]) == (1, 3)
    assert best_branch(tree, [10, 40, 0, 0, 0, 0, 0, 0, 0]) == (3, 2)
    assert best_branch(tree, [99] * 9) == (0, 0)  # nothing matches: the main draft


@pytest.mark.parametrize("seed,attention", [(0, "sdpa"), (1, "sdpa"), (0, "eager")])
def test_a_tree_pass_scores_each_branch_as_a_chain_pass(seed, attention):
    target = tiny(seed=seed)
    target.model.config._attn_implementation = attention
    ids = [1, 2, 3, 4, 5, 6, 7]
    cache = new_cache(target.model)
    forward(target.model, ids[:-1], cache)
    past = cache.get_seq_length()
    branches = [[b % 64 for b in branch] for branch in BRANCHES]
    tree = build_tree(branches)
    with torch.inference_mode():
        logits, hidden = forward(target.model, [ids[-1]] + tree.tokens, cache, hidden=True, tree=tree)
        for b, branch in enumerate(branches):
            rows = [0] + [i + 1 for i in tree.branches[b]]
            # the cache that keeps only this branch continues exactly like a cache that only ever saw it
            tree_cache = new_cache(target.model)
            forward(target.model, ids[:-1], tree_cache)
            forward(target.model, [ids[-1]] + tree.tokens, tree_cache, tree=tree)
            buffers = [layer._kbuf for layer in tree_cache.layers]
            keep_cache_rows(tree_cache, past, rows)
            crop_cache(cache, past)
            chain_logits, chain_hidden = forward(target.model, [ids[-1]] + branch, cache, hidden=True)
            torch.testing.assert_close(logits[rows], chain_logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(hidden[rows], chain_hidden, atol=1e-5, rtol=1e-4)
            assert tree_cache.get_seq_length() == cache.get_seq_length() == past + 1 + len(branch)
            after_tree = forward(target.model, [5], tree_cache)[0]
            # the rows were moved inside the cache's buffers, which the next pass kept writing into (no copy)
            assert all(layer._kbuf is buf and layer.keys.data_ptr() == buf.data_ptr()
                       for layer, buf in zip(tree_cache.layers, buffers))
            after_chain = forward(target.model, [5], cache)[0]
            torch.testing.assert_close(after_tree, after_chain, atol=1e-5, rtol=1e-4)
            crop_cache(cache, past)


class OracleBranch(Drafter):
    """Main draft: k wrong tokens. One branch: the target's true greedy continuation (known in advance), another
    wrong branch sharing its first token with it. Every round should accept k tokens, along the branch."""
    name = "oracle-branch"

    def __init__(self, text):
        self.text = text

    def propose(self, ids, k, cfg, generator, target_hidden=None):
        truth = self.text[len(ids): len(ids) + k]
        wrong = [(t + 1) % 64 for t in truth]
        return Draft(wrong, None, branches=[truth[:1] + wrong[1:], truth])


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_the_decoder_follows_the_branch_the_target_agrees_with(gamma):
    target = tiny()
    plain = SpeculativeDecoder(target, None).generate(PROMPT, 30)
    text = list(plain.prompt_ids) + plain.token_ids
    trace = SpeculativeDecoder(target, OracleBranch(text), num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 30)
    assert trace.token_ids == plain.token_ids
    full = [r for r in trace.rounds if r.num_draft_tokens == gamma]
    best = 1 if gamma == 1 else 2  # with one token, branch 1 is the truth too, and the first of equals wins
    assert full and all(r.num_accepted == gamma and r.tree_branch == best for r in full)
    assert all(r.target_cache_len == r.context_len + r.num_accepted for r in trace.rounds)
    assert all(r.target_cache_before == r.context_len + r.tree_nodes for r in full)
    # the trace keeps what the round offered and records the verified branch as the draft
    r = full[0]
    assert r.draft_ids == r.tree_branches[best] and len(r.tree_branches) == 3
    assert Trace.from_json(trace.to_json()).rounds[0].tree_branches == trace.rounds[0].tree_branches
    # the round inspector lists a tree round's branches whatever the drafter (here not an MTP one)
    from mtplab.widgets.inspector import RoundInspector
    ins = RoundInspector()
    ins.show(r, 0, trace)
    assert f"<b>branch {best} ← verified</b>" in ins.costs.value and ins.mtp_view.layout.display == "none"
    # with sampling the branches are not used: the main draft is verified alone (and always rejected here)
    sampled = SpeculativeDecoder(target, OracleBranch(text), num_draft_tokens=gamma, schedule="constant", temperature=0.0001)
    assert all(r.tree_branches == [] for r in sampled.generate(PROMPT, 10).rounds)


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
@pytest.mark.parametrize("width,copy", [(2, False), (3, True), (1, True)])
def test_greedy_mtp_tree_equals_plain(gamma, width, copy):
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPT, 40).token_ids
    drafter = random_mtp(target)
    drafter.context_ngram, drafter.tree_width, drafter.tree_copy = 2, width, copy
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(PROMPT, 40)
    assert trace.token_ids == want
    assert any(r.tree_nodes > r.num_draft_tokens for r in trace.rounds)  # trees were verified
    assert all(len(b) <= r.num_draft_tokens for r in trace.rounds for b in r.tree_branches)
    # greedy_acceptance counts a tree round as the decoder does
    got = greedy_acceptance(target, drafter, [PROMPT], gammas=(gamma,), max_new_tokens=40)[gamma]
    assert got["mean_acceptance_length"] == pytest.approx(trace.metrics.mean_acceptance_length)
    rows = [r.verify_tokens for r in trace.rounds]
    assert got["verify_tokens"] == pytest.approx(sum(rows) / len(rows))
    assert max(rows) > 1 + gamma  # some passes read a tree, wider than any chain


@pytest.mark.parametrize("cfg", [SamplingConfig(0.8), SamplingConfig(1.0, top_k=5)], ids=str)
def test_sampling_with_a_tree_drafter_is_the_chain(cfg):
    """Trees are a greedy device: with sampling, a tree drafter drafts and samples exactly as its chain does."""
    target = tiny()
    chain, tree = random_mtp(target), random_mtp(target)
    tree.tree_width, tree.tree_copy = 3, True
    args = dict(num_draft_tokens=3, schedule="constant", temperature=cfg.temperature, top_k=cfg.top_k)
    a = SpeculativeDecoder(target, chain, **args).generate(PROMPT, 30, seed=3)
    b = SpeculativeDecoder(target, tree, **args).generate(PROMPT, 30, seed=3)
    assert a.token_ids == b.token_ids
    assert [r.draft_ids for r in a.rounds] == [r.draft_ids for r in b.rounds]
    assert all(r.tree_nodes == 0 for r in b.rounds)


def test_a_cache_the_tree_cannot_trim_is_refused_before_the_pass():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    target = tiny()
    cache = new_cache(target.model)
    forward(target.model, [1, 2, 3, 4], cache)
    cache.layers[0] = DynamicSlidingWindowLayer(sliding_window=4)
    before = [layer.get_seq_length() for layer in cache.layers]
    with pytest.raises(NotImplementedError, match="tree drafts need a plain full-attention KV cache"):
        forward(target.model, [5, 6, 7], cache, tree=build_tree([[6, 7]]))
    assert [layer.get_seq_length() for layer in cache.layers] == before  # nothing was fed


def test_tree_settings_are_checked():
    target = tiny()
    head = random_mtp(target).head
    from mtplab.drafters.mtp import MTPDrafter
    for bad in (0, 9, 2.0, True):
        with pytest.raises(ValueError, match="tree_width must be an integer in"):
            MTPDrafter(head, tree_width=bad)
    with pytest.raises(ValueError, match="tree_branch_len must be an integer >= 1"):
        MTPDrafter(head, tree_branch_len=0)


@pytest.mark.slow
def test_shipped_mtp_tree_on_the_bundled_target(bundled):
    """The shipped drafter as a tree: the target's own greedy text, longer accepted runs than its chain, and the
    inspector lists the branches with the verified one marked."""
    import html

    import mtplab
    from mtplab.widgets.inspector import RoundInspector

    prompt = "Answer using only the text: Ada Lovelace wrote the first program for Babbage's engine. Who wrote it?"
    plain = SpeculativeDecoder(bundled, None).generate(prompt, 40)
    chain = SpeculativeDecoder(bundled, mtplab.load_drafter("mtp", bundled), num_draft_tokens=3, schedule="constant").generate(prompt, 40)
    drafter = mtplab.load_drafter("mtp-tree", bundled)
    assert drafter.name == "mtp-tree" and (drafter.tree_width, drafter.tree_copy) == (2, True)
    trace = SpeculativeDecoder(bundled, drafter, num_draft_tokens=3, schedule="constant").generate(prompt, 40)
    assert trace.token_ids == chain.token_ids == plain.token_ids
    assert trace.metrics.mean_acceptance_length > chain.metrics.mean_acceptance_length
    rnd = next(r for r in trace.rounds if r.tree_branch > 0 and r.num_accepted > 0)
    ins = RoundInspector()
    ins.show(rnd, 0, trace, bundled.token_text)
    note = ins.costs.value
    assert f"{rnd.tree_nodes} tree nodes" in note and f"{len(rnd.tree_branches)} branches" in note
    first = html.escape(repr(bundled.token_text(rnd.draft_ids[0])))
    assert f"<b>branch {rnd.tree_branch} ← verified</b>: <code>{first}</code>" in note

"""bench.greedy_acceptance: acceptance found from the target's greedy text alone equals the decoder's, round for round."""
import pytest

import mtplab
from mtplab import SpeculativeDecoder
from mtplab.bench import greedy_acceptance, load_prompts
from mtplab.drafters.base import Drafter
from mtplab.trace import per_position_acceptance

from conftest import tiny
from test_mtp import random_mtp

PROMPTS = [[1, 2, 3, 4, 5, 6, 1, 2, 3], [7, 8, 9, 7, 8], [5, 4, 3, 2, 1, 5, 4]]


def decoder_numbers(target, drafter, gamma, n):
    traces = [SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant").generate(p, n) for p in PROMPTS]
    rounds = [r for t in traces for r in t.rounds]
    return ([len(t.token_ids) / len(t.rounds) for t in traces],
            sum(len(t.token_ids) for t in traces) / len(rounds), per_position_acceptance(rounds)[0])


@pytest.mark.parametrize("kind", ["mtp", "mtp-copy", "mtp-attention", "prompt-lookup"])
def test_equals_the_decoder(kind):
    target = tiny()
    drafter = mtplab.PromptLookupDrafter() if kind == "prompt-lookup" else \
        random_mtp(target, context_attention=kind == "mtp-attention")
    if kind == "mtp-copy":
        drafter.context_ngram = 1
    got = greedy_acceptance(target, drafter, PROMPTS, gammas=(1, 3, 6), max_new_tokens=30)
    for gamma in (1, 3, 6):
        per_prompt, pooled, per_position = decoder_numbers(target, drafter, gamma, 30)
        assert got[gamma]["per_prompt"] == pytest.approx(per_prompt)
        assert got[gamma]["mean_acceptance_length"] == pytest.approx(pooled)
        assert got[gamma]["per_position_acceptance"] == pytest.approx(per_position)
        assert pooled > 1  # the comparison means something: drafts were accepted


def test_an_accepted_eos_ends_the_text():
    target = tiny()
    want = SpeculativeDecoder(target, None).generate(PROMPTS[0], 40).token_ids
    target.eos_token_ids = {want[12]}
    drafter = mtplab.PromptLookupDrafter()
    got = greedy_acceptance(target, drafter, PROMPTS[:1], gammas=(7,), max_new_tokens=40)[7]
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=7, schedule="constant").generate(PROMPTS[0], 40)
    assert trace.stop_reason == "eos"
    assert got["per_prompt"] == [len(trace.token_ids) / len(trace.rounds)]


def test_bad_input_is_refused():
    target = tiny()

    class ReadsCache(Drafter):
        needs_target_cache = True

        def observe(self, target_hidden, target_cache):
            pass

    with pytest.raises(ValueError, match="reads the target's KV cache"):
        greedy_acceptance(target, ReadsCache(), PROMPTS)
    with pytest.raises(ValueError, match="gammas must be a non-empty list of integers >= 1, got \\(0,\\)"):
        greedy_acceptance(target, mtplab.PromptLookupDrafter(), PROMPTS, gammas=(0,))


def test_dev_prompts_are_apart_from_the_bench_prompts():
    dev, bench = load_prompts("dev"), load_prompts("bench")
    assert len(dev) == 30 and len(bench) == 10
    assert not {p["prompt"] for p in dev} & {p["prompt"] for p in bench}
    assert len({p["id"] for p in dev}) == 30
    with pytest.raises(ValueError, match="kind must be 'bench' or 'dev', got 'test'"):
        load_prompts("test")

"""Integration tests on the bundled SmolLM2-135M-Instruct target (offline)."""
import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder

pytestmark = pytest.mark.slow

PROMPTS = [
    "Repeat this sentence twice: The quick brown fox jumps over the lazy dog.",
    "Summarize: The committee met on Tuesday. The committee agreed to delay the vote until the budget is final.",
]
N = 32


@pytest.fixture(scope="module")
def plain(bundled):
    """Plain greedy output of mtplab and of transformers' own generate for each prompt."""
    out = {}
    for prompt in PROMPTS:
        ours = SpeculativeDecoder(bundled, None).generate(prompt, max_new_tokens=N).token_ids
        ids = torch.tensor([bundled.encode(prompt)])
        with torch.inference_mode():
            hf = bundled.model.generate(ids, max_new_tokens=N, do_sample=False)[0, ids.shape[1]:].tolist()
        out[prompt] = (ours, hf)
    return out


def test_plain_greedy_equals_transformers_generate(plain):
    for prompt, (ours, hf) in plain.items():
        assert ours == hf, prompt


@pytest.fixture(scope="module")
def drafters(bundled):
    return {
        "prompt-lookup": mtplab.PromptLookupDrafter(),
        "layer-skip": mtplab.LayerSkipDrafter(bundled, exit_layer=10),
        "draft-model": mtplab.DraftModelDrafter(mtplab.truncated_copy(bundled, 8), bundled.tokenizer),
    }


@pytest.mark.parametrize("gamma", [1, 3, 7])
@pytest.mark.parametrize("name", ["prompt-lookup", "layer-skip", "draft-model"])
def test_greedy_speculative_equals_plain(bundled, plain, drafters, name, gamma):
    for prompt, (ours, hf) in plain.items():
        trace = SpeculativeDecoder(bundled, drafters[name], num_draft_tokens=gamma, schedule="constant").generate(prompt, max_new_tokens=N)
        assert trace.token_ids == ours == hf, f"{name} γ={gamma} on {prompt!r}"


def test_prompt_lookup_accepts_copies_and_records_text(bundled):
    trace = SpeculativeDecoder(bundled, mtplab.PromptLookupDrafter(), num_draft_tokens=4, schedule="constant").generate(PROMPTS[0], N)
    m = trace.metrics
    assert m.mean_acceptance_length > 1.3 and m.accepted > 5
    assert "quick brown fox" in trace.text
    r = next(r for r in trace.rounds if r.num_accepted)
    assert "".join(r.draft_text[: r.num_accepted]) == bundled.decode(r.draft_ids[: r.num_accepted])
    assert r.p_top[0][0][1] == r.draft_text[0]  # greedy: the accepted token is the target's top candidate


def test_sampled_run_on_bundled_model(bundled):
    dec = SpeculativeDecoder(bundled, mtplab.LayerSkipDrafter(bundled, exit_layer=10), num_draft_tokens=3, schedule="constant",
                             temperature=0.7, top_p=0.95)
    a = dec.generate("Once upon a time", max_new_tokens=24, seed=1, chat_template=False)
    b = dec.generate("Once upon a time", max_new_tokens=24, seed=1, chat_template=False)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 24
    assert a.prompt_ids[0] != bundled.tokenizer.convert_tokens_to_ids("<|im_start|>")  # raw text, no template
    assert any(r.draws and r.draws[0] is not None for r in a.rounds)
    assert a.metrics.drafted > 0


def test_chat_template_applied_by_default(bundled):
    from mtplab.models import chat_ids
    from mtplab.train import chat_sequences
    from test_datagen import old_chat_ids

    ids = bundled.encode("Hello")
    assert bundled.decode(ids).startswith("<|im_start|>system") and bundled.decode(ids).endswith("assistant\n")
    assert ids == chat_ids(bundled.tokenizer, "Hello") == old_chat_ids(bundled.tokenizer, "Hello")
    text = "A docstring.\n\nWith two paragraphs."
    assert chat_sequences(bundled, [text]) == [old_chat_ids(bundled.tokenizer, f"Explain this documentation:\n\n{text}", text)]


def test_bundled_errors(bundled):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        SpeculativeDecoder(bundled, None).generate("   ")
    with pytest.raises(ValueError, match=r"exceeds the context of SmolLM2-135M-Instruct: at most 8192 tokens"):
        SpeculativeDecoder(bundled, None).generate("word " * 9000, max_new_tokens=4, chat_template=False)
    tiny = mtplab.tiny_random_target(vocab_size=64)
    with pytest.raises(ValueError, match="vocabulary of 64 tokens but the target SmolLM2-135M-Instruct has 49152"):
        SpeculativeDecoder(bundled, mtplab.DraftModelDrafter(tiny.model))
    with pytest.raises(ValueError, match=r"exit_layer must be an integer in \[1, 29\]"):
        mtplab.LayerSkipDrafter(bundled, exit_layer=30)

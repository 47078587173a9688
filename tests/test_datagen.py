"""Training data for MTP drafters (mtplab.datagen) and the shipped MTP drafter of the bundled target."""
import json

import pytest
import torch

import mtplab
from mtplab import SpeculativeDecoder, datagen
from mtplab.bench import load_prompts
from mtplab.drafters.mtp import WEIGHTS_NAME, shipped_path

from conftest import tiny


def test_prompts_are_deterministic_varied_and_never_the_held_out_ones():
    a, b = datagen.make_prompts(seed=0), datagen.make_prompts(seed=0)
    assert a == b and len(a) > 4000 and len(set(a)) == len(a)
    assert datagen.make_prompts(seed=1) != a  # another shuffle (and other random pairings)
    starts = {p.split()[0] for p in a}
    assert {"Explain", "Write", "Summarize", "Turn", "Compare"} <= starts
    held_out = [p["prompt"] for p in load_prompts()]
    assert not set(held_out) & set(a)
    low = " ".join(a).lower()
    assert "tide" not in low and "lighthouse keeper" not in low and "vowel" not in low


def test_prompts_are_the_shipped_drafters_on_every_python():
    """The shipped drafter's stage-A prompts were made on Python 3.12 (runs/…/prompts_a.json, not committed): the
    module list is pinned, so any Python gives the same 5,267 prompts."""
    import hashlib

    a = datagen.make_prompts(seed=0)
    assert len(a) == 5267
    assert hashlib.sha256("\n".join(a).encode()).hexdigest() == \
        "f4b0ae90838c9a080612a8131d2d4b3ca8eb09f23e5b8d304e080631d29d4f1b"
    b = datagen.make_prompts(seed=1)  # the order of the templates matters too: every random draw follows it
    assert len(b) == 5261
    assert hashlib.sha256("\n".join(b).encode()).hexdigest() == \
        "361ebbeaeb3caaa2ee1ea0bd3dec4ed7797442564807c7d6f631b4248fb2130c"


def test_followup_prompts_wrap_code_emails_and_texts():
    long = "word " * 60
    pairs = [("Write a Python function that adds numbers.", "Here:\n```python\ndef add(a, b):\n    return a + b\n```\n" + long),
             ("Write a short, friendly email to a colleague about tea.", "Hi Ann,\n\n" + long),
             ("Write a short paragraph about rivers.", "Rivers flow. " + long),
             ("Too short", "no")]
    out = datagen.make_followup_prompts(pairs, ["Some documentation. " * 12], seed=0)
    assert len(out) == 4  # the too-short answer is dropped
    assert sum("```python\ndef add" in p for p in out) == 1
    assert sum(p.startswith(("Rewrite this email", "Make this email")) for p in out) == 1
    assert sum("documentation" in p.split("\n")[0].lower() for p in out) == 1


def chat_tokenizer():
    """A tiny word-level tokenizer with a chat template that has a default system turn (as SmolLM2's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "<s> </s> system user assistant you are kind hello name a color explain this x = 1 ok".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *words])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    out.chat_template = ("{% if messages[0].role != 'system' %}<s> system you are kind </s> {% endif %}"
                         "{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    return out


def old_chat_ids(tok, user, answer=None):
    """The three expressions mtplab.models.chat_ids replaced (Target.encode, datagen, train.chat_sequences)."""
    if answer is None:
        text = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False)
    else:
        text = tok.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                       tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def test_one_chat_template_helper_encodes_prompts_and_training_chats():
    from mtplab.models import Target, chat_ids
    from mtplab.train import chat_sequences

    tok = chat_tokenizer()
    target = Target(tiny(vocab_size=64).model, tok, "tiny-chat")
    for prompt in ("hello", "explain this x = 1", "name a color ok"):
        ids = chat_ids(tok, prompt)
        assert ids == old_chat_ids(tok, prompt) == target.encode(prompt)
        assert tok.decode(ids).startswith("<s> system") and tok.decode(ids).endswith("assistant")
        assert chat_ids(tok, prompt, answer="ok") == old_chat_ids(tok, prompt, answer="ok")
    texts, want = ["hello " * 30, "x = 1"], []
    for ask, text in zip(("Explain this documentation:", "Summarize the following text:"), texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        want.append(old_chat_ids(tok, f"{ask}\n\n{tok.decode(ids[:8])}", answer=tok.decode(ids)))
    assert chat_sequences(target, texts, max_prompt_tokens=8) == want


@pytest.mark.slow
def test_generate_answers_writes_resumable_shards_that_match_plain_decoding(bundled, tmp_path):
    prompts = ["Name a color.", "What is two plus two?", "Say hello in French."]
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=2, max_new_tokens=8, progress=False)
    shards = sorted(tmp_path.glob("shard_*.pt"))
    assert [s.name for s in shards] == ["shard_00000.pt", "shard_00001.pt"]
    stamp = [s.stat().st_mtime_ns for s in shards]
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=2, max_new_tokens=8, progress=False)
    assert [s.stat().st_mtime_ns for s in shards] == stamp  # a re-run resumes: nothing is redone
    seqs = datagen.load_sequences(tmp_path)
    assert len(seqs) == 3
    plain = SpeculativeDecoder(bundled, None)
    for ids, start in seqs:
        prompt = datagen.decoded_pairs(bundled, [(ids, start)])[0][0]
        assert prompt in prompts
        assert ids[:start] == bundled.encode(prompt)
        want = plain.generate(prompt, 8).token_ids
        assert ids[start:] == want[: len(ids) - start]  # batched, left-padded greedy = mtplab's plain greedy


@pytest.mark.slow
def test_a_stage_resumes_with_the_batch_size_it_began_with(bundled, tmp_path):
    """Shard b holds batch b: a re-run with another batch size must keep the stage's own, or it would skip some
    prompts and answer others twice (a stage cut off after its first shard, resumed with --batch-size 3)."""
    prompts = ["Name a color.", "What is two plus two?", "Say hello in French.", "Name a fruit.", "Count to three."]
    kw = dict(max_new_tokens=2, progress=False)
    (tmp_path / "batches.json").write_text('{"batch_size": 512}')  # begun, cut off before its first shard: binds nothing
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=2, **kw)
    assert len(list(tmp_path.glob("shard_*.pt"))) == 3
    whole = sorted(map(tuple, (ids for ids, _ in datagen.load_sequences(tmp_path))))
    for name in ("shard_00001.pt", "shard_00002.pt", datagen.COMPLETE):
        (tmp_path / name).unlink()
    said = []
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=3, log=said.append, **kw)
    assert sorted(map(tuple, (ids for ids, _ in datagen.load_sequences(tmp_path)))) == whole
    assert (tmp_path / datagen.COMPLETE).exists() and any("resumes with 2 (not 3)" in line for line in said)
    (tmp_path / "batches.json").unlink()  # shards from before the record: the first shard tells the size
    (tmp_path / "shard_00002.pt").unlink()
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=4, **kw)
    assert sorted(map(tuple, (ids for ids, _ in datagen.load_sequences(tmp_path)))) == whole


@pytest.mark.slow
def test_answers_decoded_in_bfloat16_come_from_a_bfloat16_copy_and_say_so(bundled, tmp_path):
    import copy

    prompts = ["Name a color.", "What is two plus two?"]
    datagen.generate_answers(bundled, prompts, tmp_path, batch_size=1, max_new_tokens=6, precision="bfloat16",
                             progress=False)  # (one at a time: bfloat16 rounding differs with the batch's padding)
    assert bundled.model.dtype == torch.float32  # the target itself is untouched
    shard = torch.load(next(tmp_path.glob("shard_*.pt")), weights_only=True)
    assert shard["dtype"] == "bfloat16"
    half = copy.deepcopy(bundled.model).to(torch.bfloat16)
    for ids, start in datagen.load_sequences(tmp_path):
        with torch.inference_mode():
            want = half.generate(torch.tensor([ids[:start]]), max_new_tokens=6, do_sample=False)[0, start:].tolist()
        assert ids[start:] == want[: len(ids) - start]


def test_stage_b_waits_until_stage_a_is_complete(tmp_path, monkeypatch):
    """Stage B's prompts ask about all of stage A's answers: a run whose time ran out in stage A must not freeze
    them from the part it has (a re-run that completes A makes them)."""
    calls, temperatures = [], {}

    def fake_generate(target, prompts, out_dir, **kw):
        calls.append(out_dir.name)
        temperatures[out_dir.name] = (kw.get("temperature", 0.0), kw.get("seed", 0), len(prompts))
        out_dir.mkdir(parents=True, exist_ok=True)
        if out_dir.name == "a_greedy" and finish_a:
            (out_dir / datagen.COMPLETE).write_text("1 shards\n")
        return out_dir

    monkeypatch.setattr(datagen, "generate_answers", fake_generate)
    monkeypatch.setattr(datagen, "make_prompts", lambda: ["p1", "p2"])
    monkeypatch.setattr(datagen, "decoded_pairs", lambda target, seqs: [("p1", "a1"), ("p2", "a2")])
    monkeypatch.setattr(datagen, "doc_snippets", lambda limit=None: [])
    finish_a = False
    datagen.build_answer_corpus(None, tmp_path, log=lambda msg: None)
    assert calls == ["a_greedy", "a_t07"] and not (tmp_path / "prompts_b.json").exists()
    finish_a, calls[:] = True, []
    datagen.build_answer_corpus(None, tmp_path, log=lambda msg: None)
    assert calls == ["a_greedy", "b_greedy", "a_t07", "b_t07"] and (tmp_path / "prompts_b.json").exists()
    b = len(json.loads((tmp_path / "prompts_b.json").read_text()))  # the sampled stages: other seeds, same prompts
    assert temperatures == {"a_greedy": (0.0, 0, 2), "b_greedy": (0.0, 0, b), "a_t07": (0.7, 1, 2), "b_t07": (0.7, 2, b)}


def test_generate_answers_refuses_an_unknown_precision(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of .*'float16'"):
        datagen.generate_answers(None, ["hi"], tmp_path, precision="float16")


def test_packed_stages_restore_the_corpus_byte_for_byte(tmp_path):
    """A corpus packed into a folder (one tar.xz a stage) restores into an empty cache as the same shards, so the
    corpus goes on from there; a stage with shards of its own is left alone, and a pack that grew is re-written."""
    def shard(folder, b, seqs):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(dict(tokens=torch.tensor([t for ids, _ in seqs for t in ids], dtype=torch.int32),
                        lengths=torch.tensor([len(ids) for ids, _ in seqs]),
                        answer_start=torch.tensor([s for _, s in seqs]), dtype="bfloat16"), folder / f"shard_{b:05d}.pt")

    cache, packs = tmp_path / "cache", tmp_path / "packs"
    shard(cache / "a_greedy", 0, [([1, 2, 3, 4], 2), ([5, 6, 7], 1)])
    shard(cache / "a_greedy", 1, [([8, 9], 1)])
    (cache / "a_greedy" / datagen.COMPLETE).write_text("2 shards\n")
    shard(cache / "b_greedy", 0, [([3, 3, 3], 2)])
    want = {name: datagen.load_sequences(cache / name) for name in datagen.STAGES}
    assert [p.name for p in datagen.pack_stages(cache, packs, log=lambda m: None)] == ["a_greedy.tar.xz",
                                                                                     "b_greedy.tar.xz"]
    assert datagen.pack_stages(cache, packs, log=lambda m: None) == []  # nothing grew
    fresh = tmp_path / "fresh"
    assert datagen.unpack_stages(packs, fresh, log=lambda m: None) == ["a_greedy", "b_greedy"]
    for name in ("a_greedy", "b_greedy"):
        for path in (cache / name).iterdir():
            assert (fresh / name / path.name).read_bytes() == path.read_bytes(), path
    assert {name: datagen.load_sequences(fresh / name) for name in datagen.STAGES} == want
    assert datagen.unpack_stages(packs, fresh, log=lambda m: None) == []  # its own shards now: left alone
    shard(cache / "b_greedy", 1, [([4, 4], 1)])  # the stage grew: its pack is written again
    assert [p.name for p in datagen.pack_stages(cache, packs, log=lambda m: None)] == ["b_greedy.tar.xz"]
    (packs / "c_other.tar.xz").write_bytes((packs / "a_greedy.tar.xz").read_bytes())
    with pytest.raises(ValueError, match="c_other.tar.xz: not a stage of the answer corpus"):
        datagen.unpack_stages(packs, tmp_path / "third", log=lambda m: None)


# --- the shipped drafter ----------------------------------------------------------------------------------------

def test_shipped_drafter_is_small_and_documented():
    path = shipped_path()
    size = (path / WEIGHTS_NAME).stat().st_size
    assert size <= 25 * 2 ** 20, size
    meta = json.loads((path / "mtp_config.json").read_text())
    assert meta["target"] == "SmolLM2-135M-Instruct" and meta["context_ngram"] == 3
    curve = [h["acceptance"][0] for h in meta["history"]]
    assert curve[-1] > curve[0] + 0.1  # validation acceptance rose during training
    with pytest.raises(ValueError, match="ships an MTP drafter only for"):
        mtplab.load_drafter("mtp", tiny())


@pytest.mark.slow
def test_shipped_drafter_is_exact_and_accepts_on_held_out_prompts(bundled):
    plain = SpeculativeDecoder(bundled, None)
    drafter = mtplab.load_drafter("mtp", bundled)
    head_only = mtplab.load_drafter("mtp", bundled, context_ngram=None)
    prompts = [p["prompt"] for p in load_prompts()[:2]] + ["Repeat after me: the quick brown fox jumps over the lazy dog."]
    want = [plain.generate(p, 40).token_ids for p in prompts]
    lengths = {}
    for d in (drafter, head_only):
        dec = SpeculativeDecoder(bundled, d, num_draft_tokens=4, schedule="constant")
        runs = []
        for p, w in zip(prompts, want):
            t = dec.generate(p, 40)
            assert t.token_ids == w
            assert all(r.draft_start_position == r.context_len - 2 for r in t.rounds if r.num_drafted)
            runs.append(t.metrics.mean_acceptance_length)
        lengths[d.name] = runs
    # a trained head: well above the 1.0 of a useless drafter on prompts it never saw
    assert sum(lengths["mtp-head"][:2]) / 2 > 1.3, lengths
    # copying from the context pays off where the answer repeats the prompt
    assert lengths["mtp"][2] > lengths["mtp-head"][2], lengths


def test_shipped_eagle3_drafter_is_small_documented_and_copies():
    """The EAGLE-3 drafter in training ships as a folder a new run can go on from (``init_from``): the bundled
    target's, float16 weights under 25 MB, copying on 3-gram matches, its history of validation acceptance."""
    path = shipped_path(kind="eagle3")
    assert (path / WEIGHTS_NAME).stat().st_size <= 25 * 2 ** 20
    meta = json.loads((path / "mtp_config.json").read_text())
    assert meta["kind"] == "eagle3" and meta["target"] == "SmolLM2-135M-Instruct" and meta["context_ngram"] == 3
    assert meta["target_layers"] == [2, 15, 27] and meta["draft_vocab_size"] == 8192
    decoded = [h["decoded"]["mean_acceptance_length"] for h in meta["history"]]
    assert decoded[-1] > 1.3 and meta["steps"] == meta["history"][-1]["step"]  # validation: a trained head
    drafter = mtplab.load_drafter("eagle3")
    assert type(drafter).__name__ == "Eagle3Drafter" and drafter.context_ngram == 3
    assert mtplab.load_drafter("eagle3", context_ngram=None).context_ngram is None


@pytest.mark.slow
def test_shipped_eagle3_drafter_is_exact_and_accepts_on_held_out_prompts(bundled):
    plain = SpeculativeDecoder(bundled, None)
    prompts = [p["prompt"] for p in load_prompts()[:2]] + ["Repeat after me: the quick brown fox jumps over the lazy dog."]
    want = [plain.generate(p, 40).token_ids for p in prompts]
    lengths = {}
    for ngram in (3, None):
        dec = SpeculativeDecoder(bundled, mtplab.load_drafter("eagle3", bundled, context_ngram=ngram),
                                 num_draft_tokens=3, schedule="constant")
        runs = []
        for p, w in zip(prompts, want):
            t = dec.generate(p, 40)
            assert t.token_ids == w
            runs.append(t.metrics.mean_acceptance_length)
        lengths[ngram] = runs
    assert sum(lengths[None][:2]) / 2 > 1.2, lengths  # a trained head, on prompts it never saw
    assert lengths[3][2] > lengths[None][2], lengths  # the copy pays where the answer repeats the prompt


@pytest.mark.slow
def test_shipped_drafter_samples_from_the_target(bundled):
    """At T=0.7 the first emitted token follows the target's distribution (chi-square over seeds)."""
    from scipy.stats import chisquare

    from mtplab.sampling import SamplingConfig, probs

    prompt = "Write one word that describes the sea."
    ids = bundled.encode(prompt)
    with torch.inference_mode():
        p = probs(bundled.model(torch.tensor([ids])).logits[0, -1], SamplingConfig(0.7)).double()
    dec = SpeculativeDecoder(bundled, mtplab.load_drafter("mtp", bundled), num_draft_tokens=3, schedule="constant", temperature=0.7,
                             record=False)
    n, counts = 160, {}
    for seed in range(n):  # 4 new tokens: the first round drafts 3 (a 1-token budget would draft none)
        y = dec.generate(prompt, 4, seed=seed).token_ids[0]
        counts[y] = counts.get(y, 0) + 1
    top = torch.topk(p, 4).indices.tolist()
    obs = [counts.get(t, 0) for t in top] + [n - sum(counts.get(t, 0) for t in top)]
    exp = [float(p[t]) * n for t in top] + [n * (1 - float(p[top].sum()))]
    assert chisquare(obs, exp).pvalue > 1e-3, (obs, exp)

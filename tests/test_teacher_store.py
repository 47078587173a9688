"""What makes EAGLE-3 training affordable on a CPU: the target's outputs computed once and kept on disk
(``TeacherStore``), the draft loss in pieces with its gradient written out (``_DraftCrossEntropy``), and the
training-time test's own rows joining the attention as one score each (``Eagle3Attention.attend(..., own)``).
Each must equal the plain computation it replaces."""
import contextlib
import copy
import json

import pytest
import torch

import mtplab.train as train
from mtplab import SpeculativeDecoder
from mtplab.drafters.eagle import Eagle3Head
from mtplab.train import TeacherStore, _pad_batch, _teacher, train_on_sequences

from conftest import tiny
from test_mtp import QUIET, sampled_sequences


def plain_draft_loss(s, w, p):
    z = s @ w
    return -(p * torch.log_softmax(z.float(), dim=-1)).sum(-1), z.argmax(-1)


@pytest.mark.parametrize("piece", [1 << 20, 3 * 50 + 7], ids=["one-piece", "ragged-pieces"])
def test_the_draft_cross_entropy_equals_autograds(monkeypatch, piece):
    """Loss, greedy draft and gradient of ``s`` equal the plain chain against the teacher rows each row picks (read
    through the LM-head row each expects, ``p @ wᵀ``), also when the rows are cut into pieces that do not divide
    them (3 rows of 50 logits and change: 3-row pieces over 37 rows), and the picked rows are out of order and
    repeat."""
    monkeypatch.setattr(train, "CE_PIECE", piece)
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(37, 8, generator=gen)
    w = torch.randn(8, 50, generator=gen)
    p = torch.softmax(2 * torch.randn(60, 50, generator=gen), dim=-1)
    rows = torch.randint(60, (37,), generator=gen)
    g = torch.rand(37, generator=gen)  # a weight per row, as the masked mean gives
    got_s, want_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    got, got_top = train._DraftCrossEntropy.apply(got_s, w, p @ w.T, rows)
    want, want_top = plain_draft_loss(want_s, w, p[rows])
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_top, want_top)
    torch.testing.assert_close(got_s.grad, want_s.grad, rtol=1e-5, atol=1e-6)
    again, no_top = train._DraftCrossEntropy.apply(s, w, p @ w.T, rows, False)  # training: no argmax
    assert no_top is None and torch.equal(again, got.detach())


def test_own_rows_join_the_attention_as_the_masked_blocks_did():
    """Training-time test's attention with the own rows as one score each equals the full attention over the keys
    of every step under speculators' mask (causal block, then one diagonal block per earlier step)."""
    target = tiny(vocab_size=64, seed=0)
    attn = Eagle3Head.for_target(target.model.config).layers[0].self_attn
    gen = torch.Generator().manual_seed(1)
    n, d = 11, attn.head_dim
    q = torch.randn(2, attn.heads, n, d, generator=gen)
    kv = [(torch.randn(2, attn.kv_heads, n, d, generator=gen), torch.randn(2, attn.kv_heads, n, d, generator=gen))
          for _ in range(3)]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = torch.cat([causal] + [torch.eye(n, dtype=torch.bool)] * 2, dim=1)
    want = attn.attend(q, torch.cat([k for k, _ in kv], -2), torch.cat([v for _, v in kv], -2), mask)
    torch.testing.assert_close(attn.attend(q, *kv[0], causal, kv[1:]), want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def data():
    target = tiny(vocab_size=64, seed=0)
    return target, sampled_sequences(target, 12, 15)


def bf16(x):
    return x.to(torch.bfloat16).float()


def test_the_store_holds_the_targets_outputs(data, tmp_path):
    """Each sequence's stored rows are what the target gives for it alone (hidden states of the EAGLE-3 layers and
    the final ones rounded to bfloat16, greedy tokens exactly), whatever piece it was computed in."""
    target, seqs = data
    store = TeacherStore(tmp_path, target, seqs, [0, 1]).fill(target.model, piece_tokens=40, progress=False,
                                                             log=lambda *_: None)
    for i, seq in enumerate(seqs):
        ids, mask, _ = _pad_batch([seq], 0, "cpu")
        hidden, final, top = _teacher(target.model, ids, mask, [0, 1])
        got = store[i]
        assert got[0].shape == (len(seq[0]), 2 * target.model.config.hidden_size)
        torch.testing.assert_close(got[0], bf16(hidden[0]), rtol=2 ** -7, atol=1e-6)
        torch.testing.assert_close(got[1], bf16(final[0]), rtol=2 ** -7, atol=1e-6)
        assert torch.equal(got[2], top[0])


def test_an_interrupted_fill_resumes_to_the_same_store(data, tmp_path, monkeypatch):
    target, seqs = data
    whole = TeacherStore(tmp_path / "whole", target, seqs, True).fill(target.model, piece_tokens=40, progress=False,
                                                                     log=lambda *_: None)
    real, calls = train._teacher, []

    def cut_off(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train, "_teacher", cut_off)
    with pytest.raises(KeyboardInterrupt):
        TeacherStore(tmp_path / "cut", target, seqs, True).fill(target.model, piece_tokens=40, progress=False)
    monkeypatch.setattr(train, "_teacher", real)
    resumed = TeacherStore(tmp_path / "cut", target, seqs, True)
    assert 0 < resumed.done < len(seqs) and not resumed.complete  # two pieces were recorded
    said = []
    resumed.fill(target.model, piece_tokens=40, progress=False, log=said.append)
    assert resumed.complete and any("resuming" in line for line in said)
    for i in range(len(seqs)):
        for a, b in zip(whole[i], resumed[i]):
            assert torch.equal(a, b)


def test_the_store_of_a_grown_corpus_copies_what_an_earlier_store_holds(data, tmp_path, monkeypatch):
    """A store for the corpus after it grew (old sequences in another order, new ones among them) runs the target
    over the new sequences only and holds exactly what a store filled from scratch holds; stores of other layers,
    unfinished ones and the store itself are passed over; a store from before the index gets one when opened."""
    import numpy as np

    target, seqs = data
    fresh = TeacherStore(tmp_path / "fresh", target, seqs, True).fill(target.model, piece_tokens=40, progress=False,
                                                                     log=lambda *_: None)
    old = seqs[2:9]
    TeacherStore(tmp_path / "old", target, old, True).fill(target.model, piece_tokens=40, progress=False,
                                                          log=lambda *_: None)
    (tmp_path / "old" / "index.npy").unlink()  # as stores were before the index
    TeacherStore(tmp_path / "old", target, old, True)  # opening it writes the index
    TeacherStore(tmp_path / "layers", target, seqs, [0, 1]).fill(target.model, progress=False, log=lambda *_: None)
    TeacherStore(tmp_path / "half", target, seqs, True, dtype=torch.bfloat16).fill(
        copy.deepcopy(target.model).to(torch.bfloat16), progress=False, log=lambda *_: None)
    TeacherStore(tmp_path / "part", target, seqs[9:], True).fill(target.model, progress=False, log=lambda *_: None)
    meta = json.loads((tmp_path / "part" / "teacher.json").read_text())
    (tmp_path / "part" / "teacher.json").write_text(json.dumps(dict(meta, done=1)))  # as if cut off after a piece
    real, rows = train._teacher, []
    monkeypatch.setattr(train, "_teacher", lambda model, ids, *a: rows.extend(ids.tolist()) or real(model, ids, *a))
    grown = seqs[9:] + seqs[:9][::-1]
    said = []
    store = TeacherStore(tmp_path / "grown", target, grown, True)
    store.fill(target.model, piece_tokens=40, progress=False, log=said.append,
               reuse=[tmp_path / name for name in ("half", "layers", "part", "old", "grown", "missing")])
    ran = sorted(tuple(r[:len(ids)]) for r in rows for ids, _ in seqs if r[:len(ids)] == ids and
                 all(t == 0 for t in r[len(ids):]))
    assert sorted(set(ran)) == sorted(tuple(ids) for ids, _ in seqs if (ids, _) not in old)
    assert len(rows) == len(seqs) - len(old)
    assert any("layers: another target or layers, not reused" in line for line in said)
    assert any("half: filled in bfloat16, not float32, not reused" in line for line in said)
    assert any("part: unfinished, not reused" in line for line in said)
    assert any("grown: this store" in line for line in said) and any("missing: no index" in line for line in said)
    assert any(f"{sum(len(ids) for ids, _ in old)} copied" in line for line in said)
    for i, seq in enumerate(grown):
        for a, b in zip(fresh[seqs.index(seq)], store[i]):
            assert torch.equal(a, b)
    assert np.load(tmp_path / "grown" / "index.npy").shape == (len(seqs), 3)


def test_a_store_of_other_data_or_layers_is_refused(data, tmp_path):
    target, seqs = data
    TeacherStore(tmp_path, target, seqs, True).fill(target.model, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="another run.*data of 11 sequences"):
        TeacherStore(tmp_path, target, seqs[:11], True)
    with pytest.raises(ValueError, match=r"another run.*hidden \[0, 1\]"):
        TeacherStore(tmp_path, target, seqs, [0, 1])
    with pytest.raises(ValueError, match="another run.*teacher precision float32, not teacher precision bfloat16"):
        TeacherStore(tmp_path, target, seqs, True, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="for a teacher in float32, not torch.bfloat16"):
        TeacherStore(tmp_path / "new", target, seqs, True).fill(copy.deepcopy(target.model).to(torch.bfloat16))


def test_training_from_a_store_runs_no_target_pass_after_filling_it(data, tmp_path, monkeypatch):
    """An EAGLE-3 head trained from a store: the target runs only to fill it (once, not again on a re-run), the
    head's loss falls, and its drafts decode exactly as plain greedy decoding. Freed memory goes back to the OS
    after the fill, every ``RELEASE_EVERY`` steps and at the end (a long run grew by GBs without)."""
    target, seqs = data
    real, calls, released = train._teacher, [], []
    monkeypatch.setattr(train, "_teacher", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(train, "_release_freed_memory", lambda: released.append(1))
    kw = dict(heads=["eagle3"], draft_vocab_size=40, batch_size=4, val_size=2, log_every=10, lr=3e-3,
              cache_teacher=tmp_path / "teacher", **QUIET)
    drafter = train_on_sequences(target, seqs, tmp_path / "run", steps=30, **kw)[0]
    filled = len(calls)
    assert filled == 1  # 12 sequences of 18 tokens: one piece
    assert len(released) == 1 + 30 // train.RELEASE_EVERY + 1
    history = [h["val_loss"] for h in drafter.history]
    assert history[-1] < history[0]
    train_on_sequences(target, seqs, tmp_path / "run", steps=40, **kw)  # resumes the run: 10 more steps
    assert len(calls) == filled
    prompt = seqs[0][0][:4]
    plain = SpeculativeDecoder(target, None).generate(prompt, 20).token_ids
    trace = SpeculativeDecoder(target, drafter, num_draft_tokens=3, schedule="constant").generate(prompt, 20)
    assert trace.token_ids == plain


def test_training_keeps_its_big_arrays_on_the_heap(data, tmp_path, monkeypatch):
    """Inside _big_arrays_on_the_heap a 64 MB array comes from glibc's heap (pages freed by the step before are
    reused) instead of a fresh mapping faulted in page by page; after it glibc maps such arrays again (checked in a
    fresh process, before a big array lived on the heap: the heap's free space would serve the next one). Every step
    runs inside it."""
    import subprocess
    import sys

    check = """
import ctypes, torch
from mtplab import train
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = train._libc()
if libc is None or not hasattr(libc, "mallinfo2"):
    raise SystemExit("this test reads glibc's mallinfo2 (glibc >= 2.33), which this C library lacks")
libc.mallinfo2.restype = MallInfo2
def mapped():
    before = libc.mallinfo2().hblks
    x = torch.empty(16 << 20)
    n = libc.mallinfo2().hblks - before
    del x
    return n
outside = mapped()
with train._big_arrays_on_the_heap():
    pass
restored = mapped()  # before any big array lived on the heap: its free space would serve the next one
with train._big_arrays_on_the_heap():
    inside = mapped()
print(outside, restored, inside)
"""
    r = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["1", "1", "0"], (r.stdout, r.stderr[-2000:])
    target, seqs = data
    real, active, inside = train._big_arrays_on_the_heap, [], []

    @contextlib.contextmanager
    def watched():
        with real():
            active.append(1)
            yield
            active.pop()

    monkeypatch.setattr(train, "_big_arrays_on_the_heap", watched)
    monkeypatch.setattr(train, "_release_freed_memory", lambda: inside.append(bool(active)))
    train_on_sequences(target, seqs, tmp_path / "run", heads=["eagle3"], draft_vocab_size=40, steps=20, batch_size=4,
                       val_size=2, log_every=10, **QUIET)
    assert inside == [True, True, False]  # every RELEASE_EVERY steps inside the loop; after it, outside

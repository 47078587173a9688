"""``Round`` and ``Trace``: the records of a decode run — the only thing views, reports and benchmarks read.

A Round holds everything needed to replay one draft/verify decision without the model. A Trace is the prompt,
the configuration and the rounds, plus the metrics derived from them (:func:`metrics_of`). Every metric's name and
meaning is in ``GLOSSARY`` (the README's glossary says the same; views label their numbers with these names).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

# one way: the report reads a Trace's attributes and imports nothing of this module at runtime
from .report import trace_html

GLOSSARY = {  # one vocabulary: each name means this, wherever it appears
    "mean acceptance length": "tokens emitted per target pass (verify), the target's own bonus or correction token "
                              "included, as vLLM counts it; 1 is plain decoding",
    "acceptance rate": "accepted drafted tokens / drafted tokens, over all rounds",
    "per-position acceptance": "as vLLM counts it: rounds that accepted draft position i / rounds that drafted "
                               "position i (so later positions include every earlier rejection)",
    "conditional acceptance": "rounds that accepted draft position i / rounds that reached it (accepted every "
                              "position before i and drafted i): the chance of the next token, given the ones before",
    "α": "the i.i.d. acceptance probability Leviathan's formulas take, estimated from the rounds (accepted tokens / "
         "(accepted tokens + rejections)); close to the conditional acceptance when it does not decay",
    "c": "the drafter's cost: its seconds per drafted token / the seconds of one plain target step",
    "v(γ)": "the verify cost: one target pass over γ+1 tokens / one plain target step (Leviathan assume 1; "
            "measured on this machine)",
    "speedup": "plain seconds per token / speculative seconds per token, measured in the same run",
}


@dataclass
class Round:
    index: int
    context_len: int  # tokens (prompt + generated) before this round
    drafter: str
    num_draft_tokens: int  # draft length asked for by the policy
    draft_ids: list = field(default_factory=list)  # drafted token ids (length = draft length used)
    draft_text: list = field(default_factory=list)
    q: list = field(default_factory=list)  # drafter probability of each drafted token
    p: list = field(default_factory=list)  # target probability of the same token
    p_top: list = field(default_factory=list)  # per verified position: [[id, text, prob], ...] of the target
    q_top: list = field(default_factory=list)  # per drafted position: [[id, text, prob], ...] of the drafter
    candidates: list = field(default_factory=list)  # per drafted position: [[id, text, p, q], ...] for p-vs-q plots
    accept_probs: list = field(default_factory=list)  # min(1, p/q); greedy: 1.0 match / 0.0 mismatch
    draws: list = field(default_factory=list)  # uniform draw u per examined position (None when greedy)
    num_accepted: int = 0
    token_id: int | None = None  # token emitted by the target after the accepted prefix (None: stopped at EOS)
    token_text: str = ""
    token_kind: str = "plain"  # "bonus", "correction" or "plain" (nothing drafted)
    residual_top: list = field(default_factory=list)  # top of norm(max(0, p-q)) at the rejected position
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    target_cache_before: int = 0  # target KV-cache length after the verify pass, before rollback
    target_cache_len: int = 0  # ... after rollback
    drafter_cache_len: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    bookkeeping_seconds: float = 0.0
    draft_start_position: int | None = None  # for MTP drafters: the target position whose hidden state seeded it
    tree_branches: list = field(default_factory=list)  # tree drafts: every branch offered, main draft first ([]: chain)
    tree_branch: int = 0  # ... the one verified (the one the target's greedy choices followed furthest): draft_ids
    tree_nodes: int = 0  # ... the tree's node count: the verify pass read tree_nodes + 1 tokens
    expected_speedup: float | None = None  # schedule="auto": the walltime factor it expected of this γ (None: other)

    @property
    def num_drafted(self) -> int:
        return len(self.draft_ids)

    @property
    def verify_tokens(self) -> int:
        """Tokens the round's verify pass read: the pending token and the draft, or every node of a tree."""
        return 1 + (self.tree_nodes or self.num_drafted)

    @property
    def emitted_ids(self) -> list:
        """Tokens this round added to the output, in order."""
        return list(self.draft_ids[: self.num_accepted]) + ([] if self.token_id is None else [self.token_id])

    @property
    def seconds(self) -> float:
        return self.draft_seconds + self.verify_seconds + self.bookkeeping_seconds

    def token_events(self) -> list:
        """``(kind, token_id, text, position)`` for every token the round showed, rejected drafts included."""
        out = []
        for i, (tid, text) in enumerate(zip(self.draft_ids, self.draft_text)):
            if i < self.num_accepted:
                out.append(("accepted", tid, text, i))
            elif i == self.num_accepted and self.token_id is not None:  # (after an accepted EOS nothing was rejected)
                out.append(("rejected", tid, text, i))
        if self.token_id is not None:
            out.append((self.token_kind, self.token_id, self.token_text, self.num_accepted))
        return out


@dataclass
class Metrics:
    rounds: int
    new_tokens: int
    drafted: int
    accepted: int
    acceptance_rate: float
    mean_acceptance_length: float
    per_position_acceptance: list
    verify_tokens: float  # mean tokens a verify pass read: the pending token and the draft, or every tree node
    seconds: float  # end to end: prefill + every round
    draft_seconds: float
    verify_seconds: float
    bookkeeping_seconds: float
    tokens_per_second: float


@dataclass
class Trace:
    prompt: str
    prompt_ids: list
    config: dict
    rounds: list = field(default_factory=list)
    text: str = ""
    stop_reason: str = ""  # "max_new_tokens", "eos", "stopped" or "" while running
    prefill_seconds: float = 0.0  # target (and drafter) prompt prefill, before the first round

    @property
    def token_ids(self) -> list:
        return [t for r in self.rounds for t in r.emitted_ids]

    @property
    def metrics(self) -> Metrics:
        return metrics_of(self.rounds, self.prefill_seconds)

    def to_json(self, **kw) -> str:
        d = asdict(self)
        return json.dumps(d, **kw)

    @classmethod
    def from_json(cls, s: str) -> "Trace":
        d = json.loads(s)
        names = {f.name for f in fields(Round)}
        d["rounds"] = [Round(**{k: v for k, v in r.items() if k in names}) for r in d["rounds"]]
        return cls(**d)

    def show(self):
        """Render this trace in a notebook as static HTML (no kernel needed to view it later)."""
        from IPython.display import HTML, display

        display(HTML(self._repr_html_()))

    def _repr_html_(self) -> str:
        return trace_html(self)

    def __repr__(self) -> str:
        m = self.metrics
        return (
            f"Trace({m.new_tokens} tokens in {m.rounds} rounds, drafter={self.config.get('drafter')!r}, "
            f"acceptance_rate={m.acceptance_rate:.2f}, mean_acceptance_length={m.mean_acceptance_length:.2f}, "
            f"stop_reason={self.stop_reason!r})"
        )


def metrics_of(rounds, prefill_seconds: float = 0.0) -> Metrics:
    """The metrics of any rounds (one trace's, or several pooled, as the bench does), each formula written once."""
    drafted = sum(r.num_drafted for r in rounds)
    accepted = sum(r.num_accepted for r in rounds)
    new = sum(len(r.emitted_ids) for r in rounds)
    secs = [sum(getattr(r, f) for r in rounds) for f in ("draft_seconds", "verify_seconds", "bookkeeping_seconds")]
    total = prefill_seconds + sum(secs)
    return Metrics(
        rounds=len(rounds),
        new_tokens=new,
        drafted=drafted,
        accepted=accepted,
        acceptance_rate=accepted / drafted if drafted else 0.0,
        mean_acceptance_length=mean_acceptance_length(rounds),
        per_position_acceptance=per_position_acceptance(rounds)[0],
        verify_tokens=sum(r.verify_tokens for r in rounds) / len(rounds) if rounds else 0.0,
        seconds=total,
        draft_seconds=secs[0],
        verify_seconds=secs[1],
        bookkeeping_seconds=secs[2],
        tokens_per_second=new / total if total else 0.0,
    )


def mean_acceptance_length(rounds) -> float:
    """Tokens a round adds, on average (accepted drafts plus the target's own token), over any rounds."""
    return sum(len(r.emitted_ids) for r in rounds) / len(rounds) if rounds else 0.0


def reached_positions(rnd) -> range:
    """The draft positions a round reached: every drafted position up to the first rejection, that one included
    (the denominator of the conditional acceptance: accepted at i / rounds that reached i)."""
    return range(min(rnd.num_drafted, rnd.num_accepted + 1))


def conditional_acceptance(rounds) -> list:
    """``GLOSSARY["conditional acceptance"]`` per draft position: accepted at i / rounds that reached i."""
    accepted, reached = [], []
    for rnd in rounds:
        for i in reached_positions(rnd):
            if i == len(reached):
                accepted.append(0)
                reached.append(0)
            reached[i] += 1
            accepted[i] += i < rnd.num_accepted
    return [a / r for a, r in zip(accepted, reached)]


def per_position_acceptance(rounds) -> tuple:
    """``(rates, accepted, drafted)`` per draft position, as vLLM counts them (``GLOSSARY["per-position
    acceptance"]``): position i accepted / rounds that drafted position i (over any rounds, e.g. of several
    traces)."""
    longest = max((r.num_drafted for r in rounds), default=0)
    drafted = [sum(r.num_drafted > i for r in rounds) for i in range(longest)]
    accepted = [sum(r.num_drafted > i and r.num_accepted > i for r in rounds) for i in range(longest)]
    return [a / d for a, d in zip(accepted, drafted)], accepted, drafted


def speedup_of(tokens: int, seconds: float, plain_tokens: int, plain_seconds: float) -> float:
    """The speedup formula, the one place it is written: plain seconds per token / speculative seconds per token."""
    if not (tokens and seconds and plain_tokens and plain_seconds):
        raise ValueError("a speedup needs two runs that produced tokens and recorded their time")
    return (plain_seconds / plain_tokens) / (seconds / tokens)


def speedup(spec: Trace, plain: Trace) -> float:
    """Measured speedup of a speculative trace over a plain trace of the same prompt (same target, same run)."""
    s, b = spec.metrics, plain.metrics
    return speedup_of(s.new_tokens, s.seconds, b.new_tokens, b.seconds)

"""The decoding loop: draft -> verify in one target pass -> accept/reject -> roll caches back -> emit a Round.

Without a drafter the same loop is plain autoregressive decoding (every round drafts nothing and the target
emits one token), so speculative and plain runs share every line of sampling and caching code.

Cache convention: the target's KV cache always holds every token except the newest one (the "pending" token).
A round feeds ``[pending] + draft`` (k+1 tokens) through the target once; logits row i scores the token after
input i, so rows 0..k-1 verify the draft and row k gives the bonus token when everything was accepted. (A tree
draft feeds [pending] + every node of the tree, then keeps the rows of one branch: see ``mtplab.tree``.)
"""
from __future__ import annotations

import time

import torch

from . import costs, kernels, theory
from .drafters.base import Drafter
from .models import Target, crop_cache, forward, new_cache
from .sampling import SamplingConfig, check_sampling, probs, top, verify
from .trace import Round, Trace, reached_positions
from .tree import best_branch, build_tree, keep_cache_rows

MAX_DRAFT_TOKENS = 64
SCHEDULES = ("auto", "constant", "heuristic")
TOP_CANDIDATES = 5
CALIBRATION_PROMPT = "Write a short story about a robot who learns to paint."  # draft_cost's decode


class TargetPasses:
    """The target's side of the loop: its KV cache and its forward passes. ``mtplab.bench.greedy_acceptance``
    swaps in a replay of a text the target is known to produce, so that it runs this same loop without the model."""

    def __init__(self, model):
        self.model, self.cache = model, new_cache(model)

    def prefill(self, ids: list, hidden):
        """Run the prompt (all but its newest token) into the cache; its hidden states if asked (``hidden``: ``True``
        for the last ones, or layer ids, as :attr:`mtplab.drafters.Drafter.hidden_request`)."""
        return forward(self.model, ids, self.cache, hidden=hidden, logits=False)[1]

    def verify(self, inputs: list, hidden, tree=None) -> tuple:
        """``(logits, hidden or None)``, one row per input (the pending token, then the draft or the tree's nodes)."""
        return forward(self.model, inputs, self.cache, hidden=hidden, tree=tree)

    def keep_rows(self, start: int, rows: list) -> None:
        """Keep only the cache rows of the verified tree branch (``rows`` relative to ``start``)."""
        keep_cache_rows(self.cache, start, rows)

    def crop(self, length: int) -> None:
        """Roll the cache back to ``length`` tokens (the accepted prefix)."""
        crop_cache(self.cache, length)

    def __len__(self) -> int:
        return self.cache.get_seq_length()


class AutoDraftLength:
    """``schedule="auto"``: before each round, the γ in 0..num_draft_tokens with the most expected tokens per second
    (:func:`mtplab.theory.best_draft_length`), from this machine's measured verify curve v, the drafter's measured
    cost c and the run's live conditional acceptance per position (accepted at i / rounds that reached i).

    Before the run has evidence the rates come from a prior of ``PRIOR_RATE`` worth ``PRIOR_ROUNDS`` rounds. γ = 0
    is a plain step; after ``PROBE_AFTER`` of those in a row it drafts once more — if drafting would pay were the
    next ``PRIOR_ROUNDS`` rounds all accepted (an optimistic bound) — and waits twice as long after each probe."""

    PRIOR_RATE, PRIOR_ROUNDS, PROBE_AFTER = 0.6, 2.0, 8

    def __init__(self, verify_cost: dict, draft_cost: float):
        self.verify_cost, self.draft_cost = verify_cost, draft_cost
        self.accepted, self.reached = [], []
        self.extra_nodes, self.plain_streak, self.probe_wait = 0.0, 0, self.PROBE_AFTER

    def rates(self, n: int, optimistic: bool = False) -> list:
        grow = max(0, n - len(self.reached))
        self.accepted, self.reached = self.accepted + [0] * grow, self.reached + [0] * grow
        prior, w = (1.0 if optimistic else self.PRIOR_RATE), self.PRIOR_ROUNDS
        return [(a + w * prior) / (r + w) for a, r in zip(self.accepted[:n], self.reached[:n])]

    def choose(self, max_gamma: int) -> tuple:
        """``(γ, expected walltime factor)`` for the next round."""
        gamma, factor = theory.best_draft_length(self.rates(max_gamma), self.draft_cost, self.verify_cost,
                                                 self.extra_nodes)
        if gamma:
            self.plain_streak, self.probe_wait = 0, self.PROBE_AFTER
            return gamma, factor
        self.plain_streak += 1
        if self.plain_streak > self.probe_wait:
            self.plain_streak, self.probe_wait = 0, 2 * self.probe_wait
            hope, _ = theory.best_draft_length(self.rates(max_gamma, optimistic=True), self.draft_cost,
                                               self.verify_cost, self.extra_nodes)
            if hope:  # a probe: the best draft, although it is not expected to pay
                gamma, factor = theory.best_draft_length(self.rates(max_gamma), self.draft_cost, self.verify_cost,
                                                         self.extra_nodes, allow_plain=False)
        return gamma, factor

    def observe(self, rnd: Round) -> None:
        self.rates(rnd.num_drafted)
        for i in reached_positions(rnd):
            self.reached[i] += 1
            self.accepted[i] += i < rnd.num_accepted
        if rnd.tree_nodes:  # a tree pass reads more rows than the main draft: a running mean of how many more
            self.extra_nodes += 0.2 * (rnd.tree_nodes - rnd.num_drafted - self.extra_nodes)


def draft_cost(drafter, target: Target, refresh: bool = False) -> float:
    """c: the drafter's seconds per drafted token / the seconds of a one-token target step, measured in a short real
    decode (γ = 4, greedy) and cached per drafter and target on this machine. Each round's step time comes from its
    own verify pass (verify seconds / v of its size), so a slow moment of the machine hits both sides alike. (A
    drafter with a cache of its own fills it when first asked to draft: that catch-up is part of its cost.)"""
    if drafter is None:
        return 0.0
    key = f"{kernels.model_key(target.model)}|{type(drafter).__name__}|{drafter.name}|{_fingerprint(drafter)}"
    data = kernels.load_measurements()
    cached = data.setdefault("drafters", {}).get(key)
    if cached is not None and not refresh:
        return cached["c"]
    v = costs.verify_curve(target)
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=4, schedule="constant", record=False)
    prompt = CALIBRATION_PROMPT if target.tokenizer is not None else [(5 + 7 * i) % target.vocab_size for i in range(24)]
    dec.generate(prompt, max_new_tokens=16, seed=0)  # warm the drafter up (caches, lazy buffers)
    c = costs.draft_cost_from_rounds(dec.generate(prompt, max_new_tokens=32, seed=0).rounds, v)
    data = kernels.load_measurements()
    data.setdefault("drafters", {})[key] = {"drafter": drafter.name, "target": target.name, "c": c}
    kernels.save_measurements(data)
    return c


def _fingerprint(drafter) -> str:
    """Parameter count of whatever network the drafter runs (two MTP heads under one name stay apart)."""
    total = 0
    for attr in ("head", "model", "assistant", "mtp"):
        net = getattr(drafter, attr, None)
        if isinstance(net, torch.nn.Module):
            total += sum(p.numel() for p in net.parameters())
    return str(total)


class SpeculativeDecoder:
    """Speculative decoding of ``target`` with ``drafter`` (``None``: the plain baseline).

    Settings (``num_draft_tokens``, ``schedule``, ``temperature``, ``top_k``, ``top_p``) are plain attributes,
    checked on assignment and read at the start of every round, so a live view can change them mid-stream.
    ``schedule``: ``"auto"`` (default) chooses γ in 0..num_draft_tokens before every round from measured costs and
    the live acceptance (:class:`AutoDraftLength`); ``"constant"`` drafts num_draft_tokens every round;
    ``"heuristic"`` grows γ by 2 after a full accept and shrinks it by 1 otherwise, as transformers does.
    """

    def __init__(self, target: Target, drafter: Drafter | None = None, num_draft_tokens: int = 4,
                 schedule: str = "auto", temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 record: bool = True):
        if not isinstance(target, Target):
            raise TypeError(f"target must be an mtplab Target (see mtplab.load_target), got {type(target).__name__}")
        if drafter is not None and not isinstance(drafter, Drafter):
            raise TypeError(f"drafter must be an mtplab Drafter or None, got {type(drafter).__name__}")
        self.target = target
        self.drafter = drafter
        if drafter is not None:
            drafter.bind(target)
        self.num_draft_tokens = num_draft_tokens
        self.schedule = schedule
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.record = record
        self._stop = False

    # --- settings, validated on assignment --------------------------------------------------------------------
    def __setattr__(self, name, value):
        if name == "num_draft_tokens":
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], got {value!r}")
            if not 1 <= value <= MAX_DRAFT_TOKENS:
                raise ValueError(f"num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {value!r}")
        elif name == "schedule" and value not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {value!r}")
        elif name in ("temperature", "top_k", "top_p"):
            t, k, p = (value if name == n else getattr(self, n, d)
                       for n, d in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0)))
            check_sampling(t, k, p)
        super().__setattr__(name, value)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.temperature, self.top_k, self.top_p)

    @property
    def drafter_name(self) -> str:
        return "none" if self.drafter is None else self.drafter.name

    def stop(self) -> None:
        """Ask a running ``stream`` to end after the current round (safe from another thread)."""
        self._stop = True

    # --- the loop -------------------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int = 64, seed: int = 0, chat_template: bool | None = None,
                 passes: TargetPasses | None = None) -> Trace:
        """Decode ``prompt`` and return the complete :class:`Trace`."""
        for _ in self.stream(prompt, max_new_tokens, seed, chat_template, passes):
            pass
        return self.trace

    def stream(self, prompt, max_new_tokens: int = 64, seed: int = 0, chat_template: bool | None = None,
               passes: TargetPasses | None = None):
        """Check the arguments now, then return an iterator that yields a :class:`Round` as soon as each one is
        decided; ``self.trace`` holds the run so far. ``passes``: the target's passes (default: the real model
        with a fresh KV cache)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        target = self.target
        ids = target.encode(prompt, chat_template)
        if len(ids) + max_new_tokens > target.max_context:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                f"{target.name}: at most {target.max_context} tokens"
            )
        self._stop = False
        self._auto = None
        if self.schedule == "auto" and self.drafter is not None:  # measured once per machine (cached), then read
            self._auto = AutoDraftLength(costs.verify_curve(target), draft_cost(self.drafter, target))
        self.trace = Trace(
            prompt=prompt if isinstance(prompt, str) else target.decode(prompt), prompt_ids=list(ids),
            config=dict(target=target.name, drafter=self.drafter_name, num_draft_tokens=self.num_draft_tokens,
                        schedule=self.schedule, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                        seed=seed, max_new_tokens=max_new_tokens),
        )
        if self._auto is not None:
            v = self._auto.verify_cost  # as a list (JSON keeps no int keys): verify_cost[γ] = v(γ)
            self.trace.config.update(verify_cost=[v[g] for g in sorted(v)], draft_cost=self._auto.draft_cost)
        return self._rounds(ids, max_new_tokens, torch.Generator().manual_seed(seed), passes)

    def _rounds(self, ids, max_new_tokens, gen, passes):
        target, drafter, trace = self.target, self.drafter, self.trace
        hidden_needed = drafter is not None and drafter.hidden_request
        t0 = time.perf_counter()
        hidden = None
        with torch.inference_mode():  # entered per step, never across a yield: a stream may resume in another thread
            passes = TargetPasses(target.model) if passes is None else passes
            if len(ids) > 1:
                hidden = passes.prefill(ids[:-1], hidden_needed)
            if drafter is not None:
                drafter.reset(ids, None if hidden is None else hidden[-1])
                drafter.observe(hidden, passes.cache)
            hidden = None if hidden is None else hidden[-1]
        trace.prefill_seconds = time.perf_counter() - t0
        self._k = self._k_base = self.num_draft_tokens
        new = 0
        while new < max_new_tokens and not self._stop:
            with torch.inference_mode():
                rnd, hidden = self._round(ids, passes, gen, max_new_tokens - new, hidden, len(trace.rounds))
            trace.rounds.append(rnd)
            emitted = rnd.emitted_ids
            if not emitted:  # every round adds at least the target's own token or an accepted EOS: never loop
                raise RuntimeError(f"round {rnd.index} emitted no token (drafted {rnd.draft_ids}, accepted "
                                   f"{rnd.num_accepted}): a bug in the decoding loop, stopping instead of looping")
            ids.extend(emitted)
            new += len(emitted)
            yield rnd
            if any(t in target.eos_token_ids for t in emitted):
                trace.stop_reason = "eos"
                break
        else:
            trace.stop_reason = "stopped" if self._stop and new < max_new_tokens else "max_new_tokens"
        trace.text = target.decode(trace.token_ids)

    def _round(self, ids, passes, gen, budget, hidden, index):
        target, drafter, cfg = self.target, self.drafter, self.sampling
        context_len = len(ids)

        # 1. draft (never more than the budget allows: the target always adds one token of its own)
        t0 = time.perf_counter()
        k, expected = self._draft_length()
        k = min(k, budget - 1)
        draft = drafter.propose(ids, k, cfg, gen, hidden) if drafter is not None and k > 0 else None
        tokens = [] if draft is None else list(draft.tokens[:k])
        q = None if draft is None or draft.q is None else draft.q[: len(tokens)]
        t1 = time.perf_counter()

        # 2. verify: one target pass over [pending] + draft. With greedy decoding a drafter may offer other branches:
        #    then the pass reads them all as one token tree (mtplab.tree), and the branch the target's choices follow
        #    furthest is kept (its rows of the pass and of the cache) and verified below as if it were the only draft
        branches = [b[:k] for b in draft.branches if b] if draft is not None and draft.branches and cfg.greedy else []
        tree = build_tree([tokens] + branches) if tokens and branches else None
        logits, h = passes.verify([ids[-1]] + (tree.tokens if tree else tokens),
                                  drafter is not None and drafter.hidden_request, tree)
        cache_before, branch = len(passes), 0
        if tree is not None:
            branch, _ = best_branch(tree, logits.argmax(-1).tolist())
            rows = [0] + [node + 1 for node in tree.branches[branch]]
            passes.keep_rows(context_len - 1, rows)
            logits, h = logits[rows], None if h is None else h[rows]
            tokens, q = [tree.tokens[node] for node in tree.branches[branch]], q if branch == 0 else None
        p = probs(logits, cfg)
        t2 = time.perf_counter()

        # 3. accept / reject, cut at EOS, roll caches back to the accepted prefix
        v = verify(tokens, p, q, logits, cfg, gen)
        n = v.num_accepted
        eos_at = next((i for i, t in enumerate(tokens[:n]) if t in target.eos_token_ids), None)
        if eos_at is not None:  # an accepted EOS ends the run there
            n = eos_at + 1
        passes.crop(context_len + n)
        if drafter is not None:
            drafter.rollback(context_len + n)
            drafter.observe(None if h is None else h[: n + 1], passes.cache)
        rnd = Round(
            index=index, context_len=context_len, drafter=self.drafter_name, num_draft_tokens=k,
            draft_ids=tokens, num_accepted=n, token_id=None if eos_at is not None else v.token,
            token_kind=v.kind, accept_probs=v.accept_probs, draws=v.draws,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            target_cache_before=cache_before, target_cache_len=len(passes),
            drafter_cache_len=0 if drafter is None else drafter.cache_len,
            draft_start_position=None if draft is None else draft.start_position,
            tree_branches=[] if tree is None else [list(draft.tokens[:k])] + branches,
            tree_branch=branch, tree_nodes=0 if tree is None else len(tree.tokens), expected_speedup=expected,
        )
        self._learn(rnd)
        if self.record:
            self._record(rnd, p, q, v)
        t3 = time.perf_counter()
        rnd.draft_seconds, rnd.verify_seconds, rnd.bookkeeping_seconds = t1 - t0, t2 - t1, t3 - t2
        next_hidden = None if h is None else h[n]
        return rnd, next_hidden

    # --- the draft-length policy: chosen before a round, taught by its outcome -----------------------------------
    def _draft_length(self) -> tuple:
        """``(γ, expected walltime factor or None)`` for the next round under the current schedule."""
        if self.drafter is None:
            return 0, None
        if self.schedule == "auto":
            if self._auto is None:  # switched to auto mid-run: the curve is cached; c estimated from the run so far
                v = costs.verify_curve(self.target)
                self._auto = AutoDraftLength(v, costs.draft_cost_from_rounds(self.trace.rounds, v))
            return self._auto.choose(self.num_draft_tokens)
        if self.schedule == "constant" or self.num_draft_tokens != self._k_base:  # a new setting restarts it
            self._k = self._k_base = self.num_draft_tokens
        return self._k, None

    def _learn(self, rnd: Round) -> None:
        if self._auto is not None:
            self._auto.observe(rnd)
        if self.schedule == "heuristic" and rnd.num_drafted:  # as transformers: +2 after a full accept, -1 otherwise
            self._k = min(MAX_DRAFT_TOKENS, self._k + 2) if rnd.num_accepted == rnd.num_drafted else max(1, self._k - 1)

    def _record(self, rnd: Round, p, q, v) -> None:
        """Fill the parts of a Round that only views need (texts, candidate lists); skipped with record=False. The
        top candidates of all the rows of p (and of q) come from one call each, and each is looked up once."""
        text = self.target.token_text
        tokens = rnd.draft_ids
        k = len(tokens)
        rnd.draft_text = [text(t) for t in tokens]
        rnd.p_top = _tops(p[: k + 1], text)
        rnd.q_top = [] if q is None else _tops(q[:k], text)
        rows, drafted = torch.arange(k, device=p.device), torch.tensor(tokens, dtype=torch.long, device=p.device)
        rnd.p = p[rows, drafted].tolist()
        rnd.q = [1.0] * k if q is None else q[rows, drafted].tolist()
        rnd.candidates = [_pair_top(p[i], None if q is None else q[i], t, rnd.p_top[i],
                                    None if q is None else rnd.q_top[i], text) for i, t in enumerate(tokens)]
        if rnd.token_id is not None:
            rnd.token_text = text(rnd.token_id)
        if v.residual is not None:
            rnd.residual_top = _tops(v.residual, text)


def _pair_top(p_row, q_row, drafted: int, p_top: list, q_top: list | None, text) -> list:
    """``[[id, text, p, q]]`` for the drafted token and the top candidates of p and q (``p_top``, ``q_top``: those
    rows' :func:`_tops`), most likely under p first."""
    ids = list(dict.fromkeys([drafted] + [c[0] for c in p_top] + [c[0] for c in q_top or []]))
    index = torch.tensor(ids, dtype=torch.long, device=p_row.device)
    ps = p_row[index].tolist()
    qs = [float(i == drafted) for i in ids] if q_row is None else q_row[index].tolist()
    return sorted(([i, text(i), pv, qv] for i, pv, qv in zip(ids, ps, qs)), key=lambda r: -r[2])


def _tops(rows: torch.Tensor, text) -> list:
    """``[[id, text, prob]]`` of the top candidates of one row, or a list of those for each of a few rows."""
    vals, idx = top(rows, TOP_CANDIDATES)
    if rows.dim() == 1:
        return [[i, text(i), x] for x, i in zip(vals.tolist(), idx.tolist())]
    return [[[i, text(i), x] for x, i in zip(vr, ir)] for vr, ir in zip(vals.tolist(), idx.tolist())]

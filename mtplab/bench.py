"""Benchmarks: acceptance and measured speedup of each drafter against plain decoding, measured interleaved.

Every speculative run is paired with a plain run of the same prompt and seed right next to it (which of the two
goes first alternates from prompt to prompt), so slow drifts of the machine's speed hit both sides alike. Per
configuration, over all prompts:

* mean acceptance length, acceptance rate, per-position acceptance: :func:`mtplab.trace.metrics_of` over every
  prompt's rounds pooled;
* tokens/s = new tokens / seconds (``trace.metrics.seconds``: prefill + every round);
* speedup = plain seconds per token / speculative seconds per token (:func:`mtplab.trace.speedup_of`);
* c = draft seconds per drafted token / plain seconds per decoding step (:func:`mtplab.costs.draft_cost_ratio`).

transformers' own ``generate`` (prompt lookup, assisted generation) is measured the same way against its own plain
``generate``, plus one row comparing mtplab's plain loop with transformers' plain ``generate``.
"""
from __future__ import annotations

import json
import time
from importlib import resources

import torch

from . import costs, fastpath, kernels
from .models import kernel_pass
from .drafters.registry import NAMES
from .trace import metrics_of, speedup_of

DRAFTERS = tuple(n for n in NAMES if n != "none")


def load_prompts(kind: str = "bench") -> list:
    """Shipped prompts, a list of ``{"id": slug, "prompt": text}``: ``"bench"``, the held-out benchmark prompts
    (never used to train or tune a drafter), or ``"dev"``, 30 prompts of the same ten kinds on other topics, for
    tuning."""
    if kind not in ("bench", "dev"):
        raise ValueError(f"kind must be 'bench' or 'dev', got {kind!r}")
    name = "prompts.json" if kind == "bench" else "dev_prompts.json"
    text = resources.files("mtplab").joinpath("data", name).read_text(encoding="utf-8")
    return json.loads(text)


def _prompt_texts(prompts) -> list:
    shipped = load_prompts()
    if prompts is None:
        return [p["prompt"] for p in shipped]
    if isinstance(prompts, int) and not isinstance(prompts, bool):
        if not 1 <= prompts <= len(shipped):
            raise ValueError(f"prompts must be a number in [1, {len(shipped)}] or a list of prompts, got {prompts!r}")
        return [p["prompt"] for p in shipped[:prompts]]
    texts = [p["prompt"] if isinstance(p, dict) else p for p in prompts]
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError("prompts must be a non-empty list of non-empty strings (or {'prompt': ...} dicts)")
    return texts


def _interleaved(prompts, spec_run, plain_run, bar):
    """``[(spec_result, plain_result)]`` per prompt, the two runs back to back, alternating which goes first."""
    pairs = []
    for i, prompt in enumerate(prompts):
        if i % 2 == 0:
            s = spec_run(prompt)
            b = plain_run(prompt)
        else:
            b = plain_run(prompt)
            s = spec_run(prompt)
        pairs.append((s, b))
        bar.update(2)
    return pairs


def _hf_generate(model, ids, max_new_tokens, temperature, seed, **kw):
    """transformers ``generate`` on prompt ids ``[1, n]``: (new token ids, wall seconds)."""
    if temperature:
        kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)  # as mtplab: no top-k/top-p
    else:
        kw.update(do_sample=False)
    torch.manual_seed(seed)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, **kw)
        seconds = time.perf_counter() - t0
    return out[0, ids.shape[1]:].tolist(), seconds


def _row(engine, method, gamma, temperature, tokens, seconds, plain_tokens, plain_seconds, **extra) -> dict:
    return dict(engine=engine, method=method, gamma=gamma, temperature=temperature, new_tokens=tokens,
                tokens_per_second=tokens / seconds, plain_tokens_per_second=plain_tokens / plain_seconds,
                speedup=speedup_of(tokens, seconds, plain_tokens, plain_seconds), **extra)


def _mtplab_row(target, drafter, gamma, schedule, temperature, prompts, max_new_tokens, seed, record, bar) -> dict:
    from .decoder import SpeculativeDecoder

    spec = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule=schedule, temperature=temperature,
                              record=record)
    plain = SpeculativeDecoder(target, None, temperature=temperature, record=record)
    pairs = _interleaved(prompts, lambda p: spec.generate(p, max_new_tokens, seed),
                         lambda p: plain.generate(p, max_new_tokens, seed), bar)
    rounds = [r for t, _ in pairs for r in t.rounds]
    s = metrics_of(rounds, sum(t.prefill_seconds for t, _ in pairs))  # every prompt pooled
    plain_rounds = [r for _, t in pairs for r in t.rounds]
    b = metrics_of(plain_rounds, sum(t.prefill_seconds for _, t in pairs))
    return _row(
        "mtplab", drafter.name, gamma, temperature, s.new_tokens, s.seconds, b.new_tokens, b.seconds,
        mean_acceptance_length=s.mean_acceptance_length, acceptance_rate=s.acceptance_rate,
        draft_cost_ratio=costs.draft_cost_ratio(rounds, costs.step_seconds(plain_rounds)) if s.drafted else None,
        exact=all(a.token_ids == p.token_ids for a, p in pairs) if temperature == 0 else None,
        per_position_acceptance=s.per_position_acceptance,
        verify_tokens=s.verify_tokens, schedule=schedule, mean_gamma=sum(r.num_draft_tokens for r in rounds) / len(rounds),
    )


def _sum(metrics, field):
    return sum(getattr(m, field) for m in metrics)


def _hf_row(target, method, gamma, temperature, prompts, max_new_tokens, seed, bar, **kw) -> dict:
    model = target.model
    ids = {p: torch.tensor([target.encode(p)], device=target.device) for p in prompts}
    pairs = _interleaved(prompts, lambda p: _hf_generate(model, ids[p], max_new_tokens, temperature, seed, **kw),
                         lambda p: _hf_generate(model, ids[p], max_new_tokens, temperature, seed), bar)
    return _row("transformers", method, gamma, temperature,
                sum(len(s[0]) for s, _ in pairs), sum(s[1] for s, _ in pairs),
                sum(len(b[0]) for _, b in pairs), sum(b[1] for _, b in pairs),
                exact=all(s[0] == b[0] for s, b in pairs) if temperature == 0 else None)


def _baseline_row(target, prompts, max_new_tokens, seed, record, bar) -> dict:
    """mtplab's plain loop vs transformers' plain greedy generate, both timed around the whole call."""
    from .decoder import SpeculativeDecoder

    plain = SpeculativeDecoder(target, None, record=record)
    ids = {p: target.encode(p) for p in prompts}

    def ours(p):
        t0 = time.perf_counter()
        trace = plain.generate(list(ids[p]), max_new_tokens, seed)
        return trace.token_ids, time.perf_counter() - t0

    def theirs(p):
        return _hf_generate(target.model, torch.tensor([ids[p]], device=target.device), max_new_tokens, 0.0, seed)

    pairs = _interleaved(prompts, ours, theirs, bar)
    return _row("mtplab", "plain vs transformers plain", None, 0.0,
                sum(len(m[0]) for m, _ in pairs), sum(m[1] for m, _ in pairs),
                sum(len(h[0]) for _, h in pairs), sum(h[1] for _, h in pairs),
                exact=all(m[0] == h[0] for m, h in pairs))


def _recording_row(target, prompts, max_new_tokens, seed, bar) -> dict:
    """Prompt lookup, γ=4, greedy with record=True vs record=False: the cost of filling the view fields."""
    from .decoder import SpeculativeDecoder
    from .drafters import PromptLookupDrafter

    on = SpeculativeDecoder(target, PromptLookupDrafter(), num_draft_tokens=4, schedule="constant", record=True)
    off = SpeculativeDecoder(target, PromptLookupDrafter(), num_draft_tokens=4, schedule="constant", record=False)
    pairs = _interleaved(prompts, lambda p: on.generate(p, max_new_tokens, seed).metrics,
                         lambda p: off.generate(p, max_new_tokens, seed).metrics, bar)
    on_m, off_m = [a for a, _ in pairs], [b for _, b in pairs]
    row = _row("mtplab", "prompt-lookup record=True vs False", 4, 0.0, _sum(on_m, "new_tokens"), _sum(on_m, "seconds"),
               _sum(off_m, "new_tokens"), _sum(off_m, "seconds"))
    row["recording_overhead_pct"] = 100 * (1 / row.pop("speedup") - 1)
    row["note"] = f"record=True costs {row['recording_overhead_pct']:+.1f}% time (plain tok/s: record=False)"
    return row


class Replay:
    """The target's passes over a text it is known to produce greedily (see :class:`mtplab.decoder.TargetPasses`):
    a pass returns one-hot logits on the text's next token and the hidden states of one full forward over the
    text. Greedy verification only reads the argmax, and the drafter only reads hidden states of accepted tokens,
    which are the text's, so the decoder's own round runs unchanged without the model."""

    cache = None  # no KV cache: drafters that read the target's cache need the real decoder

    def __init__(self, text: list, hidden, vocab_size: int):
        self.text, self.hidden, self.vocab_size, self.length = text, hidden, vocab_size, 0

    def prefill(self, ids, hidden):
        self.length = len(ids)
        return None if not hidden else self.hidden[: len(ids)]

    def verify(self, inputs, hidden, tree=None):
        start, end = self.length, len(self.text) - 1  # the pending token sits at position `start`
        at = [min(start + d, end) for d in ([0] + tree.depths if tree else range(len(inputs)))]
        logits = torch.zeros(len(inputs), self.vocab_size)
        # the token after position i is text[i + 1]; past the text (after an accepted EOS) nothing is read
        logits[torch.arange(len(inputs)), torch.tensor([self.text[min(i + 1, end)] for i in at])] = 1.0
        self.length += len(inputs)
        return logits, (self.hidden[at] if hidden else None)

    def keep_rows(self, start, rows):
        self.length = start + len(rows)

    def crop(self, length):
        self.length = length

    def __len__(self):
        return self.length


def greedy_acceptance(target, drafter, prompts=None, gammas=(4,), max_new_tokens: int = 64) -> dict:
    """Greedy acceptance of ``drafter`` per γ, found without running the target in the speculative decoder.

    Greedy speculative output is the target's own greedy text, whatever the drafter proposes. So one plain greedy
    run and one forward pass per prompt (for the target's hidden states) fix every round's context, and the
    decoder's own rounds run against a :class:`Replay` of that text: only the drafter computes, seconds instead of
    minutes, which makes it the tool for tuning a drafter on development prompts (e.g. ``load_prompts("dev")``).
    Equal to the real decoder's numbers up to floating-point ties (a full forward and the decoder's incremental
    passes may differ in the last bits). Drafters that read the target's KV cache (``needs_target_cache``) need
    the real decoder.

    Returns ``{γ: {"mean_acceptance_length", "per_position_acceptance", "per_prompt", "verify_tokens"}}`` (pooled as
    in the bench; ``verify_tokens``: mean tokens per verify pass, pending token and every tree node included).
    """
    from .decoder import SpeculativeDecoder
    from .models import forward, new_cache

    if drafter.needs_target_cache:
        raise ValueError(f"{drafter!r} reads the target's KV cache; measure it with run_bench instead")
    if not gammas or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in gammas):
        raise ValueError(f"gammas must be a non-empty list of integers >= 1, got {gammas!r}")
    plain = SpeculativeDecoder(target, None, record=False)
    runs = []  # (prompt ids, the target's greedy text after them, hidden states over both)
    token_lists = isinstance(prompts, list) and prompts and all(isinstance(p, list) for p in prompts)
    for prompt in (prompts if token_lists else _prompt_texts(prompts)):  # texts, or token-id lists
        trace = plain.generate(prompt, max_new_tokens)
        text = list(trace.prompt_ids) + list(trace.token_ids)
        hidden = None
        if drafter.uses_target_hidden:
            with torch.inference_mode():
                hidden = forward(target.model, text, new_cache(target.model), hidden=drafter.hidden_request,
                                 logits=False)[1]
        runs.append((list(trace.prompt_ids), text, hidden))
    out = {}
    for gamma in gammas:
        spec = SpeculativeDecoder(target, drafter, num_draft_tokens=gamma, schedule="constant", record=False)
        traces = []
        for ids, text, hidden in runs:
            trace = spec.generate(ids, max_new_tokens, passes=Replay(text, hidden, target.vocab_size))
            if trace.prompt_ids + trace.token_ids != text:
                raise RuntimeError(f"the replayed run left the target's greedy text at γ={gamma}: a decoder bug")
            traces.append(trace)
        m = metrics_of([r for t in traces for r in t.rounds])
        out[gamma] = dict(mean_acceptance_length=m.mean_acceptance_length,
                          per_position_acceptance=m.per_position_acceptance,
                          per_prompt=[t.metrics.mean_acceptance_length for t in traces],
                          verify_tokens=m.verify_tokens)
    return out


def run_bench(target=None, prompts=None, max_new_tokens: int = 64, gammas=(1, 2, 4, 8), temperatures=(0.0, 0.7),
              drafters=DRAFTERS, layers: int | None = None, schedule: str = "auto", seed: int = 0, hf: bool = True,
              record: bool = True, measure_recording: bool = False, progress: bool = True) -> list:
    """Measure every (drafter, γ, temperature) on the prompts; return one dict per table row.

    ``target``: a :class:`~mtplab.models.Target` or a name for :func:`~mtplab.models.load_target` (default:
    the bundled model). ``prompts``: ``None`` (all shipped), a number (the first N shipped) or a list of texts.
    ``schedule``: the draft-length policy of mtplab's rows (``"auto"``: γ is the most it may draft).
    """
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from .decoder import SpeculativeDecoder
    from .drafters import registry
    from .models import Target, load_target

    unknown = [d for d in drafters if d not in DRAFTERS and not registry.is_folder(d)]
    if unknown:
        raise ValueError(f"drafters must be chosen from {DRAFTERS} or be folders of trained drafters, got {unknown}")
    if not gammas or not temperatures:
        raise ValueError("gammas and temperatures must be non-empty")
    texts = _prompt_texts(prompts)
    target = target if isinstance(target, Target) else load_target(target)
    ours = [registry.make(name, target, layers) for name in drafters]  # one each, reused by every configuration
    small = next((d.model for d in ours if d.name.startswith("draft-model")), None)
    hf_paths = []  # (method name, generate kwargs for γ)
    if hf and "prompt-lookup" in drafters:
        # max_matching_ngram_size=3: the same longest n-gram as mtplab's PromptLookupDrafter
        hf_paths.append(("prompt-lookup", lambda g: dict(prompt_lookup_num_tokens=g, max_matching_ngram_size=3)))
    if hf and small is not None:
        hf_paths.append((f"assistant({len(small.get_decoder().layers)} layers)", lambda g: dict(
            assistant_model=_assistant(small, g), num_assistant_tokens=g, num_assistant_tokens_schedule="constant")))

    n, configs = len(texts), len(gammas) * len(temperatures)
    total = 2 * n * (configs * (len(ours) + len(hf_paths)) + bool(hf) + bool(measure_recording))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers warns about generation flags on every call
    try:
        # warm-up: one short generate per path, so no measured run pays for first-call costs
        for d in [None, *ours]:
            SpeculativeDecoder(target, d, num_draft_tokens=2, schedule=schedule).generate(texts[0], 4, seed)
        if hf:
            first = torch.tensor([target.encode(texts[0])], device=target.device)
            for kw in [{}, *(make(2) for _, make in hf_paths)]:
                _hf_generate(target.model, first, 4, 0.0, seed, **kw)

        rows = []
        with tqdm(total=total, desc="bench", unit="run", disable=not progress) as bar:
            if hf:
                rows.append(_baseline_row(target, texts, max_new_tokens, seed, record, bar))
            for temperature in temperatures:
                for gamma in gammas:
                    for d in ours:
                        bar.set_postfix_str(f"{d.name} γ={gamma} T={temperature}")
                        rows.append(_mtplab_row(target, d, gamma, schedule, temperature, texts, max_new_tokens, seed,
                                                record, bar))
                    for method, make in hf_paths:
                        bar.set_postfix_str(f"transformers {method} γ={gamma} T={temperature}")
                        rows.append(_hf_row(target, method, gamma, temperature, texts, max_new_tokens, seed, bar,
                                            **make(gamma)))
            if measure_recording:
                rows.append(_recording_row(target, texts, max_new_tokens, seed, bar))
    finally:
        hf_logging.set_verbosity(verbosity)
    for r in rows:
        r.update(prompts=n, max_new_tokens=max_new_tokens, device=str(target.device))
    return rows


def _assistant(model, gamma):
    """transformers reads γ from the assistant's own generation_config (generate's kwargs do not reach it)."""
    cfg = model.generation_config
    cfg.num_assistant_tokens, cfg.num_assistant_tokens_schedule = gamma, "constant"
    cfg.assistant_confidence_threshold = 0.0  # no early stop of the draft: a constant γ, as mtplab
    return model


COLUMNS = [  # (header, key, format)
    ("engine", "engine", "{}"), ("method", "method", "{}"), ("γ", "gamma", "{}"), ("schedule", "schedule", "{}"),
    ("mean γ", "mean_gamma", "{:.1f}"), ("T", "temperature", "{:g}"),
    ("acc.len", "mean_acceptance_length", "{:.2f}"), ("acc.rate", "acceptance_rate", "{:.2f}"),
    ("tok/pass", "verify_tokens", "{:.1f}"),
    ("tok/s", "tokens_per_second", "{:.1f}"), ("plain tok/s", "plain_tokens_per_second", "{:.1f}"),
    ("speedup", "speedup", "{:.2f}x"), ("c", "draft_cost_ratio", "{:.2f}"), ("exact", "exact", "{}"),
    ("per-position acceptance", "per_position_acceptance", "{:.2f}"),
    ("note", "note", "{}"),
]


def _cell(row, key, fmt) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return " ".join(fmt.format(v) for v in value) or "-"
    return fmt.format(value)


def format_table(rows) -> str:
    """An aligned plain-text table of :func:`run_bench` rows, with a header line and a footer line."""
    if not rows:
        return "(no rows)"
    columns = [c for c in COLUMNS if c[1] != "note" or any(r.get("note") for r in rows)]
    cells = [[h for h, _, _ in columns]] + [[_cell(r, k, f) for _, k, f in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    left = {"engine", "method", "note", "per_position_acceptance"}
    fmt = lambda line: "  ".join(  # noqa: E731
        c.ljust(w) if k in left else c.rjust(w) for c, w, (_, k, _) in zip(line, widths, columns)).rstrip()
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)] + [fmt(line) for line in cells[1:]]
    from .kernels import cpu_model

    device = rows[0].get("device", "cpu")
    machine = f"{cpu_model()}, {torch.get_num_threads()} threads" + ("" if device.startswith("cpu") else f", {device}")
    lines.append(
        f"speedup = plain s/token / speculative s/token, measured interleaved in this run; "
        f"{rows[0].get('prompts', '?')} prompts, {rows[0].get('max_new_tokens', '?')} new tokens, "
        f"machine: {machine}, torch {torch.__version__}"
    )
    return "\n".join(lines)


def cost_report(target, drafters=("mtp", "prompt-lookup"), layers: int | None = None, reps: int = 5) -> str:
    """``mtplab bench --costs``: this machine's cost curve as text (every number measured now, interleaved)."""
    from . import theory
    from .decoder import draft_cost
    from .drafters import registry

    plan = kernels.plan_of(target.model)
    fusable = plan is not None and fastpath.fused_unsupported(target.model) is None
    if fusable:  # the C kernel's block widths, measured now like everything below
        kernels.tune_widths(target.model, kernel_pass(target.model), refresh=True)
    passes = costs.pass_seconds(target, refresh=True, reps=reps)
    step = passes["plain"][1]
    lines = [f"machine: {kernels.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
             f"target: {target.name}, {kernels.parameter_bytes(target.model) / 1e6:.0f} MB of weights",
             "kernel plan (rows: kernel):" if plan else f"kernel plan: none (MTPLAB_KERNELS={kernels.mode()}, or "
             "a model small enough to stay in the CPU cache)"]
    if plan:
        lines += ["  " + line for line in plan.describe().splitlines()]
    if fusable:
        lines.append(f"C kernel: {kernels.vector_lanes()} float lanes a vector; block widths (weight rows read together, "
                     f"by rows of x): {kernels.describe_widths()}")
    rows = list(passes["plain"])
    lean = fastpath.unsupported(target.model) is None
    if lean:  # transformers' forward as it ships, timed interleaved with mtplab's lean one (both with F.linear)
        both = kernels.measure_passes(target.model, kernel_pass(target.model), reps=reps, variants=("plain", "hf"),
                                      contexts={"hf": lambda: fastpath.transformers_forward(target.model)})
        passes = {**passes, "hf": {n: both["hf"][n] * step / both["plain"][1] for n in rows}}  # in this run's unit
    lines.append(f"target pass over n tokens, in one-token F.linear steps (median of {reps}, interleaved):")
    lines.append("  n            " + " ".join(f"{n:>5}" for n in rows))
    for name, label in (("hf", "transformers"), ("plain", "F.linear"), ("tuned", "plan"), ("fused", "fused C")):
        if name in passes:
            lines.append(f"  {label:<12} " + " ".join(f"{passes[name][n] / step:5.2f}" for n in rows))
    lines.append("  (transformers: its own forward; F.linear and plan: mtplab's lean forward, mtplab.fastpath; fused C: "
                 "its two C calls a layer)" if lean else
                 f"  (mtplab calls transformers' forward: {fastpath.unsupported(target.model)})")
    if plan:
        short = {"fused": "fused", "tuned": "plan", "plain": "F.lin"}
        lines.append("  used         " + " ".join(f"{short[plan.used(n)]:>5}" for n in rows))
    v = costs.verify_curve(target)
    used_step = passes[plan.used(1)][1] if plan and plan.used(1) in passes else step
    roof = costs.roofline_seconds(target)
    lines.append(f"plain decoding: {1 / used_step:.1f} tokens/s ({1e3 * used_step:.1f} ms a step); fp32 memory "
                 f"roofline {1e3 * roof:.1f} ms ({kernels.parameter_bytes(target.model) / 1e6:.0f} MB at "
                 f"{costs.memory_bandwidth() / 1e9:.1f} GB/s): a step takes {used_step / roof:.2f}x the roofline"
                 + (f" (transformers' own forward: {1e3 * passes['hf'][1]:.1f} ms, {passes['hf'][1] / roof:.2f}x)"
                    if "hf" in passes else ""))
    lines.append("draft cost c (seconds per drafted token / one-token step) and the γ auto drafts at acceptance α:")
    for name in drafters:
        if name == "none" or not (name in registry.names(target) or registry.is_folder(name)):
            continue
        c = draft_cost(registry.make(name, target, layers), target, refresh=True)
        picks = "  ".join(f"α={a}: γ={theory.best_draft_length([a] * 8, c, v)[0]}" for a in (0.3, 0.5, 0.7, 0.9))
        lines.append(f"  {name:<14} c = {c:.3f}   {picks}")
    return "\n".join(lines)

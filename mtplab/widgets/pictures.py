"""Static pictures for the notebooks, drawn as HTML from real runs: a token tree with its attention mask
(:func:`tree_html`, from a tree round) and the drafter family (:func:`family_html`, with c measured here)."""
from __future__ import annotations

import html

from ..palette import COLORS, tint
from ..tree import build_tree, tree_inputs


def tree_html(rnd, token_text=str) -> str:
    """A tree round (``rnd.tree_branches`` set): the token tree its verify pass read, the branch the target
    followed (accepted nodes in the accepted colour), and the tree attention mask of that pass — one row per input
    (the pending token, then every node), one column per input it may see (plus the whole context, always seen)."""
    if not rnd.tree_branches:
        raise ValueError(f"round {rnd.index} was verified as a chain, not a token tree: pick a round with tree_branches")
    esc = html.escape
    tree = build_tree(rnd.tree_branches)
    _, mask = tree_inputs(tree, 1)
    sees = mask[0, 0, :, 1:]  # drop the one context column: every row sees the context
    followed = tree.branches[rnd.tree_branch][: rnd.num_accepted]
    label = lambda i: "pending" if i == 0 else repr(token_text(tree.tokens[i - 1]))
    color = lambda i: COLORS["accepted"] if i - 1 in followed else COLORS["muted"]

    def subtree(parent, depth):
        lines = []
        for node, p in enumerate(tree.parents):
            if p == parent:
                mark = " ✓" if node in followed else ""
                lines.append(f'<div class="mtplab-tree-node" style="margin-left:{1.5 * depth}em;color:{color(node + 1)}">'
                             f"└ <code>{esc(label(node + 1))}</code>{mark} <small>(node {node}, position +{depth})</small>"
                             f"</div>" + subtree(node, depth + 1))
        return "".join(lines)

    n = sees.shape[0]
    head = "".join(f'<th style="writing-mode:vertical-rl;font-weight:normal"><code>{esc(label(j))}</code></th>'
                   for j in range(n))
    rows = "".join(
        f'<tr><th style="text-align:right;font-weight:normal"><code>{esc(label(i))}</code></th><td>■</td>'
        + "".join(f'<td class="mtplab-mask-{"on" if sees[i, j] else "off"}" style="width:1.2em;text-align:center;'
                  f'background:{tint(color(i)) if sees[i, j] else "transparent"}">{"■" if sees[i, j] else "·"}</td>'
                  for j in range(n)) + "</tr>" for i in range(n))
    return (f'<div class="mtplab-tree" style="display:flex;gap:2em;align-items:flex-start"><div><b>Token tree of round '
            f"{rnd.index}</b> ({len(tree.tokens)} nodes from {len(rnd.tree_branches)} branches; shared prefixes "
            f'merged)<div><code>pending</code></div>{subtree(-1, 1)}<small>✓: the path the target\'s greedy choices '
            f"followed ({rnd.num_accepted} accepted)</small></div>"
            f'<div><b>Attention mask of the verify pass</b><table class="mtplab-tree-mask" style="border-collapse:'
            f'collapse;font-size:85%"><tr><th></th><th style="writing-mode:vertical-rl;font-weight:normal">context'
            f"</th>{head}</tr>{rows}</table><small>row: an input of the pass; ■: the columns it attends to. Each node "
            f"sees the context, the pending token and its own ancestors only, so it is scored as if its branch were "
            f"fed alone.</small></div></div>")


# what each kind of drafter reads, how it drafts, its extra state and weights, and where it lives in mtplab
FAMILY = [
    dict(name="draft model", key="draft-model", reads="the tokens", drafts="a separate small LM, token by token",
         cache="its own KV cache", weights="a whole small model", mtplab="DraftModelDrafter, 'draft-model'"),
    dict(name="layer-skip (early exit)", key="layer-skip", reads="the tokens",
         drafts="the target's first layers + its final norm and head", cache="its own cache of those layers",
         weights="none", mtplab="LayerSkipDrafter, 'layer-skip'"),
    dict(name="prompt lookup", key="prompt-lookup", reads="the tokens of the context",
         drafts="copies what followed the last n-gram", cache="none", weights="none",
         mtplab="PromptLookupDrafter, 'prompt-lookup'"),
    dict(name="Medusa", key=None, reads="the target's last hidden state",
         drafts="k independent heads, one per future position (no feedback)", cache="none",
         weights="k small heads (+ LM heads)", mtplab="— (a tree of such guesses: mtplab.tree)"),
    dict(name="mtplab MTP head", key="mtp-head", reads="the target's last hidden state + the newest token",
         drafts="one small MLP stack, its output state fed back per token", cache="none",
         weights="7.3 M (3 SwiGLU blocks)", mtplab="MTPDrafter, 'mtp' / 'mtp-head'"),
    dict(name="EAGLE-3", key="eagle3", reads="the target's low, middle and high hidden states of every position",
         drafts="one decoder layer over fused features, its output state fed back per token",
         cache="its own KV cache, rolled back with the target's", weights="≈ 5 M here (fc + 1 layer)",
         mtplab="Eagle3Drafter (drafters/eagle.py), export to vLLM"),
    dict(name="Gemma 4 assistant", key=None,
         reads="the target's last hidden state and the target's own KV cache",
         drafts="a few Q-only layers from one position, own state fed back", cache="none (reads the target's)",
         weights="a few layers", mtplab="Gemma4AssistantDrafter (hub models)"),
]


def family_html(costs: dict | None = None) -> str:
    """The drafter family as a table: what each reads and drafts with, its state, its weights, and ``costs``
    (``{key: c}``: draft cost per token / a target step, measured on this machine) where mtplab ran it."""
    esc = html.escape
    costs = costs or {}
    head = "".join(f"<th style='text-align:left'>{h}</th>" for h in
                   ("drafter", "reads", "drafts with", "state of its own", "extra weights", "c here", "in mtplab"))
    rows = "".join(
        "<tr class='mtplab-family-row'>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
            d["name"], d["reads"], d["drafts"], d["cache"], d["weights"],
            f"{costs[d['key']]:.2f}" if d["key"] in costs else "—", d["mtplab"])) + "</tr>"
        for d in FAMILY)
    return (f"<table class='mtplab-family' style='font-size:90%'><tr>{head}</tr>{rows}</table><small>c: seconds per "
            "drafted token / seconds of a one-token target step, measured in this run on this machine "
            "(— where it did not run here). Every drafter's guesses go through the same lossless verification.</small>")


VERIFY_PLAIN, VERIFY_TUNED, VERIFY_USED, VERIFY_ASSUMED = (
    "F.linear (measured)", "tuned kernels (measured)", "v: what the decoder plans with", "Leviathan's model: 1 step")


def verify_cost_figure(target):
    """The measured cost of one target pass over 1..16 tokens on this machine, in one-token steps: with plain
    ``F.linear``, with mtplab's tuned kernels where it has them, the curve v the decoder plans with (``schedule="auto"``
    and the dashboard's theory), and the assumption of the classic model (every pass costs one step)."""
    import plotly.graph_objects as go

    from ..costs import pass_seconds, verify_curve

    seconds, v = pass_seconds(target), verify_curve(target)
    ns = sorted(seconds["plain"])
    step = seconds["plain"][1]
    fig = go.Figure()
    fig.add_trace(go.Scatter(name=VERIFY_PLAIN, x=ns, y=[seconds["plain"][n] / step for n in ns], mode="markers",
                             marker=dict(color=COLORS["muted"], size=8)))
    if "tuned" in seconds:
        fig.add_trace(go.Scatter(name=VERIFY_TUNED, x=ns, y=[seconds["tuned"][n] / step for n in ns], mode="markers",
                                 marker=dict(color=COLORS["drafter"], size=8, symbol="diamond")))
    fig.add_trace(go.Scatter(name=VERIFY_USED, x=[g + 1 for g in sorted(v)], y=[v[g] for g in sorted(v)],
                             mode="lines", line=dict(color=COLORS["measured"], width=2)))
    fig.add_trace(go.Scatter(name=VERIFY_ASSUMED, x=[1, max(ns)], y=[1, 1], mode="lines",
                             line=dict(color=COLORS["theory"], dash="dash")))
    fig.update_layout(title=f"One target pass over n tokens, in one-token steps ({target.name}, this machine)",
                      xaxis=dict(title="tokens in the pass (γ + 1)", dtick=1), yaxis=dict(title="cost / one-token step",
                      rangemode="tozero"), height=340, template="plotly_white", legend=dict(orientation="h", y=-0.25))
    return fig

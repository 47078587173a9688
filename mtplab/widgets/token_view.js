// Token stream view: one span per token, classed by what happened to it; click selects (round, position).
function tokenSpan(t, roundIndex) {
  const [kind, text, pos, tip] = t;
  const s = document.createElement("span");
  s.className = `tok tok-${kind}`;
  s.textContent = text;
  s.title = tip;
  s.dataset.round = roundIndex;
  s.dataset.pos = pos;
  s.dataset.kind = kind;
  return s;
}

function renderRound(r) {
  const g = document.createElement("span");
  g.className = "round";
  g.dataset.round = r.i;
  if (r.k !== undefined) g.dataset.k = r.k;
  if (r.mark) {
    const m = document.createElement("span");
    m.className = "setting-change";
    m.textContent = `⚙ ${r.mark}`;
    m.title = `settings changed before round ${r.i}: ${r.mark}`;
    g.appendChild(m);
  }
  if (r.auto) {
    const a = document.createElement("span");
    a.className = "auto-change";
    a.textContent = `⟳ ${r.auto.split(",")[0]}`;
    a.title = `before round ${r.i}, schedule="auto" chose ${r.auto} (γ=0: a plain step)`;
    g.appendChild(a);
  }
  for (const t of r.toks) g.appendChild(tokenSpan(t, r.i));
  return g;
}

function render({ model, el }) {
  el.classList.add("mtplab-token-view");
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const [kind, label, description] of model.get("legend")) {  // the kinds and their words: mtplab.palette
    const s = document.createElement("span");
    s.className = `tok tok-${kind}`;
    s.textContent = label;
    s.title = description;
    legend.appendChild(s);
  }
  const body = document.createElement("div");
  body.className = "tokens";
  const status = document.createElement("div");
  status.className = "status";
  el.append(legend, body, status);

  let shown = 0;
  function sync() {
    const rounds = model.get("rounds");
    if (rounds.length < shown) { body.replaceChildren(); shown = 0; }
    const frag = document.createDocumentFragment();
    for (const r of rounds.slice(shown)) frag.appendChild(renderRound(r));
    body.appendChild(frag);
    shown = rounds.length;
    markSelected();
  }
  function markSelected() {
    const sel = model.get("selected");
    for (const s of body.querySelectorAll(".tok.selected")) s.classList.remove("selected");
    const hit = body.querySelector(`.tok[data-round="${sel.round}"][data-pos="${sel.pos}"]`);
    if (hit) hit.classList.add("selected");
  }
  body.addEventListener("click", (e) => {
    const t = e.target.closest(".tok");
    if (!t) return;
    model.set("selected", { round: Number(t.dataset.round), pos: Number(t.dataset.pos), kind: t.dataset.kind });
    model.save_changes();
  });
  model.on("change:rounds", sync);
  model.on("change:selected", markSelected);
  model.on("change:status", () => { status.textContent = model.get("status"); });
  status.textContent = model.get("status");
  sync();
}

export default { render };

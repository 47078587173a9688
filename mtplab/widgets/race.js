// The race: two recorded runs replayed side by side; each round's tokens appear when that round ended.
function tokenSpan([kind, text]) {
  const s = document.createElement("span");
  s.className = `tok tok-${kind}`;
  s.textContent = text;
  return s;
}

function render({ model, el }) {
  el.classList.add("mtplab-race");
  const controls = document.createElement("div");
  controls.className = "controls";
  const replay = document.createElement("button");
  replay.className = "replay";
  replay.textContent = "▶ replay";
  const speed = document.createElement("select");
  speed.className = "speed";
  for (const s of model.get("speeds")) {
    const o = document.createElement("option");
    o.value = s;
    o.textContent = s === 1 ? "recorded pace" : `${s}× (slow motion)`;
    if (s === 1) o.selected = true;
    speed.appendChild(o);
  }
  controls.append(replay, speed);
  const lanesEl = document.createElement("div");
  lanesEl.className = "lanes";
  const summary = document.createElement("div");
  summary.className = "summary";
  el.append(controls, lanesEl, summary);

  let timer = null;
  function start() {
    if (timer) clearInterval(timer);
    lanesEl.replaceChildren();
    summary.textContent = "";
    el.classList.remove("done");
    const rate = Number(speed.value);
    const lanes = model.get("lanes").map((l) => {
      const box = document.createElement("div");
      box.className = `lane ${l.key}`;
      box.dataset.seconds = l.seconds;
      box.dataset.tokens = l.tokens;
      box.dataset.passes = l.passes;
      const head = document.createElement("div");
      head.className = "head";
      const name = document.createElement("span");
      name.textContent = l.name;
      const clock = document.createElement("span");
      clock.className = "clock";
      head.append(name, clock);
      const track = document.createElement("div");
      track.className = "track";
      const bar = document.createElement("div");
      bar.className = "bar";
      track.appendChild(bar);
      const text = document.createElement("div");
      text.className = "text";
      box.append(head, track, text);
      lanesEl.appendChild(box);
      return { l, box, clock, bar, text, next: 0, shown: 0 };
    });
    if (!lanes.length) return;
    const t0 = performance.now();
    function tick() {
      const t = ((performance.now() - t0) / 1000) * rate;  // seconds of the recorded runs
      let running = 0;
      for (const s of lanes) {
        const ev = s.l.events;
        while (s.next < ev.length && ev[s.next][0] <= t) {
          const pass = document.createElement("span");
          pass.className = "pass";
          for (const tok of ev[s.next][1]) pass.appendChild(tokenSpan(tok));
          s.text.appendChild(pass);
          s.shown += ev[s.next][1].length;
          s.next += 1;
          s.text.scrollTop = s.text.scrollHeight;
        }
        const done = s.next >= ev.length && t >= s.l.seconds;
        s.clock.textContent = `${Math.min(t, s.l.seconds).toFixed(2)} s · ${s.shown} tokens · ${s.next} passes`;
        s.bar.style.width = `${(100 * s.shown) / Math.max(1, s.l.tokens)}%`;
        if (done && !s.box.classList.contains("finished")) {
          s.box.classList.add("finished");
          s.box.dataset.finishedAt = t.toFixed(3);  // on the recorded clock: when this lane crossed the line
        } else if (!done) running += 1;
      }
      if (!running) {
        clearInterval(timer);
        timer = null;
        summary.textContent = model.get("summary");
        el.classList.add("done");
      }
    }
    timer = setInterval(tick, 20);
    tick();
  }
  replay.addEventListener("click", start);
  speed.addEventListener("change", start);
  model.on("change:lanes", start);
  start();
  return () => { if (timer) clearInterval(timer); };
}

export default { render };

"""Train a small MTP head for the bundled target and measure it on held-out bench prompts (greedy).

    python scripts/mtp_experiment.py OUT_DIR [--steps N] [--max-tokens N]

Features are cached in OUT_DIR and training resumes from OUT_DIR/checkpoint.pt, so the script can be re-run
after an interruption. Prints mean acceptance length, per-position acceptance and the speedup over plain decoding
(interleaved runs) for a few draft lengths.
"""
import argparse
import time


import mtplab
from mtplab.bench import load_prompts
from mtplab.train import build_features, train_mtp_drafter

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--steps", type=int, default=400)
ap.add_argument("--max-tokens", type=int, default=None)
ap.add_argument("--batch-size", type=int, default=8)
ap.add_argument("--draft-vocab", type=int, default=8192)
ap.add_argument("--prompts", type=int, default=5)
args = ap.parse_args()

target = mtplab.load_target()
t0 = time.perf_counter()
feats = build_features(target, args.out, args.max_tokens)
print(f"features: {feats['tokens'].numel()} positions, {time.perf_counter() - t0:.0f} s", flush=True)
drafter = train_mtp_drafter(target, feats, args.out, steps=args.steps, batch_size=args.batch_size,
                            draft_vocab_size=args.draft_vocab, log_every=50, checkpoint_every=50)
print(f"trained in {time.perf_counter() - t0:.0f} s (features + training)", flush=True)

prompts = [p["prompt"] for p in load_prompts()[: args.prompts]]
plain = mtplab.SpeculativeDecoder(target, None)
for gamma in (1, 2, 3, 4):
    spec = mtplab.SpeculativeDecoder(target, drafter, num_draft_tokens=gamma)
    s_traces, p_traces = [], []
    for p in prompts:
        s_traces.append(spec.generate(p, 48))
        p_traces.append(plain.generate(p, 48))
        assert s_traces[-1].token_ids == p_traces[-1].token_ids, "greedy MTP output must equal plain output"
    tok = sum(len(t.token_ids) for t in s_traces)
    rounds = sum(len(t.rounds) for t in s_traces)
    sp = (sum(t.metrics.seconds for t in p_traces) / tok) / (sum(t.metrics.seconds for t in s_traces) / tok)
    acc = [r for t in s_traces for r in t.rounds if r.num_drafted]
    per_pos = [sum(r.num_accepted > i for r in acc if r.num_drafted > i) / max(1, sum(r.num_drafted > i for r in acc))
               for i in range(gamma)]
    c = (sum(r.draft_seconds for r in acc) / max(1, sum(r.num_drafted for r in acc))) / (
        sum(t.metrics.seconds - t.prefill_seconds for t in p_traces) / tok)
    print(f"γ={gamma}: mean acceptance length {tok / rounds:.2f}, per-position "
          + " ".join(f"{a:.2f}" for a in per_pos) + f", c={c:.3f}, speedup {sp:.2f}x", flush=True)

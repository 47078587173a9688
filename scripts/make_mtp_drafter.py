"""Make the shipped MTP drafter for the bundled target, end to end: data from the target itself, then training.

    python scripts/make_mtp_drafter.py OUT [--device cuda] [--gen-minutes 8] [--train-minutes 10]

1. stage-A prompts (mtplab.datagen.make_prompts) -> the target's greedy answers          OUT/a_greedy/
2. stage-B prompts about those answers and about standard-library docs -> greedy answers   OUT/b_greedy/
3. the stage-A prompts again, sampled at T=0.7                                             OUT/a_t07/
4. the stage-B prompts again, sampled at T=0.7 (added later, for >= 3 M answer tokens)     OUT/b_t07/
5. the target's greedy answers to the 30 dev prompts, to validate on (--val dev)           OUT/dev_greedy/
6. MTP heads trained on all of it (mtplab.train.train_on_sequences)                        OUT/train/head*/
7. the data packed as uint16 token arrays (OUT/data_*.npy) so training can be redone without generation.

Every stage writes shards/checkpoints and skips what exists, so re-running the same command resumes. The time
limits stop generation cleanly at a batch boundary and fit the training schedule. It runs on a CPU too, only far
slower. The shipped drafter (mtplab/data/mtp-smollm2-135m = OUT/train/head2) came from these three runs on one
H100 (generation 371 s, then training 432 s + 368 s + 220 s):

    A="--device cuda --gen-minutes 7 --batch-size 768 --heads 1x1536,2x1536,3x1280 --train-batch 48"
    python scripts/make_mtp_drafter.py OUT $A --train-minutes 8
    python scripts/make_mtp_drafter.py OUT $A --train-minutes 7 --restart
    python scripts/make_mtp_drafter.py OUT $A --train-minutes 4.2 --restart --lr 6e-4

A run (and its teacher store) belongs to one corpus; once more generation has grown it, go on in a new run from the
old one's weights: ``--gen-minutes 0 --run train2 --init-from train`` (the new store copies what the earlier runs'
stores hold and runs the target only over the new answers). On another machine, where neither the corpus nor the
run is, go on from a saved drafter: ``--init-from mtplab/data/eagle3-smollm2-135m`` (its weights, a fresh optimizer).
``--packed data/answers`` carries the corpus itself to the next machine: the stages packed in the repo are unpacked
before generating (a CPU then goes on with the next stage instead of redoing the first), and grown ones are packed.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch

import mtplab
from mtplab import datagen
from mtplab.train import parse_heads, train_on_sequences

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("--device", default="cpu")
ap.add_argument("--gen-minutes", type=float, default=8.0, help="time for all generation stages together")
ap.add_argument("--train-minutes", type=float, default=10.0)
ap.add_argument("--batch-size", type=int, default=None, help="sequences decoded at once (default: 512 on a GPU; 128 "
               "on a CPU, where a batch of 128 takes minutes and is the unit a cut-off run resumes from)")
ap.add_argument("--max-new-tokens", type=int, default=256)
ap.add_argument("--limit", type=int, default=None, help="use only the first N stage-A prompts (smoke tests)")
ap.add_argument("--heads", default="2x1536", help="heads to train side by side: LAYERSxINTERMEDIATE[+ctx],... (+ctx: with context "
                "attention) or eagle3 (an EAGLE-3 head; not beside MTP heads)")
ap.add_argument("--train-batch", type=int, default=32)
ap.add_argument("--steps", type=int, default=20000)
ap.add_argument("--draft-vocab", type=int, default=8192)
ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="float32",
                help="training arithmetic (auto: bfloat16 autocast where this CPU runs it clearly faster, "
                "e.g. AMX: 1.6-1.9x)")
ap.add_argument("--gen-precision", choices=("auto", "float32", "bfloat16"), default="float32",
                help="the arithmetic that decodes the answers (auto: bfloat16 where this CPU runs it clearly faster: "
                "about 2x the tokens/s on an AMX Xeon; the answers then follow the float32 target less closely)")
ap.add_argument("--teacher-store", action="store_true",
                help="run the target over the data once and keep its outputs on disk (OUT/teacher, ~4.6 KB a token "
                "for EAGLE-3), so training steps run only the head: about 2x the steps an hour on a CPU")
ap.add_argument("--restart", action="store_true", help="continue training from OUT/train with a fresh schedule")
ap.add_argument("--run", default="train", help="the training run's folder under OUT (its teacher store: OUT/teacher "
               "for the default, else OUT/RUN_teacher); a run and its store are for one corpus, so a grown corpus "
               "wants a new run")
ap.add_argument("--init-from", default=None, metavar="RUN", help="start from the run OUT/RUN (e.g. train, on a smaller "
               "corpus: its heads, optimizer and draft vocabulary) with a fresh schedule; or from a saved drafter's "
               "folder (a path: its head and draft vocabulary, a fresh optimizer), e.g. one shipped in mtplab/data")
ap.add_argument("--val", choices=("dev", "held-out"), default="dev", help="what validation measures: dev (default), "
               "the target's greedy answers to the 30 dev prompts (OUT/dev_greedy, generated first: no prompt or "
               "answer shared with the corpus, as the bench shares none); held-out, 64 corpus sequences held out at "
               "random (runs begun before --val: they can share a prompt with training answers, so validation "
               "overstated the bench)")
ap.add_argument("--packed", default=None, metavar="DIR", help="a folder of packed stages (data/answers in the repo): "
               "stages OUT lacks are unpacked from it before generating, and stages that grew are packed into it "
               "after (one tar.xz a stage, ~0.5 MB a million answer tokens), so the corpus outlives the machine")
args = ap.parse_args()

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
t_start = time.time()
log_file = open(out / "log.txt", "a")


def log(msg):
    line = f"[{time.strftime('%H:%M:%S')} +{time.time() - t_start:.0f}s] {msg}"
    print(line, flush=True)
    log_file.write(line + "\n")
    log_file.flush()


target = mtplab.load_target(device=args.device, dtype=torch.float32)
log(f"target {target} on {args.device}")
batch_size = args.batch_size or (512 if args.device.startswith("cuda") else 128)
if args.packed:
    datagen.unpack_stages(args.packed, out, log=log)
sequences = datagen.build_answer_corpus(target, out, minutes=args.gen_minutes, batch_size=batch_size,
                                        max_new_tokens=args.max_new_tokens, limit=args.limit,
                                        precision=args.gen_precision, log=log)
if args.packed:
    datagen.pack_stages(out, args.packed, log=log)
for name in datagen.STAGES:  # the token data as plain arrays, to re-train without generating
    seqs = datagen.load_sequences(out / name)
    if seqs:
        np.save(out / f"data_{name}_tokens.npy", np.array([t for ids, _ in seqs for t in ids], dtype=np.uint16))
        np.save(out / f"data_{name}_index.npy", np.array([(len(ids), s) for ids, s in seqs], dtype=np.int32))

if args.device.startswith("cuda"):
    torch.backends.cuda.matmul.allow_tf32 = True  # the teacher's features: TF32 is plenty, 3-4x faster than fp32
heads = parse_heads(args.heads)
val = datagen.dev_answers(target, out, max_new_tokens=args.max_new_tokens, progress=False, log=log) \
    if args.val == "dev" else None
store = out / ("teacher" if args.run == "train" else f"{args.run}_teacher")
# --init-from: a run under OUT, else a folder as given (relative to here: mtplab/data/... from the repo root)
init_from = None if args.init_from is None else next(
    (p for p in (out / args.init_from, Path(args.init_from)) if p.exists()), out / args.init_from)
train_on_sequences(target, sequences, out / args.run, heads=heads, draft_vocab_size=args.draft_vocab,
                   steps=args.steps, batch_size=args.train_batch, lr=args.lr, time_budget=60 * args.train_minutes,
                   restart=args.restart, init_from=init_from,
                   precision=args.precision, val_sequences=val, log_every=200, checkpoint_every=200, log=log,
                   progress=False,
                   cache_teacher=store if args.teacher_store else False,
                   reuse_teacher=[p for p in sorted(out.glob("*teacher")) if p != store])  # earlier runs' stores
log("done")

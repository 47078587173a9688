"""The command line: ``mtplab run``, ``mtplab bench``, ``mtplab fetch``, ``mtplab train-drafter`` and
``mtplab export-drafter`` (also ``python -m mtplab``).

``mtplab run "prompt"`` streams a speculative decode round by round and colours each token by what happened
to it, in the notebook's colours and cues (``mtplab.palette``, as 256-colour terminal codes): accepted draft
(green), rejected draft (vermillion, struck through, then dropped), correction (orange, underlined), bonus (blue,
overlined, bold), plain target token (default colour). Without a colour terminal (or with ``NO_COLOR`` set)
tokens are marked ``[+tok]`` ``[-tok]`` ``[!tok]`` ``[*tok]`` instead.

``mtplab export-drafter DIR --format speculators --drafter FOLDER`` writes an EAGLE-3 drafter as a
vllm-project/speculators checkpoint (``config.json`` + ``model.safetensors``, see ``mtplab.export``) for vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import palette

MARKS = {"accepted": "+", "rejected": "-", "correction": "!", "bonus": "*"}  # the no-colour cue


def _paint(kind: str, text: str, color: bool) -> str:
    if kind == "rejected":
        text = text.replace("\n", "\\n")  # a dropped newline should not break the line
    if kind not in MARKS:  # "plain": the target's own token, nothing drafted
        return text
    return f"\x1b[{palette.ansi(kind)}m{text}\x1b[0m" if color else f"[{MARKS[kind]}{text}]"


def _legend(color: bool) -> str:
    kinds = ["accepted", "rejected", "correction", "bonus"]
    return "legend: " + " ".join(_paint(k, k, color) for k in kinds) + " plain"


def _print_metrics(trace, out) -> None:
    m = trace.metrics
    print(f"rounds {m.rounds} | new tokens {m.new_tokens} | acceptance rate {m.acceptance_rate:.2f} "
          f"({m.accepted}/{m.drafted} drafted) | mean acceptance length {m.mean_acceptance_length:.2f}", file=out)
    if m.per_position_acceptance:
        print("per-position acceptance: " + " ".join(f"{a:.2f}" for a in m.per_position_acceptance), file=out)
    print(f"{m.tokens_per_second:.1f} tokens/s | seconds: prefill {trace.prefill_seconds:.3f}, draft "
          f"{m.draft_seconds:.3f}, verify {m.verify_seconds:.3f}, bookkeeping {m.bookkeeping_seconds:.3f} | "
          f"stop: {trace.stop_reason or 'interrupted'}", file=out)


def cmd_run(args) -> None:
    from .decoder import SpeculativeDecoder
    from .drafters import registry
    from .models import load_target
    from .sampling import SamplingConfig

    SamplingConfig(args.temperature, args.top_k, args.top_p)  # fail on bad values before loading the model
    target = load_target(args.model)
    drafter = registry.make(args.drafter, target, args.layers)
    dec = SpeculativeDecoder(target, drafter, num_draft_tokens=args.k, schedule=args.schedule,
                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    out = sys.stdout
    color = not os.environ.get("NO_COLOR") and out.isatty()
    print(_legend(color), file=out)
    chat_template = False if args.no_chat_template else None
    try:
        for rnd in dec.stream(args.prompt, args.max_new_tokens, args.seed, chat_template):
            out.write("".join(_paint(kind, text, color) for kind, _, text, _ in rnd.token_events()))
            out.flush()
    except KeyboardInterrupt:
        print("\n(interrupted)", end="", file=out)
    print("\n", file=out)
    _print_metrics(dec.trace, out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(dec.trace.to_json(indent=1))
        print(f"trace written to {args.json}", file=out)


def _drafter_arg(choices):
    """An argparse type: one of ``choices`` or a folder holding a trained drafter (``mtplab train-drafter --out``)."""
    def check(value: str) -> str:
        from .drafters.registry import is_folder

        if value in choices or is_folder(value):
            return value
        raise argparse.ArgumentTypeError(f"{value!r} is neither a drafter ({', '.join(choices)}) nor a folder "
                                         "holding a trained drafter")
    return check


QUICK = dict(prompts=3, max_new_tokens=32, gammas=[2, 4], temperatures=[0.0])
BENCH_DEFAULTS = dict(prompts=None, max_new_tokens=64, gammas=[1, 2, 4, 8], temperatures=[0.0, 0.7])


def cmd_bench(args) -> None:
    from .bench import format_table, run_bench

    opts = {k: getattr(args, k) if getattr(args, k) is not None else v
            for k, v in (QUICK if args.quick else BENCH_DEFAULTS).items()}
    if args.costs:
        from .bench import cost_report
        from .models import load_target

        print(cost_report(load_target(args.model), args.drafters, args.layers))
        return
    rows = run_bench(target=args.model, drafters=args.drafters, layers=args.layers, schedule=args.schedule,
                     seed=args.seed, hf=not args.no_hf, record=not args.no_record,
                     measure_recording=args.measure_recording, **opts)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


def cmd_fetch(args) -> None:
    from .models import fetch_bundled

    print(fetch_bundled())


def cmd_train_drafter(args) -> None:
    import time

    from .models import load_target
    from .train import docs_sequences, parse_heads, train_on_sequences

    heads = parse_heads(args.heads)
    target = load_target(args.model)
    t0 = time.perf_counter()
    if args.data == "answers":  # the shipped drafter's recipe: the target's own answers (see scripts/make_mtp_drafter.py)
        from .datagen import build_answer_corpus

        seqs = build_answer_corpus(target, f"{args.out}/data", minutes=args.gen_minutes, batch_size=args.gen_batch,
                                   limit=args.max_prompts)
    else:
        seqs = docs_sequences(target, max_tokens=args.max_tokens, block_size=args.block_size)
    val = None
    if args.val == "dev":
        from .datagen import dev_answers

        val = dev_answers(target, f"{args.out}/data")
    print(f"{len(seqs)} sequences, {sum(len(ids) - s for ids, s in seqs)} tokens to learn "
          f"({time.perf_counter() - t0:.0f} s)")
    drafter = train_on_sequences(target, seqs, args.out, heads=heads,
                                 draft_vocab_size=args.draft_vocab, unroll=args.unroll, steps=args.steps,
                                 batch_size=args.batch_size, lr=args.lr, precision=args.precision, val_sequences=val,
                                 cache_teacher=f"{args.out}/teacher" if args.teacher_store else False,
                                 reuse_teacher=[f"{args.init_from}/teacher"] if args.init_from else (),
                                 init_from=args.init_from,
                                 time_budget=None if args.train_minutes is None else 60 * args.train_minutes)[0]
    where = f"{args.out}/head0"
    print(f"saved {drafter.name} to {where} ({time.perf_counter() - t0:.0f} s in all); "
          f"use it with mtplab.load_drafter({where!r})")


def cmd_export_drafter(args) -> None:
    from pathlib import Path

    from .drafters import load_drafter, registry
    from .export import check_exportable, export_speculators
    from .models import BUNDLED_ALIASES, BUNDLED_HUB_ID, load_target

    if not Path(args.drafter).is_dir():  # fail before loading anything
        eagle = ('the folder of an EAGLE-3 drafter (saved by Eagle3Drafter.save, its mtp_config.json says '
                 '"kind": "eagle3")')
        if args.drafter in registry.NAMES:
            raise ValueError(f"--drafter {args.drafter} is {registry.ENTRIES[args.drafter].about}: only EAGLE-3 "
                             f"drafters export to the speculators format; give {eagle}")
        raise ValueError(f"--drafter {args.drafter}: no such folder; give {eagle}")
    if args.speculative_tokens < 1:
        raise ValueError(f"--speculative-tokens must be at least 1, got {args.speculative_tokens}")
    drafter = load_drafter(args.drafter)
    check_exportable(drafter, bound=False)  # the kind, before the target loads
    target = load_target(args.model)
    drafter.bind(target)
    verifier = args.verifier or (BUNDLED_HUB_ID if args.model in BUNDLED_ALIASES else str(args.model))
    out = export_speculators(drafter, args.dir, verifier, args.speculative_tokens, args.dtype)
    print(f"wrote {out}/config.json and {out}/model.safetensors (speculators EAGLE-3, verifier {verifier}, "
          f"{args.speculative_tokens} speculative tokens)")


def build_parser() -> argparse.ArgumentParser:
    from .bench import DRAFTERS
    from .decoder import SCHEDULES
    from .drafters.registry import NAMES

    parser = argparse.ArgumentParser(prog="mtplab", description="See speculative decoding work: run, bench, fetch, "
                                     "train-drafter, export-drafter.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="decode a prompt, showing accepted / rejected drafted tokens as they come")
    run.add_argument("prompt")
    run.add_argument("--drafter", type=_drafter_arg(NAMES), default="mtp", metavar="NAME_OR_DIR",
                     help=f"one of {', '.join(NAMES)}, or a trained drafter's folder (default: mtp)")
    run.add_argument("-k", "--num-draft-tokens", dest="k", type=int, default=4,
                     help="draft length γ (default 4; with --schedule auto the most it may draft)")
    run.add_argument("--schedule", choices=SCHEDULES, default="auto",
                     help="auto (default): γ per round from this machine's measured costs and the live acceptance")
    run.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--max-new-tokens", type=int, default=64)
    run.add_argument("--layers", type=int, default=None,
                     help="layer-skip exit layer / draft-model depth (default: 2/5 of the target's layers)")
    run.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    run.add_argument("--model", default=None, help="hub id or local folder (default: bundled SmolLM2-135M)")
    run.add_argument("--json", metavar="PATH", help="write the trace as JSON")
    run.set_defaults(func=cmd_run)

    bench = sub.add_parser("bench", help="measure acceptance and speedup of each drafter against plain decoding")
    bench.add_argument("--quick", action="store_true", help="3 prompts, 32 tokens, γ in {2, 4}, greedy only")
    bench.add_argument("--max-new-tokens", type=int)
    bench.add_argument("--gammas", type=int, nargs="+")
    bench.add_argument("--temperatures", type=float, nargs="+")
    bench.add_argument("--drafters", nargs="+", type=_drafter_arg(DRAFTERS), default=list(DRAFTERS),
                       metavar="NAME_OR_DIR", help=f"any of {', '.join(DRAFTERS)}, or trained drafters' folders "
                       "(default: all names)")
    bench.add_argument("--prompts", type=int, metavar="N", help="use the first N shipped prompts")
    bench.add_argument("--layers", type=int, default=None,
                       help="layer-skip exit layer / draft-model depth (default: 2/5 of the target's layers)")
    bench.add_argument("--schedule", choices=SCHEDULES, default="auto",
                       help="draft-length policy of the mtplab rows (auto: γ is the most it may draft)")
    bench.add_argument("--costs", action="store_true",
                       help="print this machine's cost curve instead: CPU, pass cost over 1..16 tokens before and "
                            "after kernel tuning, each drafter's c, plain tokens/s against the memory roofline")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--no-hf", action="store_true", help="leave out transformers' generate rows")
    bench.add_argument("--no-record", action="store_true", help="decode with record=False")
    bench.add_argument("--measure-recording", action="store_true", help="add a record=True vs False row")
    bench.add_argument("--model", default=None, help="hub id or local folder (default: bundled SmolLM2-135M)")
    bench.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    bench.set_defaults(func=cmd_bench)

    train = sub.add_parser("train-drafter", help="train an MTP drafter for the target by self-distillation (resumes)",
                           description="One trainer (mtplab.train.train_on_sequences) for both kinds of data. A re-run "
                           "with the same --out resumes; other data or settings there are refused: use a new --out.")
    train.add_argument("--out", required=True, help="folder for the data, the checkpoint and the drafter (OUT/head0)")
    train.add_argument("--model", default=None, help="target: hub id or local folder (default: bundled SmolLM2-135M)")
    train.add_argument("--data", choices=("docs", "answers"), default="docs",
                       help="docs: standard-library docs in chat form, the whole text learned (quick to make); "
                            "answers: the target's own answers to thousands of prompts (the shipped drafter's "
                            "recipe; generating them wants a GPU)")
    train.add_argument("--gen-minutes", type=float, default=None, help="answers: time limit for generation")
    train.add_argument("--gen-batch", type=int, default=256, help="answers: sequences generated at once")
    train.add_argument("--max-prompts", type=int, default=None, help="answers: use the first N prompts only")
    train.add_argument("--max-tokens", type=int, default=None, help="docs: cap on training tokens (default: all)")
    train.add_argument("--block-size", type=int, default=128, help="docs: tokens per training sequence")
    train.add_argument("--train-minutes", type=float, default=None, help="fit training into this time")
    train.add_argument("--heads", default="2", help="the head: LAYERS[xINTERMEDIATE][+ctx] (an MTP head of that many "
                       "SwiGLU blocks; +ctx: with context attention) or eagle3 (an EAGLE-3 head reading the target's "
                       "low, middle and high layers); default 2")
    train.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary: most frequent N tokens")
    train.add_argument("--unroll", type=int, default=4, help="steps ahead trained with the head's own fed-back state")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step (the target runs on each batch)")
    train.add_argument("--lr", type=float, default=2e-3)
    train.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="float32",
                       help="arithmetic of training (auto: bfloat16 autocast where this CPU runs it clearly "
                       "faster, e.g. AMX: 1.6-1.9x)")
    train.add_argument("--teacher-store", action="store_true",
                       help="run the target over the data once and keep its outputs on disk (OUT/teacher, a few KB a "
                       "token), so that training steps run only the head")
    train.add_argument("--val", choices=("held-out", "dev"), default="held-out",
                       help="validate on: held-out, 1/10 of the data (at most 64 sequences) held out at random "
                       "(quick; they can share prompts with training answers); dev, the target's greedy answers to "
                       "the 30 dev prompts (OUT/data/dev_greedy, minutes to generate on a CPU; like the bench, no "
                       "prompt shared with the data)")
    train.add_argument("--init-from", default=None, metavar="RUN",
                       help="start from another training run's folder (its heads, optimizer and draft vocabulary; "
                       "the same target and heads) with a fresh schedule, e.g. once the data has grown; or from a "
                       "saved drafter's folder (its head and draft vocabulary, a fresh optimizer)")
    train.set_defaults(func=cmd_train_drafter)

    export = sub.add_parser("export-drafter", help="write an EAGLE-3 drafter as a speculators checkpoint for vLLM",
                            description="Write an EAGLE-3 drafter (a folder saved by Eagle3Drafter.save) as a "
                            "vllm-project/speculators checkpoint: config.json and model.safetensors (the head, the "
                            "target's LM head rows of the draft vocabulary, d2t/t2d; no embedding: vLLM shares the "
                            "target's). The format is checked against speculators 0.9.0.")
    export.add_argument("dir", help="output folder (created; config.json and model.safetensors are overwritten)")
    export.add_argument("--format", required=True, choices=("speculators",), help="speculators: what vLLM reads")
    export.add_argument("--drafter", required=True, metavar="PATH_OR_NAME",
                        help="an EAGLE-3 drafter: its folder (saved by Eagle3Drafter.save; loaded with "
                             "mtplab.load_drafter). mtplab's named drafters (mtp, ...) are of other kinds")
    export.add_argument("--model", default=None, help="target: hub id or local folder (default: bundled SmolLM2-135M)")
    export.add_argument("--verifier", default=None, metavar="NAME_OR_PATH",
                        help="the target as vLLM loads it, recorded in config.json (default: "
                             "HuggingFaceTB/SmolLM2-135M-Instruct for the bundled target, else --model)")
    export.add_argument("--speculative-tokens", type=int, default=3, metavar="N",
                        help="draft length of the greedy proposal config.json declares (default 3)")
    export.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                        help="weights' dtype (default: the drafter's own)")
    export.set_defaults(func=cmd_export_drafter)

    fetch = sub.add_parser("fetch", help="download and convert the bundled model; print its folder")
    fetch.set_defaults(func=cmd_fetch)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, TypeError) as e:  # bad settings: a message, not a traceback (exit 2, as argparse)
        print(f"mtplab {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    return 0

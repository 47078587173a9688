"""Training data for MTP drafters: the target's own answers to many chat prompts (self-distillation).

A drafter is only as good as its match with the target's *own* way of writing, so the best training text is the
target's generations. Every prompt here is built from this file (templates x topics written for mtplab) or from the
target's earlier answers, so the whole corpus is redistributable and anyone can regenerate it:

* stage A: direct requests ("Explain in simple terms how X works.", "Write a Python function that ...", ...);
* stage B: requests *about a text* (summarise, rewrite politely, extract names, explain or fix code, answer from a
  passage), where the text is one of the target's stage-A answers or a docstring of the Python standard library.

:func:`generate_answers` decodes a list of prompts in large batches (``model.generate``, left padding) and writes
one shard per batch, so an interrupted run resumes at the first missing shard. :func:`load_sequences` reads the
shards back as ``(token ids, answer start)`` pairs for :func:`mtplab.train.train_on_sequences`.
The held-out benchmark prompts (``mtplab/data/prompts.json``) are never produced: :func:`make_prompts` drops any
prompt that shares a topic with them.
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import torch

from .models import chat_ids

TOPICS = """photosynthesis; volcanoes; the water cycle; black holes; the immune system; electric cars; compound interest;
the printing press; honeybees; rainbows; earthquakes; the Roman Empire; solar panels; vaccines; the internet;
recycling; coral reefs; the moon landing; climate change; glaciers; the human heart; sleep; coffee; chess; jazz music;
the Olympic Games; the stock market; inflation; bread baking; composting; bicycles; airplanes; submarines; trains;
the Great Wall of China; the pyramids of Egypt; dinosaurs; fossils; DNA; evolution; gravity; magnets; electricity;
batteries; the periodic table; atoms; light; sound waves; the seasons; weather forecasts; hurricanes; deserts;
rainforests; the ocean floor; octopuses; elephants; wolves; penguins; migration of birds; bees and flowers;
the human brain; memory; habits; exercise; meditation; nutrition; vitamins; drinking water; public libraries;
museums; democracy; elections; taxes; money; banks; credit cards; budgeting; saving for retirement; renting an
apartment; job interviews; writing a resume; remote work; teamwork; leadership; time management; public speaking;
learning a new language; reading books; writing poetry; painting; photography; film making; video games; board
games; gardening; houseplants; cooking pasta; making soup; baking cookies; healthy breakfast; camping; hiking;
swimming; running a marathon; yoga; cycling to work; city parks; traffic; public transport; bridges; skyscrapers;
architecture; castles; ancient Greece; the Renaissance; the industrial revolution; the steam engine; the telephone;
radio; television; smartphones; computers; programming; algorithms; databases; cloud computing; cybersecurity;
passwords; artificial intelligence; robots; 3D printing; space stations; Mars; Jupiter; the Sun; comets; telescopes;
microscopes; bacteria; viruses; antibiotics; hospitals; nurses; first aid; dentists; pets; dogs; cats; horses;
farming; tractors; wheat; rice; chocolate; tea; spices; volcanoes in Iceland; the Amazon river; the Sahara;
Antarctica; mountains; rivers; lakes; islands; maps; compasses; sailing; lighthouses in history; pirates; knights;
samurai; the Silk Road; trade; markets; small businesses; marketing; customer service; online shopping; delivery
drones; electric bikes; wind turbines; nuclear power; hydroelectric dams; water pollution; air quality; plastic
waste; forests; trees; mushrooms; insects; butterflies; spiders; frogs; sharks; whales; dolphins; snow; ice skating;
skiing; football; basketball; tennis; music lessons; the piano; the guitar; orchestras; opera; theatre; comedy;
friendship; kindness; moving to a new city; starting a new school; volunteering; recycling at home; saving energy
at home; fixing a flat tire; painting a room; organizing a closet; cleaning the kitchen; birthday parties; weddings;
holidays; travel on a budget; packing a suitcase; learning to drive; road safety; fire safety; earthquakes safety""".replace("\n", " ")
TOPICS = [t.strip() for t in TOPICS.split(";") if t.strip()]

PEOPLE = """a young inventor; an old fisherman; a curious cat; a retired teacher; a nervous astronaut; a baker in
Paris; a girl who can talk to birds; a detective; a lonely dragon; a street musician; a farmer; a time traveller;
two best friends; a shy robot; a clockmaker; a librarian; a ship captain; a new student; a grandmother; a mail
carrier""".replace("\n", " ")
PEOPLE = [p.strip() for p in PEOPLE.split(";") if p.strip()]

EVENTS = ("finds a mysterious map", "loses something important", "makes an unexpected friend", "gets lost in a storm",
          "wins a competition", "discovers a hidden door", "has to solve a puzzle", "learns a surprising secret",
          "goes on a long journey", "starts a new job")

CODE_TASKS = """reverses a string; checks whether a number is prime; returns the largest item in a list; counts the
words in a sentence; computes the factorial of a number; merges two sorted lists; removes duplicates from a list
while keeping the order; converts Celsius to Fahrenheit; checks whether a word is a palindrome; returns the n-th
Fibonacci number; sums the digits of an integer; finds the average of a list of numbers; capitalizes the first
letter of every word; flattens a nested list; counts how often each letter appears in a string; returns the
second smallest number in a list; checks whether two strings are anagrams; reads a text file and counts its
lines; converts a list of pairs into a dictionary; sorts a list of dictionaries by a key; finds the common
elements of two lists; generates a random password; validates an email address with a simple rule; computes the
greatest common divisor of two numbers; rounds every number in a list to two decimals""".replace("\n", " ")
CODE_TASKS = [c.strip() for c in CODE_TASKS.split(";") if c.strip()]

# Stage-A templates by kind. ``make_prompts`` fills every one of them for every topic, drawing the random fillers
# template after template in the order of ``DIRECT``: that order is part of the training data (the shipped
# drafter's prompts, pinned by a hash in tests/test_datagen.py), so new templates go at the end of ``DIRECT``.
TOPIC_TEMPLATES = (
    "Explain in simple terms how {topic} works.", "What is {topic}? Explain briefly.",
    "Give me three interesting facts about {topic}.", "Write a short paragraph about {topic}.",
    "Describe {topic} to a ten-year-old.", "What are the pros and cons of {topic}?",
    "Compare {topic} and {topic2}.", "Write a short poem about {topic}.", "Why is {topic} important?",
    "List five practical tips about {topic}.", "Write a short blog post introduction about {topic}.",
    "Give a step-by-step guide related to {topic}.", "What are common misconceptions about {topic}?",
    "Write a haiku about {topic}.", "Summarize the history of {topic} in a few sentences.",
)
STORY_TEMPLATES = ("Write a short story about {person} who {event}.", "Tell a bedtime story about {person}.")
CODE_TEMPLATES = ("Write a Python function that {code}.",
                  "Show how to write a Python function that {code}, with an example.")
MODULE_TEMPLATE = "Explain what the Python module `{module}` is used for, with a short example."
WRITING_TEMPLATES = (
    "Write a short, friendly email to a colleague about {topic}.",
    "Write a short, blunt email to a coworker complaining about {topic}.",
    "Write a short news report about {topic} that mentions several people by name.",
    "Write five quiz questions about {topic}.", "Give me a short list of vocabulary words related to {topic}.",
)
DIRECT = (*TOPIC_TEMPLATES, *STORY_TEMPLATES, *CODE_TEMPLATES, MODULE_TEMPLATE, *WRITING_TEMPLATES)
ABOUT_TEXT = (
    "Summarize the following paragraph in two sentences:\n\n{text}",
    "Summarize this text in one sentence:\n\n{text}",
    "Extract the names of all people mentioned in this text:\n\n{text}",
    "Answer the question using only the text below.\n\nText: {text}\n\nQuestion: What is the main idea of the text?",
    "Rewrite this text so that a child can understand it:\n\n{text}",
    "List the key points of this text as bullet points:\n\n{text}",
    "Give this text a short title:\n\n{text}",
)
ABOUT_EMAIL = ("Rewrite this email more politely:\n\n{text}", "Make this email shorter and clearer:\n\n{text}")
ABOUT_CODE = (
    "Explain what this Python code does, line by line:\n\n```python\n{text}\n```",
    "Fix the bug in this Python function and show the corrected code:\n\n```python\n{text}\n```",
    "Add comments to this Python code:\n\n```python\n{text}\n```",
    "Write unit tests for this Python function:\n\n```python\n{text}\n```",
)
ABOUT_DOC = ("Explain this documentation:\n\n{text}", "Summarize the following documentation:\n\n{text}")
LIST_TASK = "Turn this comma-separated list into a numbered list, one item per line, keeping every item: {items}"

# topics of the held-out benchmark prompts: never in the training data
HELD_OUT_WORDS = ("tide", "lighthouse keeper", "study", "studying", "vowel", "garden", "riverside bridge")


def _held_out(prompt: str) -> bool:
    low = prompt.lower()
    return any(w in low for w in HELD_OUT_WORDS)


# Python 3.12's sys.stdlib_module_names (public names), pinned so that make_prompts gives the same prompts on every
# Python version: the shipped drafter's data was generated on 3.12 (3.11 adds asynchat, asyncore, distutils, imp,
# smtpd, which changes every later random choice).
PROMPT_MODULES = tuple("""
    abc aifc antigravity argparse array ast asyncio atexit audioop base64 bdb binascii bisect builtins bz2
    cProfile calendar cgi cgitb chunk cmath cmd code codecs codeop collections colorsys compileall concurrent
    configparser contextlib contextvars copy copyreg crypt csv ctypes curses dataclasses datetime dbm decimal
    difflib dis doctest email encodings ensurepip enum errno faulthandler fcntl filecmp fileinput fnmatch
    fractions ftplib functools gc genericpath getopt getpass gettext glob graphlib grp gzip hashlib heapq hmac
    html http idlelib imaplib imghdr importlib inspect io ipaddress itertools json keyword lib2to3 linecache
    locale logging lzma mailbox mailcap marshal math mimetypes mmap modulefinder msilib msvcrt multiprocessing
    netrc nis nntplib nt ntpath nturl2path numbers opcode operator optparse os ossaudiodev pathlib pdb pickle
    pickletools pipes pkgutil platform plistlib poplib posix posixpath pprint profile pstats pty pwd py_compile
    pyclbr pydoc pydoc_data pyexpat queue quopri random re readline reprlib resource rlcompleter runpy sched
    secrets select selectors shelve shlex shutil signal site smtplib sndhdr socket socketserver spwd sqlite3
    sre_compile sre_constants sre_parse ssl stat statistics string stringprep struct subprocess sunau symtable
    sys sysconfig syslog tabnanny tarfile telnetlib tempfile termios textwrap this threading time timeit tkinter
    token tokenize tomllib trace traceback tracemalloc tty turtle turtledemo types typing unicodedata unittest
    urllib uu uuid venv warnings wave weakref webbrowser winreg winsound wsgiref xdrlib xml xmlrpc zipapp
    zipfile zipimport zlib zoneinfo
""".split())


def make_prompts(seed: int = 0) -> list:
    """Stage-A prompts: every topic with every topic template, plus stories, code tasks, standard-library modules
    and list-formatting tasks; deduplicated, in a fixed shuffled order (the same for a given seed)."""
    rng = random.Random(seed)
    modules = list(PROMPT_MODULES)
    out = set()
    for topic in TOPICS:
        for t in DIRECT:
            out.add(t.format(topic=topic, topic2=rng.choice(TOPICS), person=rng.choice(PEOPLE),
                             event=rng.choice(EVENTS), code=rng.choice(CODE_TASKS), module=rng.choice(modules)))
    for person in PEOPLE:
        for event in EVENTS:
            for t in STORY_TEMPLATES:
                out.add(t.format(person=person, event=event))
    for module in modules:
        out.add(MODULE_TEMPLATE.format(module=module))
    for _ in range(len(TOPICS)):
        out.add(LIST_TASK.format(items=", ".join(rng.sample(TOPICS, rng.randint(4, 9)))))
    prompts = sorted(p for p in out if not _held_out(p))
    rng.shuffle(prompts)
    return prompts


_CODE_BLOCK = re.compile(r"```(?:python)?\n(.*?)```", re.S)
_BUGS = ((" + ", " - "), (" <= ", " < "), (" > ", " >= "), ("[0]", "[1]"), (" == ", " != "), ("return ", "print("))


def make_followup_prompts(pairs: list, doc_texts: list = (), seed: int = 0) -> list:
    """Stage-B prompts from stage-A ``(prompt, answer)`` pairs (and optional documentation snippets)."""
    rng = random.Random(seed)
    out = []
    for prompt, answer in pairs:
        answer = answer.strip()
        if len(answer) < 200:
            continue
        code = _CODE_BLOCK.search(answer)
        if code and len(code.group(1)) > 40:
            src = code.group(1).rstrip()
            t = rng.choice(ABOUT_CODE)
            if t.startswith("Fix"):
                bug = rng.choice([b for b in _BUGS if b[0] in src] or [("", "")])
                src = src.replace(bug[0], bug[1], 1) if bug[0] else src
            out.append(t.format(text=src))
        elif "email" in prompt.lower():
            out.append(rng.choice(ABOUT_EMAIL).format(text=answer[:1500]))
        else:
            out.append(rng.choice(ABOUT_TEXT).format(text=answer[:1500]))
    for doc in doc_texts:
        out.append(rng.choice(ABOUT_DOC).format(text=doc[:1200]))
    out = [p for p in out if not _held_out(p)]
    rng.shuffle(out)
    return out


def doc_snippets(limit: int | None = None, seed: int = 0) -> list:
    """Paragraph-sized pieces of the standard library's docstrings (PSF licence)."""
    from .train import stdlib_texts

    rng = random.Random(seed)
    snippets = []
    for text in stdlib_texts():
        parts = [p for p in text.split("\n\n") if 200 <= len(p) <= 1200]
        snippets.extend(rng.sample(parts, min(3, len(parts))))
    rng.shuffle(snippets)
    return snippets[:limit]


COMPLETE = "complete"  # written into a stage's folder once every batch of its prompts has a shard


@torch.inference_mode()
def generate_answers(target, prompts: list, out_dir, *, batch_size: int = 256, max_new_tokens: int = 256,
                     temperature: float = 0.0, max_prompt_tokens: int = 512, seed: int = 0,
                     deadline: float | None = None, precision: str = "float32", progress: bool = True,
                     log=print) -> Path:
    """Decode every prompt with the target (greedy, or sampled at ``temperature``) in batches of ``batch_size``.

    Writes ``out_dir/shard_NNNNN.pt`` per batch (``tokens``: prompt + answer ids of each sequence, flat;
    ``lengths``; ``answer_start``; ``dtype``: the arithmetic that decoded them), skipping shards that exist, so a
    re-run resumes (with the batch size the stage began with), and ``out_dir/complete`` once every batch has its
    shard. Stops early (cleanly, at a batch boundary) once ``time.time()`` passes ``deadline``.
    ``precision``: ``"float32"`` (default: the target's own answers), ``"bfloat16"`` (a bfloat16 copy of the target
    decodes: about 2x the tokens/s on a CPU with bfloat16 units, answers that follow the float32 target's greedy
    path less closely, ~0.7 of 32-token continuations token for token on the bundled model; training recomputes the
    target's distributions in its own precision either way) or ``"auto"`` (bfloat16 where
    :func:`mtplab.train.bf16_pays` measures it clearly faster here).
    """
    import copy

    from tqdm.auto import tqdm

    from .train import PRECISIONS, bf16_pays

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok, model = target.tokenizer, target.model
    hidden = model.get_input_embeddings().weight.shape[1]
    dtype = torch.bfloat16 if precision == "bfloat16" or (precision == "auto" and bf16_pays(model.device, hidden)) \
        else model.dtype
    decoder = None  # the model that decodes: the target, or its bfloat16 copy (made when a batch needs it)
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(target.eos_token_ids)
    encoded = [ids for ids in (chat_ids(tok, p) for p in prompts) if len(ids) <= max_prompt_tokens]
    encoded.sort(key=len)  # similar lengths per batch: little padding
    batch_size = _stage_batch_size(out_dir, batch_size, log)
    batches = [encoded[i:i + batch_size] for i in range(0, len(encoded), batch_size)]
    eos = sorted(target.eos_token_ids)
    t0, new_tokens = time.perf_counter(), 0
    bar = tqdm(range(len(batches)), desc=f"answers (T={temperature})", unit="batch", disable=not progress)
    for b in bar:
        path = out_dir / f"shard_{b:05d}.pt"
        if path.exists():
            continue
        if deadline is not None and time.time() > deadline:
            log(f"deadline reached after {b} of {len(batches)} batches")
            break
        batch = batches[b]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=model.device)
        torch.manual_seed(seed * 100003 + b)
        sampled = temperature > 0
        if decoder is None:
            decoder = model if dtype == model.dtype else copy.deepcopy(model).to(dtype)
        out = decoder.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=sampled, temperature=temperature if sampled else None, top_k=0 if sampled else None,
                             top_p=1.0 if sampled else None, pad_token_id=pad, eos_token_id=eos)
        seqs, starts = [], []
        for s, row in zip(batch, out[:, width:].tolist()):
            end = next((i + 1 for i, t in enumerate(row) if t in target.eos_token_ids), len(row))
            seqs.append(s + row[:end])
            starts.append(len(s))
            new_tokens += end
        torch.save(dict(tokens=torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                        lengths=torch.tensor([len(s) for s in seqs]), answer_start=torch.tensor(starts),
                        dtype=str(dtype).removeprefix("torch.")), path)
        bar.set_postfix(tok_per_s=f"{new_tokens / (time.perf_counter() - t0):.0f}")
    if all((out_dir / f"shard_{b:05d}.pt").exists() for b in range(len(batches))):
        (out_dir / COMPLETE).write_text(f"{len(batches)} shards\n")
    return out_dir


def load_sequences(*dirs) -> list:
    """All ``(ids, answer_start)`` pairs from the shards in ``dirs`` (in shard order)."""
    seqs = []
    for d in dirs:
        for path in sorted(Path(d).glob("shard_*.pt")):
            shard = torch.load(path, weights_only=True)
            for piece, start in zip(shard["tokens"].split(shard["lengths"].tolist()), shard["answer_start"].tolist()):
                seqs.append((piece.tolist(), start))
    return seqs


def dev_answers(target, out_dir, *, max_new_tokens: int = 256, precision: str = "float32", progress: bool = True,
                log=print) -> list:
    """The target's greedy answers to the 30 dev prompts (:func:`mtplab.bench.load_prompts` ``"dev"``: the bench's
    ten kinds on other topics, none of them a training prompt, though a few topics, e.g. seasons or houseplants,
    come up in training prompts too), written to ``out_dir/dev_greedy`` (a re-run reads them back): sequences to
    validate a drafter on (:func:`mtplab.train.train_on_sequences`'s ``val_sequences``) that share no prompt and no
    answer with the corpus, as the bench prompts share none. A few minutes on a CPU."""
    from .bench import load_prompts

    prompts = [p["prompt"] for p in load_prompts("dev")]
    folder = generate_answers(target, prompts, Path(out_dir) / "dev_greedy", batch_size=len(prompts),
                              max_new_tokens=max_new_tokens, precision=precision, progress=progress, log=log)
    return load_sequences(folder)


def decoded_pairs(target, seqs) -> list:
    """``(prompt text, answer text)`` for sequences from :func:`load_sequences` (answers without special tokens)."""
    tok = target.tokenizer
    user = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)
    pairs = []
    for ids, start in seqs:
        m = user.search(tok.decode(ids[:start]))
        pairs.append((m.group(1) if m else "", tok.decode(ids[start:], skip_special_tokens=True)))
    return pairs


def _stage_batch_size(out_dir: Path, batch_size: int, log) -> int:
    """The batch size a stage's shards are cut with: shard ``b`` holds batch ``b``, so a stage resumes with the size
    it began with (``out_dir/batches.json``; for shards written before that record, the first shard's count), not
    a new ``batch_size``, which would skip some prompts and answer others twice. A stage with no shard yet takes
    the new ``batch_size`` (its record binds nothing: a stage begun at 512 on a GPU resumes at 128 on a CPU)."""
    import json

    record = out_dir / "batches.json"
    shards = any(out_dir.glob("shard_*.pt"))
    if record.exists() and shards:
        size = json.loads(record.read_text())["batch_size"]
    elif (out_dir / "shard_00000.pt").exists():
        size = len(torch.load(out_dir / "shard_00000.pt", weights_only=True)["lengths"])
    else:
        size = batch_size
    record.write_text(json.dumps(dict(batch_size=size)))
    if size != batch_size:
        log(f"{out_dir}: its shards hold batches of {size} prompts, so it resumes with {size} (not {batch_size})")
    return size


STAGES = ("a_greedy", "b_greedy", "a_t07", "b_t07")  # the answer corpus's folders, in the order they are made


def pack_stages(out_dir, dest, log=print) -> list:
    """Write each stage of the corpus in ``out_dir`` that has shards as ``dest/STAGE.tar.xz`` (its shards and
    records, byte for byte; about 0.5 MB for stage A's 1.02 M answer tokens), where that file is absent or holds
    fewer shards: a compact copy of hours of CPU generation to keep where the cache does not last (a repository).
    Returns the files written."""
    import tarfile

    out, dest = Path(out_dir), Path(dest)
    written = []
    for name in STAGES:
        shards = sorted((out / name).glob("shard_*.pt"))
        packed = dest / f"{name}.tar.xz"
        if not shards or (packed.exists() and _packed_shards(packed) >= len(shards)):
            continue
        dest.mkdir(parents=True, exist_ok=True)
        part = packed.with_suffix(".part")
        with tarfile.open(part, "w:xz", preset=9) as tar:
            for path in sorted((out / name).iterdir()):
                tar.add(path, arcname=f"{name}/{path.name}")
        part.replace(packed)
        log(f"packed {name}: {len(shards)} shards, {packed.stat().st_size / 1e6:.2f} MB in {packed}")
        written.append(packed)
    return written


def unpack_stages(src, out_dir, log=print) -> list:
    """Restore the stages packed in ``src`` (:func:`pack_stages`) into ``out_dir`` where that stage has no shard
    yet, so that :func:`build_answer_corpus` goes on from them (a stage with shards of its own is left alone).
    Returns the stages restored."""
    import tarfile

    out, restored = Path(out_dir), []
    for packed in sorted(Path(src).glob("*.tar.xz")):
        name = packed.name.removesuffix(".tar.xz")
        if name not in STAGES:
            raise ValueError(f"{packed}: not a stage of the answer corpus ({', '.join(STAGES)})")
        if any((out / name).glob("shard_*.pt")):
            log(f"{out / name} has shards of its own: {packed} not unpacked")
            continue
        with tarfile.open(packed, "r:xz") as tar:
            members = tar.getmembers()
            if any(not m.isfile() or Path(m.name).parent != Path(name) for m in members):
                raise ValueError(f"{packed}: holds more than the files of one stage folder {name}/")
            tar.extractall(out, members=members, filter="data")
        log(f"unpacked {name}: {_packed_shards(packed)} shards from {packed}")
        restored.append(name)
    return restored


def _packed_shards(packed: Path) -> int:
    import tarfile

    with tarfile.open(packed, "r:xz") as tar:
        return sum(Path(n).name.startswith("shard_") for n in tar.getnames())


def build_answer_corpus(target, out_dir, *, minutes: float | None = None, batch_size: int = 256,
                        max_new_tokens: int = 256, limit: int | None = None, precision: str = "float32",
                        log=print) -> list:
    """The shipped drafter's recipe: stage-A prompts -> greedy answers, stage-B prompts (about those answers and
    about standard-library docs) -> greedy answers, stage-A prompts again sampled at T=0.7, stage-B prompts again
    sampled at T=0.7 (added to reach 3 M answer tokens on a CPU; the shipped head saw the first three). Each stage
    writes shards under ``out_dir`` and resumes; ``minutes`` bounds all generation together (stages stop cleanly at a
    batch boundary); ``precision``: the decoding arithmetic (:func:`generate_answers`). Returns every
    ``(ids, answer_start)`` sequence generated so far."""
    import json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, log=log, precision=precision,
               deadline=None if minutes is None else time.time() + 60 * minutes)
    prompts_a = make_prompts()[:limit]
    (out / "prompts_a.json").write_text(json.dumps(prompts_a, indent=0))
    generate_answers(target, prompts_a, out / "a_greedy", **gen)
    b_path = out / "prompts_b.json"
    if not (out / "a_greedy" / COMPLETE).exists():  # stage B asks about all of stage A's answers: wait for them
        log("stage A is not complete (time ran out): stage B waits for a re-run")
    elif not b_path.exists():
        pairs = decoded_pairs(target, load_sequences(out / "a_greedy"))
        docs = doc_snippets(limit=None if limit is None else limit // 4)
        b_path.write_text(json.dumps(make_followup_prompts(pairs, docs), indent=0))
    if b_path.exists():
        generate_answers(target, json.loads(b_path.read_text()), out / "b_greedy", **gen)
    generate_answers(target, prompts_a, out / "a_t07", temperature=0.7, seed=1, **gen)
    if b_path.exists():
        generate_answers(target, json.loads(b_path.read_text()), out / "b_t07", temperature=0.7, seed=2, **gen)
    sequences = []
    for name in STAGES:
        seqs = load_sequences(out / name)
        log(f"{name}: {len(seqs)} sequences, {sum(len(i) - s for i, s in seqs)} answer tokens")
        sequences += seqs
    return sequences

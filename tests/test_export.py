"""``mtplab export-drafter --format speculators``: the folder it writes is read by speculators 0.9.0's own
``Eagle3DraftModel`` (on the CPU), whose forward gives the draft logits of mtplab's EAGLE-3 head at every
training-time-test step, and whose greedy drafts, mapped through ``d2t``, are the tokens mtplab's drafter drafts.

speculators is the optional ``export`` extra (scripts/setup.sh installs it): these tests fail, never skip,
without it.
"""
import importlib.metadata
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import mtplab
from mtplab.cli import main
from mtplab.drafters.eagle import Eagle3Drafter, Eagle3Head
from mtplab.drafters.mtp import MTPDrafter, MTPHead
from mtplab.models import forward, new_cache
from mtplab.export import SPECULATORS_VERSION, export_speculators
from mtplab.models import BUNDLED_HUB_ID
from mtplab.sampling import SamplingConfig

STEPS = 3


def speculators():
    """speculators' Eagle3 classes; a failure saying how to install them where they are missing."""
    how = ("install the `export` extra: bash scripts/setup.sh (or: pip install --no-deps followed by the pins of "
           "[project.optional-dependencies] export in pyproject.toml; speculators 0.9.0 declares transformers<=5.19, "
           "so pip cannot resolve it with its dependencies)")
    try:
        with warnings.catch_warnings():
            # importing speculators runs torch.compile (for its DFlash model), whose import of torch.utils.mkldnn
            # warns that torch.jit.script_method is deprecated: torch's own code (an error in this suite)
            warnings.filterwarnings("ignore", message="`torch.jit.script_method` is deprecated",
                                    category=DeprecationWarning)
            from speculators.models.eagle3 import Eagle3DraftModel, Eagle3SpeculatorConfig
    except ImportError as e:
        pytest.fail(f"speculators is needed to check the export against ({e}); {how}", pytrace=False)
    version = importlib.metadata.version("speculators")
    if version != SPECULATORS_VERSION:
        pytest.fail(f"the export is checked against speculators {SPECULATORS_VERSION}, found {version}; {how}",
                    pytrace=False)
    return Eagle3DraftModel, Eagle3SpeculatorConfig


def random_head(target, seed=1):
    """A fresh head with every weight drawn from N(0, 0.3²), so that no step's output is trivial."""
    torch.manual_seed(seed)
    head = Eagle3Head.for_target(target.model.config)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
    return head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama target (saved: speculators' verifier must be a folder offline) and an EAGLE-3 drafter
    bound to it, on a strict subset of the vocabulary."""
    target = mtplab.tiny_random_target(vocab_size=64, num_layers=4, hidden_size=32)
    folder = tmp_path_factory.mktemp("tiny-target")
    target.model.save_pretrained(folder)
    vocab_ids = torch.sort(torch.randperm(64, generator=torch.Generator().manual_seed(0))[:40]).values
    drafter = Eagle3Drafter(random_head(target), vocab_ids)
    drafter.bind(target)
    return target, str(folder), drafter


def features(target, layers, ids):
    """The target's hidden states entering ``layers`` at each position of ``ids``, concatenated: ``[1, n, 3H]``."""
    # mtplab's own removable hooks (tested equal to output_hidden_states in test_eagle.py): transformers'
    # output_hidden_states leaves hooks on the model that make it unpicklable, and the bundled target is shared
    with torch.no_grad():
        return forward(target.model, ids, new_cache(target.model), hidden=list(layers), logits=False)[1][None]


def load_speculators(folder, target):
    """The export as speculators loads it: ``Eagle3DraftModel.from_pretrained``, on eager attention, with the
    target's embedding."""
    Eagle3DraftModel, Eagle3SpeculatorConfig = speculators()
    config = Eagle3SpeculatorConfig.from_pretrained(folder)
    # speculators' default attention, "simple_flex_attention", fails on the CPU for short sequences (its block mask
    # is built for 128-token blocks and flex_attention without torch.compile refuses a shorter one); "eager" is
    # transformers' reference attention, whose computation mtplab's Eagle3Attention reproduces.
    config.transformer_layer_config._attn_implementation = "eager"
    model = Eagle3DraftModel.from_pretrained(folder, config=config).eval()
    # What load_verifier_weights does when embed_tokens is unset (all NaN): copy the verifier's embedding. On
    # transformers 5.24 from_pretrained leaves the missing rows as uninitialised memory rather than NaN, so
    # speculators does not always copy it: set it here.
    with torch.no_grad():
        model.embed_tokens.weight.copy_(target.model.get_input_embeddings().weight)
    return model


def speculators_forward(model, aux, input_ids, steps=STEPS):
    """speculators' training-time-test forward: each step's logits over the draft vocabulary (captured from its
    lm_head) and its greedy draft indices."""
    logits = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: logits.append(out[0]))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # speculators 0.9.0 passes past_key_values to LlamaAttention, which transformers 5.24 deprecates (a
            # FutureWarning, an error in this suite); speculators' own call, not mtplab's.
            warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)
            drafts = model(hidden_states=aux, input_ids=input_ids, document_ids=torch.zeros_like(input_ids),
                           ttt_steps=steps)
    finally:
        hook.remove()
    return logits, [d[0] for d in drafts]


def mtplab_logits(drafter, aux, input_ids, steps=STEPS):
    """The same steps with mtplab's head (``Eagle3Head.unrolled``): step s reads the tokens speculators feeds it,
    ``input_ids`` shifted left by s (zero-padded), at speculators' positions 1 + arange(n) (RoPE makes only their
    differences matter; the same values make the sums identical). Logits over the draft vocabulary, in its order."""
    embed = drafter.target.model.get_input_embeddings()
    n = input_ids.shape[1]
    embeds = [embed(torch.cat([input_ids[:, s:], input_ids.new_zeros(1, s)], dim=1)) for s in range(steps)]
    vocab = torch.arange(drafter.target.vocab_size) if drafter.vocab_ids is None else drafter.vocab_ids
    with torch.no_grad():
        states = drafter.head.unrolled(aux, embeds, steps, positions=1 + torch.arange(n)[None])
        return [drafter.logits(g)[0][:, vocab] for g in states]


def check_export(folder, drafter, target):
    """Every check of an exported folder against speculators; an AssertionError names the one that failed."""
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    model = load_speculators(folder, target)
    vocab = torch.arange(target.vocab_size) if drafter.vocab_ids is None else drafter.vocab_ids

    # the keys: every weight speculators' model has, except the embedding (shared) and the verifier's head/norm
    # (its own, filled from the verifier); a missing or misnamed key would leave a weight unloaded
    wanted = set(model.state_dict()) - {"embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"}
    assert set(tensors) == wanted, f"keys: {sorted(set(tensors) ^ wanted)}"
    assert config["eagle_aux_hidden_state_layer_ids"] == drafter.head.target_layers, "layer ids"

    # the vocabulary mapping vLLM uses (d2t: target id = draft index + offset) and speculators' mask (t2d)
    if drafter.vocab_ids is None:
        assert model.d2t is None and model.t2d is None and config["draft_vocab_size"] == target.vocab_size, "d2t"
    else:
        assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool, "d2t/t2d dtypes"
        assert torch.equal(torch.arange(len(vocab)) + model.d2t, vocab), "d2t: draft index -> token id"
        assert torch.equal(model.t2d.nonzero().flatten(), vocab), "t2d: the draft vocabulary's tokens"
    # speculators takes the verifier's LM head rows where t2d is set: they must be the rows the export wrote
    assert torch.equal(model.verifier_lm_head.weight, model.lm_head.weight), "lm_head: rows of the draft vocabulary"
    assert torch.equal(model.lm_head.weight, target.model.get_output_embeddings().weight[vocab]), "lm_head"

    # the computation: speculators' forward against mtplab's head, step by step
    ids = torch.randint(0, target.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    aux = features(target, drafter.head.target_layers, ids[0].tolist())
    theirs, drafts = speculators_forward(model, aux, ids)
    ours = mtplab_logits(drafter, aux, ids)
    assert len(theirs) == len(ours) == STEPS
    for s in range(STEPS):
        assert theirs[s].shape == ours[s].shape, f"logits of step {s}: shapes"
        assert torch.allclose(theirs[s], ours[s], atol=1e-5, rtol=1e-5), \
            f"logits of step {s}: differ by up to {(theirs[s] - ours[s]).abs().max():.3g}"
        assert torch.equal(drafts[s], ours[s].argmax(-1)), f"logits of step {s}: argmax"
    return config, tensors


@pytest.mark.parametrize("vocabulary", ["subset", "full"])
def test_speculators_reads_the_export_and_computes_the_same_draft_logits(tiny, tmp_path, vocabulary):
    target, verifier, drafter = tiny
    if vocabulary == "full":
        drafter = Eagle3Drafter(drafter.head, None)
        drafter.bind(target)
    out = export_speculators(drafter, tmp_path / "out", verifier)
    config, tensors = check_export(out, drafter, target)
    assert "embed_tokens.weight" not in tensors  # vLLM shares the target's embedding
    assert config["draft_vocab_size"] == (40 if vocabulary == "subset" else 64)
    assert ("d2t" in tensors) == ("t2d" in tensors) == (vocabulary == "subset")


def test_the_config_is_what_speculators_writes(tiny, tmp_path):
    """config.json equals speculators' own Eagle3DraftModel.save_pretrained for the same settings, built as its
    converter builds them, but for ``auto_map``, which the export leaves out (see mtplab.export)."""
    Eagle3DraftModel, Eagle3SpeculatorConfig = speculators()
    from speculators.config import SpeculatorsConfig, VerifierConfig
    from speculators.proposals.greedy import GreedyTokenProposalConfig

    _, verifier, drafter = tiny
    ours = json.loads((export_speculators(drafter, tmp_path / "ours", verifier, speculative_tokens=5) /
                       "config.json").read_text())
    config = Eagle3SpeculatorConfig(
        transformer_layer_config=drafter.head.layer_config, draft_vocab_size=len(drafter.vocab_ids),
        norm_before_residual=False, target_hidden_size=32, eagle_aux_hidden_state_layer_ids=drafter.head.target_layers,
        speculators_config=SpeculatorsConfig(
            algorithm="eagle3", proposal_methods=[GreedyTokenProposalConfig(speculative_tokens=5)],
            default_proposal_method="greedy", verifier=VerifierConfig.from_pretrained(verifier)))
    Eagle3DraftModel(config).save_pretrained(tmp_path / "theirs")
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert theirs.pop("auto_map") == {"": "config.Eagle3SpeculatorConfig"}
    assert ours == theirs
    assert ours["speculators_config"]["verifier"] == {"architectures": ["LlamaForCausalLM"], "name_or_path": verifier}


MUTATIONS = {  # a broken export, and the check of check_export that must catch it
    "d2t off by one": ("d2t", lambda t, c: t.update(d2t=t["d2t"] + 1)),
    "t2d shifted": ("t2d", lambda t, c: t.update(t2d=t["t2d"].roll(1))),
    "lm_head rows reversed": ("lm_head", lambda t, c: t.update({"lm_head.weight": t["lm_head.weight"].flip(0)})),
    "gate and up swapped": ("logits", lambda t, c: t.update({
        "layers.0.mlp.gate_proj.weight": t["layers.0.mlp.up_proj.weight"],
        "layers.0.mlp.up_proj.weight": t["layers.0.mlp.gate_proj.weight"]})),
    "o_proj transposed": ("logits", lambda t, c: t.update({
        "layers.0.self_attn.o_proj.weight": t["layers.0.self_attn.o_proj.weight"].t().contiguous()})),
    "hidden_norm misnamed": ("keys", lambda t, c: t.update({
        "layers.0.hidden_norm.scale": t.pop("layers.0.hidden_norm.weight")})),
    "norm_before_residual": ("logits", lambda t, c: c.update(norm_before_residual=True)),
    "layer ids reversed": ("layer ids", lambda t, c: c.update(
        eagle_aux_hidden_state_layer_ids=c["eagle_aux_hidden_state_layer_ids"][::-1])),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_a_broken_export_fails_the_check(tiny, tmp_path, mutation):
    target, verifier, drafter = tiny
    out = export_speculators(drafter, tmp_path / "out", verifier)
    check_export(out, drafter, target)  # intact: passes
    caught_by, mutate = MUTATIONS[mutation]
    tensors, config = load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())
    mutate(tensors, config)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match=caught_by):
        check_export(out, drafter, target)


def test_speculators_greedy_drafts_through_d2t_are_the_drafters_own(tiny, tmp_path):
    """Drafting with the folder as vLLM would (speculators' model, its argmax mapped to token ids through d2t) gives
    the tokens mtplab's drafter drafts greedily (its own KV-cached ``propose``, not ``unrolled``)."""
    target, verifier, drafter = tiny
    model = load_speculators(export_speculators(drafter, tmp_path, verifier), target)
    for seed in range(3):
        prompt = torch.randint(0, 64, (10,), generator=torch.Generator().manual_seed(seed)).tolist()
        m = len(prompt) - 1  # positions 0 .. m-1 have the target's features and the token after them
        aux = features(target, drafter.head.target_layers, prompt[:-1])[0]
        drafter.reset(prompt)
        drafter.observe(list(aux), None)
        ours = drafter.propose(prompt, STEPS, SamplingConfig(), torch.Generator().manual_seed(0)).tokens
        # speculators: feature t is read with the token after t; step s at position m-1 reads the token s places
        # on, so there come the drafts d1 .. d_{STEPS-1} (with feature rows that no earlier row attends to)
        input_ids = torch.tensor([prompt[1:] + ours[:-1]])
        rows = torch.cat([aux, aux.new_zeros(STEPS - 1, aux.shape[1])])[None]
        _, drafts = speculators_forward(model, rows, input_ids)
        theirs = [int(d[m - 1] + model.d2t[d[m - 1]]) for d in drafts]
        assert theirs == ours, (seed, theirs, ours)


def test_export_errors(tiny, tmp_path):
    target, verifier, drafter = tiny
    mtp = MTPDrafter(MTPHead(32, 1), None)
    mtp.bind(target)
    with pytest.raises(ValueError, match="only EAGLE-3 drafters export.*MTPDrafter"):
        export_speculators(mtp, tmp_path, verifier)
    with pytest.raises(ValueError, match="not bound to its target.*LM head"):
        export_speculators(Eagle3Drafter(drafter.head, drafter.vocab_ids), tmp_path, verifier)
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_speculators(drafter, tmp_path, verifier, dtype="float64")
    with pytest.raises(ValueError, match="speculative_tokens must be"):
        export_speculators(drafter, tmp_path, verifier, speculative_tokens=0)
    assert not (tmp_path / "config.json").exists()


def test_dtype(tiny, tmp_path):
    target, verifier, drafter = tiny
    out = export_speculators(drafter, tmp_path, verifier, dtype="bfloat16")
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for k, t in tensors.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert torch.equal(tensors["fc.weight"], drafter.head.fc.weight.to(torch.bfloat16))


def test_cli_refuses_a_drafter_of_another_kind(tmp_path, capsys):
    """Before loading any target: a named drafter of another kind, a folder holding an MTP head, no folder."""
    for drafter in ("mtp", "prompt-lookup"):
        with pytest.raises(SystemExit) as e:
            main(["export-drafter", str(tmp_path / "out"), "--format", "speculators", "--drafter", drafter])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "only EAGLE-3 drafters export" in err and "Traceback" not in err
    mtp = MTPDrafter(MTPHead(32, 1), None)
    mtp.save(tmp_path / "mtp")
    with pytest.raises(SystemExit) as e:
        main(["export-drafter", str(tmp_path / "out"), "--format", "speculators", "--drafter", str(tmp_path / "mtp")])
    assert e.value.code == 2
    assert "only EAGLE-3 drafters export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["export-drafter", str(tmp_path / "out"), "--format", "speculators", "--drafter", str(tmp_path / "no")])
    assert e.value.code == 2 and "no such folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_exports_a_drafter_of_the_bundled_target(bundled, tmp_path, capsys):
    """The command on the bundled target: a fresh head saved as mtplab saves drafters, exported in bfloat16 for the
    hub's SmolLM2 (the default verifier); speculators reads its config and weights, and a float32 export checked
    against the local copy of the target (speculators reads the verifier's files) gives the same draft logits."""
    Eagle3DraftModel, Eagle3SpeculatorConfig = speculators()
    vocab_ids = torch.arange(0, bundled.vocab_size, 48)  # 1024 tokens
    drafter = Eagle3Drafter(random_head(bundled), vocab_ids)
    drafter.bind(bundled)
    drafter.save(tmp_path / "eagle")
    out = tmp_path / "out"
    assert main(["export-drafter", str(out), "--format", "speculators", "--drafter", str(tmp_path / "eagle"),
                 "--speculative-tokens", "4", "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["speculators_config"]["verifier"] == {"architectures": ["LlamaForCausalLM"],
                                                        "name_or_path": BUNDLED_HUB_ID}
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 4
    assert config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert config["draft_vocab_size"] == 1024 and config["dtype"] == "bfloat16"
    # offline, speculators cannot fetch the hub verifier: read the config and the weights without it
    spec = Eagle3SpeculatorConfig.from_pretrained(out)
    spec.transformer_layer_config._attn_implementation = "eager"  # see load_speculators
    model = Eagle3DraftModel(spec)
    missing, unexpected = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert sorted(missing) == ["embed_tokens.weight", "verifier_lm_head.weight", "verifier_norm.weight"]
    assert unexpected == []
    assert torch.equal(model.d2t + torch.arange(1024), vocab_ids)
    # float32, against the bundled target's local folder
    exported = export_speculators(drafter, tmp_path / "f32", str(mtplab.fetch_bundled()))
    check_export(exported, drafter, bundled)

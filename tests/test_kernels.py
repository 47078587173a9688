"""Measured few-row kernels (mtplab.kernels): exact against F.linear, cached per machine and shape, scoped to
mtplab's own forward, and refused with a clear error for a bad MTPLAB_KERNELS."""
import io
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtplab
from mtplab import kernels, models
from mtplab.decoder import SpeculativeDecoder

from conftest import tiny


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPLAB_KERNEL_CACHE", str(tmp_path))
    return tmp_path


def tuned_tiny(seed=0, hidden_size=32, rows=range(1, 6)):
    target = mtplab.tiny_random_target(vocab_size=64, seed=seed, hidden_size=hidden_size, num_layers=2)
    kernels.tune(target.model, models.kernel_pass(target.model), reps=1, rows=rows, progress=False)
    plan = kernels.apply(target.model)
    assert plan is not None and plan.modules
    return target


def force(model, name):
    """Every planned linear of ``model`` runs kernel ``name`` at every row count."""
    kernel = kernels.KERNELS[name]
    for m in kernels.plan_of(model).modules:
        extra = {name: kernel.prepare(m.weight.detach())} if kernel.copies else {}
        kernels._CHOICES[m] = kernels._Choice([kernel] * kernels.MAX_ROWS, extra)


def last_logits(model, ids, n=5):
    """Logits of a pass over the last ``n`` of ``ids`` after the rest as context."""
    cache = models.new_cache(model)
    with torch.inference_mode():
        models.forward(model, ids[:-n], cache, logits=False)
        return models.forward(model, ids[-n:], cache)[0]


def plain_logits(model, ids, n=5):
    plan = kernels._PLANS.pop(model)
    try:
        return last_logits(model, ids, n)
    finally:
        kernels._PLANS[model] = plan


@pytest.mark.parametrize("name", list(kernels.KERNELS))
def test_every_kernel_matches_f_linear_and_keeps_greedy_output(kernel_cache, name):
    why = kernels.unavailable(name)
    if why is not None:
        pytest.fail(f"kernel {name} cannot run on this machine: {why}")
    target = tuned_tiny()
    model = target.model
    ids = [(3 * i + 1) % 64 for i in range(20)]
    want = plain_logits(model, ids)
    force(model, name)
    assert (last_logits(model, ids) - want).abs().max() < 1e-4
    # the same tokens as plain greedy decoding, drafting with prompt lookup so passes run 1..5 rows
    kernels_trace = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(1), num_draft_tokens=4,
                                       schedule="constant").generate(ids, max_new_tokens=24)
    plan = kernels._PLANS.pop(model)
    plain_trace = SpeculativeDecoder(target, None).generate(ids, max_new_tokens=24)
    kernels._PLANS[model] = plan
    assert kernels_trace.token_ids == plain_trace.token_ids


def test_stream_kernel_rows_and_bias():
    """The C kernel on awkward shapes: an output count that is not a multiple of 4, an input size that is not a
    multiple of 16, up to MAX_ROWS rows, with a bias."""
    if kernels.unavailable("stream"):
        pytest.fail(f"the stream kernel cannot run here: {kernels.unavailable('stream')}")
    torch.manual_seed(0)
    w, b = torch.randn(37, 45), torch.randn(37)
    for n in range(1, kernels.MAX_ROWS + 1):
        x = torch.randn(1, n, 45)
        got = kernels.KERNELS["stream"].run(x, w, b, None)
        assert got.shape == (1, n, 37)
        assert torch.allclose(got, F.linear(x, w, b), atol=1e-5), n


def test_use_swaps_modules_only_inside_the_block(kernel_cache):
    target = tuned_tiny()
    model = target.model
    linears = kernels.plan_of(model).modules
    assert all(type(m) is nn.Linear for m in linears)
    with kernels.use(model):
        assert all(type(m) is kernels.TunedLinear for m in linears)
        with kernels.use(model):  # re-entrant
            pass
        assert all(type(m) is kernels.TunedLinear for m in linears)
    assert all(type(m) is nn.Linear and "_mtplab_choice" not in m.__dict__ for m in linears)


def test_users_model_pickles_saves_and_generates_after_mtplab(kernel_cache, tmp_path):
    target = tuned_tiny()
    model = target.model
    trace = SpeculativeDecoder(target, mtplab.PromptLookupDrafter(1), num_draft_tokens=3, schedule="constant").generate(
        [1, 2, 3, 4, 1, 2, 3], max_new_tokens=12)
    clone = pickle.loads(pickle.dumps(model))
    assert all(type(m) is nn.Linear for m in clone.modules() if isinstance(m, nn.Linear))
    model.save_pretrained(tmp_path / "saved")
    again = type(model).from_pretrained(tmp_path / "saved")
    ids = torch.tensor([[1, 2, 3, 4, 1, 2, 3]])
    out = again.generate(ids, max_new_tokens=12, do_sample=False)[0, 7:].tolist()
    assert out == model.generate(ids, max_new_tokens=12, do_sample=False)[0, 7:].tolist() == trace.token_ids
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)  # no extra tensors ride along in the state dict
    assert set(torch.load(io.BytesIO(buf.getvalue()), weights_only=True)) == set(model.state_dict())


def test_tuning_is_cached_and_invalidated(kernel_cache, monkeypatch):
    target = mtplab.tiny_random_target(vocab_size=64, seed=0, hidden_size=32)
    calls = []
    run = models.kernel_pass(target.model)

    def counting(n):
        calls.append(n)
        run(n)

    kernels.tune(target.model, counting, reps=1, rows=range(1, 3), progress=False)
    assert calls
    files = list(kernel_cache.glob("*.json"))
    assert len(files) == 1
    calls.clear()
    kernels.tune(target.model, counting, reps=1, rows=range(1, 3), progress=False)
    assert calls == []  # the same machine, torch and shapes: reused
    other = mtplab.tiny_random_target(vocab_size=64, seed=0, hidden_size=48)  # new shapes: measured
    other_run = models.kernel_pass(other.model)
    kernels.tune(other.model, lambda n: (calls.append(n), other_run(n)), reps=1, rows=range(1, 3), progress=False)
    assert calls
    calls.clear()
    monkeypatch.setattr(torch, "__version__", "0.0-another")  # another torch: another cache file, measured again
    kernels.tune(target.model, counting, reps=1, rows=range(1, 3), progress=False)
    assert calls and len(list(kernel_cache.glob("*.json"))) == 2


def test_copies_stay_within_the_budget(kernel_cache):
    target = tuned_tiny()
    model = target.model
    shapes = {kernels.shape_key(m) for m in kernels.plan_of(model).modules}
    fake = {"shapes": {s: {"linear": [2.0] * 16, "transposed": [1.0] * 16} for s in shapes}}
    plan = kernels.apply(model, fake, budget=0.0)
    assert plan.extra_bytes == 0 and all(set(v) == {"linear"} for v in plan.choices.values())
    plan = kernels.apply(model, fake, budget=10.0)
    assert plan.extra_bytes > 0 and all(set(v) == {"transposed"} for v in plan.choices.values())
    kernels.forget(model)


def test_bad_mtplab_kernels_value_is_refused(monkeypatch):
    monkeypatch.setenv("MTPLAB_KERNELS", "fastest")
    with pytest.raises(ValueError, match=r"MTPLAB_KERNELS must be one of \('auto', 'off'\), got 'fastest'"):
        tiny()
    monkeypatch.setenv("MTPLAB_KERNELS", "off")
    assert kernels.prepare(tiny().model, lambda n: None) is None


@pytest.mark.slow
def test_bundled_target_runs_tuned_kernels_exactly(bundled):
    """The bundled target gets a plan on this machine; a pass over 1..16 tokens gives the logits of F.linear."""
    model = bundled.model
    if kernels.mode() == "off":
        pytest.fail("MTPLAB_KERNELS=off: this test checks the tuned kernels")
    plan = kernels.plan_of(model)
    assert plan is not None and len(plan.modules) == sum(isinstance(m, nn.Linear) for m in model.modules())
    assert plan.extra_bytes <= kernels.COPY_BUDGET * plan.model_bytes
    ids = bundled.encode("Explain why the sky is blue.")
    for n in (1, 2, 5, 9, 16):
        seq = ids + list(range(100, 100 + n))
        assert (last_logits(model, seq, n) - plain_logits(model, seq, n)).abs().max() < 1e-4
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    pickle.dumps(model)


def test_plan_is_used_only_where_whole_passes_got_faster(kernel_cache, monkeypatch):
    """check_whole_passes keeps the plan for the pass sizes it made faster; models.forward then swaps the modules
    for those sizes only."""
    target = tuned_tiny()
    model = target.model
    plan = kernels.plan_of(model)
    fake = {"plain": {n: 1.0 for n in range(1, 17)}, "tuned": {n: 0.9 if n in (3, 4) else 1.1 for n in range(1, 17)}}
    monkeypatch.setattr(kernels, "measure_passes", lambda *a, **k: fake)
    kernels.check_whole_passes(model, lambda n: None, refresh=True, progress=False)
    assert [plan.engaged(n) for n in range(1, 17)] == [n in (3, 4) for n in range(1, 17)]
    seen = []
    probe = plan.modules[0]
    handle = probe.register_forward_hook(lambda m, a, o: seen.append((a[0].numel() // a[0].shape[-1], type(m))))
    try:
        cache = models.new_cache(model)
        with torch.inference_mode():
            for n in (1, 2, 3, 4, 5):
                models.forward(model, list(range(1, 1 + n)), cache)
    finally:
        handle.remove()
    assert [t is kernels.TunedLinear for _, t in seen] == [False, False, True, True, False]


def test_fused_layers_are_used_only_where_whole_passes_got_faster_still(kernel_cache, monkeypatch):
    """check_whole_passes also times the fused C layers and sends a pass size through them only where they beat
    what the plan would use there; models.forward follows that, and the verify curve reads the used variant."""
    from mtplab import costs, fastpath

    target = tuned_tiny()
    model = target.model
    plan = kernels.plan_of(model)
    fake = {"plain": {n: 1.0 for n in range(1, 17)}, "tuned": {n: 0.9 if n in (3, 4) else 1.1 for n in range(1, 17)},
            "fused": {n: 0.8 if n in (1, 4) else 1.0 for n in range(1, 17)}}
    monkeypatch.setattr(kernels, "measure_passes", lambda *a, **k: fake)
    kernels.check_whole_passes(model, lambda n: None, refresh=True, progress=False)
    assert [plan.used(n) for n in range(1, 6)] == ["fused", "plain", "tuned", "fused", "plain"]
    used = {n: fake[plan.used(n)][n] for n in range(1, 17)}  # the fused passes are what the verify curve reads
    assert costs.verify_curve(target, progress=False) == costs.as_verify_cost(used)
    assert costs.as_verify_cost(used) != costs.as_verify_cost({n: fake["plain"][n] for n in range(1, 17)})
    calls, swapped = [], []
    real = fastpath._fused_layers

    def counted(d, x, *a):
        calls.append(x.shape[0])
        swapped.append(type(plan.modules[0]) is not nn.Linear)  # the fused layers do not call the modules
        return real(d, x, *a)

    monkeypatch.setattr(fastpath, "_fused_layers", counted)
    cache = models.new_cache(model)
    with torch.inference_mode():
        for n in (1, 2, 3, 4, 5):
            models.forward(model, list(range(1, 1 + n)), cache)
    assert calls == [1, 4] and swapped == [False, False]


@pytest.fixture
def default_widths():
    """Put the C kernel's block widths back to the source's after a test that sets them."""
    if kernels.unavailable("stream"):
        pytest.fail(f"the stream kernel cannot run here: {kernels.unavailable('stream')}")
    yield dict(kernels._DEFAULT_WIDTHS)
    for n, w in kernels._DEFAULT_WIDTHS.items():
        kernels.set_block_width(n, w)


def test_block_width_never_changes_a_result(default_widths):
    """Every width the C kernel has for a row count gives the same numbers bit for bit (each output is summed in the
    same order), on awkward shapes: outputs not a multiple of 4, inputs not a multiple of the vector width. (GCC fused
    products into FMAs in some blocks and not in others until the kernel wrote its FMAs out itself.)"""
    torch.manual_seed(1)
    w = torch.randn(37, 45)
    for n in range(1, kernels.MAX_ROWS + 1):
        x = torch.randn(n, 45)
        want = kernels.KERNELS["stream"].run(x, w, None, None)
        assert torch.allclose(want, F.linear(x, w), atol=1e-5), n
        for width in kernels.width_options(n):
            kernels.set_block_width(n, width)
            assert kernels.block_width(n) == width
            assert torch.equal(kernels.KERNELS["stream"].run(x, w, None, None), want), (n, width)
        kernels.set_block_width(n, default_widths[n])
    assert kernels.width_options(1) == [1, 2, 4] and kernels.width_options(5) == [1, 2]
    assert kernels.width_options(9) == [1]


def test_the_c_kernel_uses_the_machines_own_vector_width(default_widths):
    """16 float lanes with AVX-512, 8 with AVX2, 4 otherwise: a wider vector than the machine has is kept in memory
    by GCC (on an AVX2-only EPYC a 2-token pass then cost 1.6x a 1-token one)."""
    if not Path("/proc/cpuinfo").exists():
        pytest.fail("this test reads the CPU's vector extensions from /proc/cpuinfo (Linux), which is missing here")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):  # x86; aarch64
            flags = set(line.split(":", 1)[1].split())
            break
    want = 16 if "avx512f" in flags else 8 if "avx" in flags else 4
    assert kernels.vector_lanes() == want, (sorted(f for f in flags if f.startswith("avx")), want)


def test_a_bad_block_width_is_refused_with_the_allowed_ones(default_widths):
    with pytest.raises(ValueError, match=r"must be one of \[1, 2\], got 4"):
        kernels.set_block_width(5, 4)
    with pytest.raises(ValueError, match=r"must be one of \[1, 2, 4\], got 3"):
        kernels.set_block_width(2, 3)
    with pytest.raises(ValueError, match=r"rows must be an integer in \[1, 16\], got 17"):
        kernels.set_block_width(17, 1)
    assert [kernels.block_width(n) for n in (2, 5, 17)] == [default_widths[2], default_widths[5], -1]
    assert kernels.by_rows([4, 4, 1, 2, 2]) == "1-2: 4, 3: 1, 4-5: 2"  # how bench --costs prints them


def test_block_widths_are_measured_on_fused_passes_chosen_and_cached(kernel_cache, default_widths):
    """tune_widths times whole fused passes with each width per row count and sets the fastest; a width other than
    the source's must be 2% faster; the second call reads the cache (and sets the same widths) without timing."""
    import time

    from mtplab import fastpath

    model = mtplab.tiny_random_target(vocab_size=64, seed=0, hidden_size=32, num_layers=2).model
    fast = {n: (2 if n % 2 else 1) for n in range(1, 9)}  # the width each pass size runs fastest with, here
    timed = []

    def fake_pass(n):
        timed.append((n, model in fastpath._FUSED))
        time.sleep(0.002 if kernels.block_width(n) == fast.get(n, 1) else 0.008)

    chosen = kernels.tune_widths(model, fake_pass, progress=False, reps=3)
    assert chosen == fast
    assert {n: kernels.block_width(n) for n in range(1, 17)} == {**{n: 1 for n in range(1, 17)}, **fast}
    assert all(fused for n, fused in timed[1:])  # every pass after the warm-up is a fused one
    assert {n for n, _ in timed} == set(range(1, 9))  # 9..16 rows have one width only: nothing to time
    # each width only where the kernel has it (a warm-up, then an untimed and a timed pass per repetition)
    assert len(timed) == 1 + 3 * 2 * sum(len(kernels.width_options(n)) for n in range(1, 9)) == 121
    for n, w in default_widths.items():
        kernels.set_block_width(n, w)
    assert kernels.tune_widths(model, lambda n: pytest.fail("timed again"), progress=False) == fast
    assert kernels.block_width(1) == 2
    # nearly as fast is not enough: the source's width stays unless another one is 2% faster
    assert kernels.choose_widths({3: {4: 1.0, 2: 0.99, 1: 1.01}, 6: {2: 1.0, 1: 0.97}}) == {3: 4, 6: 1}


def test_each_timed_whole_pass_follows_an_untimed_one_of_its_kind(kernel_cache):
    """measure_passes times a pass right after an untimed pass of the same variant and size, as a decoding step
    follows a step (a pass that follows another kind of pass is slower on some CPUs). A fake pass that is slow
    only when the pass before it was of another kind shows which one was timed."""
    import time
    from contextlib import contextmanager

    model = mtplab.tiny_random_target(vocab_size=64, seed=0, hidden_size=32, num_layers=2).model
    state = {"variant": None, "last": None}

    def in_variant(name):
        @contextmanager
        def ctx():
            state["variant"] = name
            yield
        return ctx

    def fake_pass(n):
        kind = (state["variant"], n)
        time.sleep(0.001 if kind == state["last"] else 0.012)
        state["last"] = kind

    got = kernels.measure_passes(model, fake_pass, rows=[1, 3], reps=3, variants=("a", "b"), progress=False,
                                 contexts={"a": in_variant("a"), "b": in_variant("b")})
    assert all(s < 0.008 for d in got.values() for s in d.values()), got

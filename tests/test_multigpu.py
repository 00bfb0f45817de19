"""Several GPUs in one machine (issue 24, part 1): ComfyUI 0.29's multi-GPU evaluates the conds of one step on several
devices at once, each device with its own deep clone of the model, the chunks in worker threads that share the
sampling run's transformer_options (so our RunState) and name their device in transformer_options
["multigpu_thread_device"]. The pack must give the sequential run's results bit for bit there.

On every ComfyUI version the same clone-and-thread pattern is driven directly (`split_calc`: each cond of a step on
its own "device", a clone whose diffusion model is a deep copy, in its own thread, started together); on CPU the
devices are names for two copies of the model on the same device, and forward hooks check that no thread touches
the other copy's modules (a layer projected with the main model's to_k/to_v would give the same numbers there, on
GPUs the wrong device). Where the ComfyUI has core's multi-GPU (0.29+), its own `_calc_cond_batch_multigpu` runs
too, with two CPU device keys (cpu, cpu:1) and its own worker thread pool."""
from __future__ import annotations

import copy
import threading

import pytest
import torch

import ipadapter_fixtures as fx
import test_attention_dit as flux_tests
import tiny_models
from test_attention_comfy import conds, make_story, patch

STEPS = 2
DEVICES = ("device0", "device1")


@pytest.fixture(scope="module")
def sd15():
    return tiny_models.make_model("sd15", seed=1)


@pytest.fixture(scope="module")
def flux():
    return tiny_models.make_dit("flux", seed=1)


def device_clone(patcher):
    """What core's deepclone_multigpu gives a device: a clone of the patcher (its model_options, wrappers, patches,
    callbacks) around its own copy of the model."""
    base = patcher.model
    # not copied: the patcher (the clone gets its own) and the model config (ComfyUI 0.29's does not deepcopy)
    model = copy.deepcopy(base, {id(base.current_patcher): None, id(base.model_config): base.model_config})
    clone = patcher.clone()
    clone.model = model
    model.current_patcher = clone
    return clone


def with_clones(patcher, devices=DEVICES):
    """A clone of `patcher` carrying model_options["multigpu_clones"] (device -> patcher), as core's guider sets it."""
    main = patcher.clone()
    clones = {devices[0]: main}
    for device in devices[1:]:
        clones[device] = device_clone(main)
    main.model_options["multigpu_clones"] = clones
    return main


class SplitCalc:
    """comfy.samplers._calc_cond_batch under core's multi-GPU pattern: cond i of a step goes to device i % n, every
    device's conds run in its own thread (started together, released by a barrier so they overlap) on that device's
    clone, with transformer_options["multigpu_thread_device"]; model_options without clones: the original."""

    def __init__(self, original):
        self.original = original
        self.threads = True  # False: the same chunks one after another on the sampling thread, on the main model
        self.calls = 0
        self.touched = []  # (thread name, which model) of every attn1 to_k/to_v call, from the forward hooks

    def __call__(self, model, conds_, x_in, timestep, model_options):
        clones = model_options.get("multigpu_clones")
        if not clones:
            return self.original(model, conds_, x_in, timestep, model_options)
        devices = list(clones)
        if not self.threads:
            options = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
            out = [torch.zeros_like(x_in) for _ in conds_]
            for i, cond in enumerate(conds_):
                if cond is not None:
                    only = [c if j == i else None for j, c in enumerate(conds_)]
                    out[i] = self.original(model, only, x_in, timestep, options)[i]
            return out
        self.calls += 1
        jobs: dict = {}
        for i, cond in enumerate(conds_):
            if cond is not None:
                jobs.setdefault(devices[i % len(devices)], []).append(i)
        results, errors = {}, []
        barrier = threading.Barrier(len(jobs))

        def work(device, indices):
            try:
                only = [cond if i in indices else None for i, cond in enumerate(conds_)]
                options = {k: v for k, v in model_options.items() if k != "multigpu_clones"}
                options["transformer_options"] = dict(model_options.get("transformer_options", {}),
                                                      multigpu_thread_device=device)
                barrier.wait()
                with torch.no_grad():  # grad mode is per thread: core's _handle_batch sets it the same way
                    out = self.original(clones[device].model, only, x_in, timestep, options)
                results.update({i: out[i] for i in indices})
            except BaseException as e:  # noqa: BLE001 (handed to the sampling thread, as core's pool does)
                errors.append(e)

        threads = [threading.Thread(target=work, args=(d, ix), name=str(d)) for d, ix in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [results[i] if i in results else torch.zeros_like(x_in) for i in range(len(conds_))]

    def watch(self, clones, suffixes=("attn1.to_k", "attn1.to_v")):
        """Forward hooks on modules of every device's model (attn1 to_k/to_v): which thread calls whose module."""
        handles = []
        for device, patcher in clones.items():
            for name, module in patcher.model.diffusion_model.named_modules():
                if name.endswith(suffixes):
                    def hook(_module, _args, _out, device=device):
                        self.touched.append((threading.current_thread().name, str(device)))
                    handles.append(module.register_forward_hook(hook))
        return handles


@pytest.fixture
def split(monkeypatch, pack):
    import comfy.samplers

    calc = SplitCalc(comfy.samplers._calc_cond_batch)
    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch", calc)
    return calc


def sample(model, positive, negative, panels, channels=4, size=8, seed=5, steps=STEPS, cfg=4.0):
    import comfy.sample

    latent = torch.zeros(panels, channels, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=seed)


def bank_runs(csa, patched, split, write_conds, read_conds, suffixes=None, **sample_args):
    """An identity bank written by two panels and read by a third, each cond of a step in its own thread on its own
    clone ("multi", the modules watched with `suffixes`) and in sequence ("sequential"): (written, read, the bank's
    entries) of each, sequential first."""
    from comfyui_storydiffusion.attention.bank import IdentityBank

    runs = []
    for threaded in (False, True):
        bank = IdentityBank()
        writer = with_clones(csa.with_bank(patched, csa.MODE_WRITE, bank))
        reader = with_clones(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2))
        split.threads = threaded
        watch = {} if suffixes is None else {"suffixes": suffixes}
        handles = split.watch(reader.model_options["multigpu_clones"], **watch) if threaded else ()
        try:
            written = sample(writer, *write_conds, 2, **sample_args)
            read = sample(reader, *read_conds, 1, **sample_args)
        finally:
            for h in handles:
                h.remove()
        runs.append((written, read, {k: v[0] for k, v in bank.entries.items()}))
    return runs


def check_threads(split, clones):
    """Every device's model was called, each only from its own thread."""
    seen = set(split.touched)
    assert {device for _, device in seen} == {str(d) for d in clones}
    assert all(thread == device for thread, device in seen), sorted(seen)


def run_both(split, patched, positive, negative, panels, run=None, **kw):
    """(sequential, multi-GPU) results of one sampling of `patched`: the same chunks of every step (one per cond)
    one after another on the main model, and concurrently in threads on per-device clones. Core's single-device
    path batches positive and negative into one call, which rounds differently (last bits) with or without this
    pack: close to both, the reference for bit equality is the same split run sequentially."""
    run = run or (lambda model: sample(model, positive, negative, panels, **kw))
    multi = with_clones(patched)
    split.threads = False
    sequential = run(multi)
    assert split.calls == 0
    split.threads = True
    handles = split.watch(multi.model_options["multigpu_clones"])
    try:
        threaded = run(multi)
    finally:
        for h in handles:
            h.remove()
    assert split.calls == STEPS
    batched = run(patched)
    assert torch.allclose(batched, sequential, rtol=1e-4, atol=1e-3)
    return sequential, threaded


# ---------------------------------------------------------------------------------------------------


def test_unet_csa_equals_the_sequential_run(csa, sd15, split):
    story = make_story([("Ann",), ("Ann", "Bob"), ("Bob",)])
    patched = patch(csa, sd15, story=story)
    positive, negative = conds("sd15", 3)
    sequential, threaded = run_both(split, patched, positive, negative, 3)
    assert torch.equal(sequential, threaded)
    check_threads(split, with_clones(patched).model_options["multigpu_clones"])
    assert not torch.equal(sequential, sample(sd15, positive, negative, 3))  # CSA did something


def test_unet_bank_write_and_read_equal_the_sequential_run(csa, sd15, split):
    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    positive, negative = conds("sd15", 2)
    read_positive, read_negative = conds("sd15", 1, seed=4)
    (w1, r1, e1), (w2, r2, e2) = bank_runs(csa, patched, split, (positive, negative), (read_positive, read_negative))
    assert torch.equal(w1, w2) and torch.equal(r1, r2)
    assert e1.keys() == e2.keys() and {k[2] for k in e1} == {"positive", "negative"}  # each role stored once
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    check_threads(split, {d: None for d in DEVICES})  # the read projected the bank with each device's own to_k/to_v


def test_flux_bank_write_and_read_equal_the_sequential_run(csa, flux, split):
    """The DiT bank (sampled image keys and values after RoPE, from the attention override) written by the identity
    panels and read by another panel, each cond of a step in its own thread on its own clone: what the sequential
    split run writes and reads, bit for bit, each role stored once."""
    story = flux_tests.make_story([("Ann",), ("Ann",), ("Ann",)])
    story = type(story)(characters=story.characters, panels=story.panels, identity_panels={"Ann": (0, 1)})
    patched = flux_tests.patch(csa, flux, rate=0.5, layer_choice="all blocks", story=story)
    positive, negative = flux_tests.conds(2)
    read_positive, read_negative = flux_tests.conds(1, seed=4)
    (w1, r1, e1), (w2, r2, e2) = bank_runs(csa, patched, split, (positive, negative), (read_positive, read_negative),
                                           suffixes=("img_attn.qkv", "linear1"), channels=16, cfg=3.0)
    assert torch.equal(w1, w2) and torch.equal(r1, r2)
    assert e1 and e1.keys() == e2.keys() and {k[2] for k in e1} == {"positive", "negative"}  # each role once
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    check_threads(split, {d: None for d in DEVICES})
    plain_read = sample(flux, read_positive, read_negative, 1, channels=16, cfg=3.0)
    assert not torch.equal(r1, plain_read)  # the read used the bank


def test_the_bank_writer_takes_two_threads_at_once(pack, tmp_path):
    """BankWriter.put from two threads in the same step (positive on one device, negative on the other; a step
    starts when both have finished the last, as core's evaluations do), many layers each, with a memory limit
    that moves finished steps to disk while the other thread writes: every entry once, what a sequential writer
    stores."""
    from comfyui_storydiffusion.attention.bank import IdentityBank

    layers, steps = 150, 3
    tokens = {(role, layer): torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(layer * 2 + i))
              for i, role in enumerate(("positive", "negative")) for layer in range(layers)}

    def fill(threaded):
        bank = IdentityBank(keep="auto")
        writer = bank.begin_write((0, 1), None, tuple(1.0 - i / steps for i in range(steps + 1)),
                                  planned_steps=lambda layer: steps, memory_limit=layers * 2 * 48 * 3 // 2,  # 1.5 steps of fp16 [2, 3, 4] entries
                                  spill_parent=str(tmp_path / ("threads" if threaded else "sequential")))
        barrier = threading.Barrier(2 if threaded else 1)

        def role_puts(role, step):
            barrier.wait()
            for layer in range(layers):
                writer.put(step, ("output", layer, 0), [role], tokens[(role, layer)], 16, evaluation=step + 1)

        for step in range(steps):
            if threaded:
                threads = [threading.Thread(target=role_puts, args=(r, step)) for r in ("positive", "negative")]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            else:
                role_puts("positive", step)
                role_puts("negative", step)
        writer.commit()
        return bank

    sequential, threaded = fill(False), fill(True)
    assert sequential.spill_folder is not None and threaded.spill_folder is not None  # the disk path was taken
    assert sequential.keys() == threaded.keys() and len(threaded.keys()) == 2 * steps * layers
    for step in range(steps):
        for layer in (0, layers // 2, layers - 1):
            for role in ("positive", "negative"):
                a = sequential.stored_tokens(step, ("output", layer, 0), [role], 16)
                b = threaded.stored_tokens(step, ("output", layer, 0), [role], 16)
                assert torch.equal(a, b)


def test_a_device_bank_read_keeps_one_decoded_step_per_device(pack, monkeypatch):
    """storage "device" with two devices reading in turn (core multi-GPU: the positive chunk on one GPU, the negative
    on another): each device decodes a step once and keeps it while the other reads its own (it used to be one step
    for one device at a time, so every layer call of the other device decoded again); a new step replaces only
    that device's; release() drops them all. "meta" stands for a second device on a CPU-only machine."""
    from comfyui_storydiffusion.attention.bank import IdentityBank

    bank = IdentityBank(storage="device")
    steps, layers = 2, 3
    writer = bank.begin_write((0, 1), None, (1.0, 0.5, 0.0), planned_steps=lambda layer: steps)
    for step in range(steps):
        for layer in range(layers):
            for role in ("positive", "negative"):
                writer.put(step, ("output", layer, 0), [role], torch.randn(1, 2, 3, 4), 16, evaluation=step + 1)
    writer.commit()
    loads = []
    real = IdentityBank._load_step
    monkeypatch.setattr(IdentityBank, "_load_step",
                        lambda self, step, device, *a, **k: loads.append((step, str(device))) or real(self, step, device, *a, **k))
    for step in range(steps):
        for layer in range(layers):
            for device, role in (("cpu", "positive"), ("meta", "negative")):
                out = bank.stored_tokens(step, ("output", layer, 0), [role], 16, device=device)
                assert out.device.type == device
        assert bank.decoded_steps() == {torch.device("cpu"): step, torch.device("meta"): step}
    assert loads == [(0, "cpu"), (0, "meta"), (1, "cpu"), (1, "meta")]
    bank.release()
    assert bank.decoded_steps() == {}


def test_flux_csa_equals_the_sequential_run(csa, flux, split):
    patched = flux_tests.patch(csa, flux, rate=0.5, layer_choice="all blocks")
    positive, negative = flux_tests.conds(3)
    sequential, threaded = run_both(split, patched, positive, negative, 3, channels=16, cfg=3.0)
    assert torch.equal(sequential, threaded)
    assert not torch.equal(sequential, sample(flux, positive, negative, 3, channels=16, cfg=3.0))


def test_per_frame_ipadapter_equals_the_sequential_run(sd15, split, comfy_nodes):
    import comfyui_storydiffusion.ipadapter.comfy_adapter as adapter

    patched = adapter.apply_per_frame_ipadapter(sd15, fx.tiny_ipadapter("sd15"), fx.frame_embeddings(3, 32, seed=1),
                                                None, 1.0, 0.0, 1.0)
    positive, negative = conds("sd15", 3)
    sequential, threaded = run_both(split, patched, positive, negative, 3)
    assert torch.equal(sequential, threaded)
    assert not torch.equal(sequential, sample(sd15, positive, negative, 3))


def test_run_state_counts_each_evaluation_once(csa, sd15, split, monkeypatch):
    """start_evaluation runs once per evaluation on the sampling thread, never in a device's thread."""
    from comfyui_storydiffusion.attention.run import RunState

    calls = []
    original = RunState.start_evaluation

    def record(self, sigma):
        calls.append(threading.current_thread().name)
        return original(self, sigma)

    monkeypatch.setattr(RunState, "start_evaluation", record)
    positive, negative = conds("sd15", 3)
    sample(with_clones(patch(csa, sd15)), positive, negative, 3)
    assert calls == [threading.current_thread().name] * STEPS


# ---------------------------------------------------------------------------------------------------
# core's own multi-GPU (ComfyUI 0.29+)


def core_multigpu():
    import comfy.samplers

    if not hasattr(comfy.samplers, "_calc_cond_batch_multigpu"):
        pytest.skip("this ComfyUI has no core multi-GPU (comfy/multigpu.py came with 0.29); the clone-and-thread "
                    "tests above drive the same pattern")
    import comfy.multigpu

    return comfy.multigpu


def core_clones(patcher):
    """Core's own deepclone_multigpu onto CPU device key cpu:1 (the loader factory gives a fresh copy of the
    model, as a core loader's cached_patcher_init does), then match_multigpu_clones, as create_multigpu_deepclones."""
    patcher = patcher.clone()
    patcher.cached_patcher_init = (lambda: device_clone(patcher), ())
    extra = patcher.deepclone_multigpu(new_load_device=torch.device("cpu", 1))
    extra.is_multigpu_base_clone = True
    patcher.set_additional_models("multigpu", [extra])
    patcher.match_multigpu_clones()
    (matched,) = patcher.get_additional_models_with_key("multigpu")
    return patcher, matched


def watch_threads(seen: set, patchers: dict) -> list:
    """Forward hooks on every attn1 to_k/to_v: (thread, name of the model) of each call into `seen`."""
    handles = []
    for label, patcher in patchers.items():
        for name, module in patcher.model.diffusion_model.named_modules():
            if name.endswith(("attn1.to_k", "attn1.to_v")):
                def hook(_module, _args, _out, label=label):
                    seen.add((threading.current_thread(), label))
                handles.append(module.register_forward_hook(hook))
    return handles


def one_model_two_keys(patcher):
    """model_options["multigpu_clones"] naming the main model for both CPU device keys, and no thread pool."""
    patcher = patcher.clone()
    patcher.model_options["multigpu_clones"] = {torch.device("cpu"): patcher, torch.device("cpu", 1): patcher}
    return patcher


def test_core_multigpu_path_equals_the_sequential_run(csa, sd15, monkeypatch):
    """Core's own path: a device clone made by deepclone_multigpu on cpu:1 and matched, loaded by the sampler,
    picked up by prepare_model_patcher_multigpu_clones, one step's positive and negative run by
    _calc_cond_batch_multigpu in core's worker thread pool: UNet CSA with a bank write and read equals core's same
    path run sequentially on one model bit for bit."""
    core_multigpu()
    import comfy.samplers

    from comfyui_storydiffusion.attention.bank import IdentityBank

    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    positive, negative = conds("sd15", 2)
    read_positive, read_negative = conds("sd15", 1, seed=4)
    used, seen = [], set()
    original = comfy.samplers._calc_cond_batch_multigpu

    def spy(model, conds_, x_in, timestep, model_options):
        used.append((sorted(str(d) for d in model_options["multigpu_clones"]),
                     model_options.get("multigpu_thread_pool") is not None))
        return original(model, conds_, x_in, timestep, model_options)

    monkeypatch.setattr(comfy.samplers, "_calc_cond_batch_multigpu", spy)
    out = {}
    for name in ("sequential", "multi"):
        bank = IdentityBank()
        writer = csa.with_bank(patched, csa.MODE_WRITE, bank)
        reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2)
        handles = []
        if name == "multi":
            writer = core_clones(writer)[0]
            reader, extra = core_clones(reader)
            handles = watch_threads(seen, {"main": reader, "extra": extra})
        else:  # core's path without its thread pool: the chunks one after another on the sampling thread
            writer, reader = one_model_two_keys(writer), one_model_two_keys(reader)
        try:
            out[name] = (sample(writer, positive, negative, 2), sample(reader, read_positive, read_negative, 1))
        finally:
            for h in handles:
                h.remove()
    # each device's chunk ran in a pool thread of its own, with that device's own modules only (the main model is
    # also the write run's, whose pool threads are others: thread objects, as ids are reused once a pool ends)
    models_of = {thread: {model for t, model in seen if t is thread} for thread, _ in seen}
    assert all(len(models) == 1 for models in models_of.values()), seen
    assert {m for models in models_of.values() for m in models} == {"extra", "main"}
    assert all(thread is not threading.current_thread() for thread in models_of)
    assert used == [(["cpu", "cpu:1"], False)] * 2 * STEPS + [(["cpu", "cpu:1"], True)] * 2 * STEPS
    assert torch.equal(out["sequential"][0], out["multi"][0]) and torch.equal(out["sequential"][1], out["multi"][1])


def wan_model():
    import test_wan
    from wan_fixtures import wan_state_dict

    return test_wan.load(wan_state_dict(seed=3))


def test_wan_per_frame_semantics_equals_the_sequential_run(split, pack, comfy_nodes):
    """Wan's per-frame forwards are object patches bound to the main model's modules: a device clone binds them to
    its own (core calls rebind_per_frame_forwards as an ON_DEEPCLONE_MULTIGPU / ON_MATCH_MULTIGPU_CLONES
    callback; here the harness calls it) and loading the clone applies them to its model."""
    import test_wan
    from comfyui_storydiffusion.wan import comfy_adapter as wan

    patched = wan.apply_per_frame_semantics(wan_model(), test_wan.clip_output(test_wan.predicted()), 1.0)
    cond = test_wan.conditioning()
    multi = with_clones(patched)
    clones = multi.model_options["multigpu_clones"]
    extra = clones[DEVICES[1]]
    wan.rebind_per_frame_forwards(multi, extra)
    split.threads = False
    sequential = test_wan.ksampler(multi, cond=cond)
    split.threads = True
    extra.patch_model()  # core loads every device clone: its object patches go onto its own model
    handles = split.watch(clones, ("cross_attn.k_img",))
    try:
        threaded = test_wan.ksampler(multi, cond=cond)
    finally:
        for h in handles:
            h.remove()
        extra.unpatch_model()
    assert split.calls == STEPS
    assert torch.equal(sequential, threaded)
    check_threads(split, clones)


def test_wan_callbacks_rebind_on_core_clones(pack, comfy_nodes):
    """On core's deepclone_multigpu + match_multigpu_clones the registered callbacks bind every per-frame forward
    of a device clone to that clone's own cross-attention module."""
    core_multigpu()
    import test_wan
    from comfyui_storydiffusion.wan import comfy_adapter as wan

    patched = wan.apply_per_frame_semantics(wan_model(), test_wan.clip_output(test_wan.predicted()), 1.0)
    main, extra = core_clones(patched)
    assert extra.model is not main.model
    for patcher in (main, extra):
        bound = {k: p.__self__ for k, p in patcher.object_patches.items() if k.endswith("cross_attn.forward")}
        assert bound
        for key, module in bound.items():
            assert module is patcher.model.diffusion_model.get_submodule(key[len("diffusion_model."):-len(".forward")])

"""Query panels grouped under a memory budget (attention/core.py, dit.py): G panels of the same key count per
attention call give what one panel per call gives, within the kernel's batch-size noise, for UNets and DiTs,
windows, story groups, [NC] panels, bank reads and 1-3 chunks; the budget -> G function; the node's budget
input reaching the run through the real ComfyUI patch path."""
from __future__ import annotations

import pytest
import torch

import tiny_models

# Batch-size noise of the kernels on the CPU, fp32: measured 0.0 (grouped == per-panel, bit for bit) for every
# case below and for one-call sizes up to 4 panels x 1024 tokens x 320 channels (UNet, 2 chunks, G = 2..4) and
# 4 panels x 24 heads x 288 tokens (DiT): torch's CPU attention computes each row and head on its own. The bound
# asserted leaves room for a kernel whose blocking depends on the batch (GPU kernels may split keys by batch size).
GROUPING_ATOL = 1e-6
HEADS, DIM = 2, 8


@pytest.fixture(scope="module")
def att(pack):
    from comfyui_storydiffusion.attention import core, dit, run

    return core, dit, run


def counting(kernel):
    calls = []

    def attend(*args):
        calls.append(args[0].shape[0])
        return kernel(*args)

    return attend, calls


SHARES = {
    "all": lambda b: ~torch.eye(b, dtype=torch.bool),
    # two characters and an [NC] panel (the last): different share sets, so different key counts
    "groups": lambda b: torch.tensor([[i != j and i < b - 1 and j < b - 1 and (i % 2 == j % 2 or i == 0 or j == 0)
                                       for j in range(b)] for i in range(b)]),
}


def test_panels_per_call(att):
    core = att[0]
    assert core.panels_per_call(0, 100, 8) == 1  # 0: one panel per call (the behaviour before grouping)
    assert core.panels_per_call(-5, 100, 8) == 1
    assert core.panels_per_call(99, 100, 8) == 1  # below one panel's bytes: still one panel
    assert core.panels_per_call(350, 100, 8) == 3
    assert core.panels_per_call(10**12, 100, 8) == 8  # never more than the panels
    assert core.panels_per_call(10**12, 100, 1) == 1
    # what one query panel adds: K and V [chunks, keys, width], query copy, output and its layout copy, the index
    assert core.panel_call_bytes(2, 10, 30, 4, 2) == 2 * (60 + 30) * 4 * 2 + 8 * 30
    assert core.panel_call_bytes(1, 10, 30, 4, 2, index_rows=24, extra=7) == (60 + 30) * 4 * 2 + 8 * 30 * 24 + 7


def test_groups_hold_panels_of_one_key_count(att):
    core = att[0]
    b = 7
    share, sampled, windows = core.panel_plan(SHARES["groups"](b), core.sample_panel_tokens(12, 0.5, 1, 2, 3, range(b)),
                                              b, 0)
    units = core.query_units(share, sampled, windows, [()] * b, 0, 12)
    groups = core.query_groups(units, lambda keys: 2)
    assert sorted(u.panel for g in groups for u in g) == list(range(b))
    for group in groups:
        assert len(group) <= 2 and len({u.keys for u in group}) == 1 and len({u.panel for u in group}) == len(group)
    assert len(groups) < b  # some grouping happened
    # sliding windows: a unit per (window, panel), the panels of a group distinct
    share, sampled, windows = core.panel_plan(SHARES["all"](b), sampled, b, 3)
    units = core.query_units(share, sampled, windows, [()] * b, 0, 12)
    assert len(units) == 3 * (b - 2)
    for group in core.query_groups(units, lambda keys: 100):
        assert len({u.panel for u in group}) == len(group)


def rand(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("share_kind", ["all", "groups"])
def test_unet_grouped_equals_one_panel_per_call(att, chunks, window, share_kind):
    from comfyui_storydiffusion.common.attention import multihead_attention

    core = att[0]
    b, tokens = 6, 16
    q, k, v = rand((chunks * b, tokens, HEADS * DIM), seed=chunks * 10 + window)
    sampled = core.sample_panel_tokens(tokens, 0.5, 1, 2, 3, range(b))
    share = SHARES[share_kind](b)
    one_kernel, one_calls = counting(multihead_attention)
    reference = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled, window=window,
                                          attention=one_kernel)
    panel = core.panel_call_bytes(chunks, tokens, tokens + (b - 1) * sampled.shape[1], HEADS * DIM, 4, index_rows=chunks)
    for budget in (2 * panel, 10**12):
        kernel, calls = counting(multihead_attention)
        out = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled, window=window,
                                        budget=budget, attention=kernel)
        assert (out - reference).abs().max() <= GROUPING_ATOL
        assert len(calls) < len(one_calls) and max(calls) > chunks  # really grouped
    assert set(one_calls) == {chunks}  # budget 0: one panel (its rows of every chunk) per call


def bank_tokens(core, chunks, bank_panels, n, seed, heads=None):
    g = torch.Generator().manual_seed(seed)
    shape = (chunks, bank_panels) + ((heads, n, DIM) if heads else (n, HEADS * DIM))
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


@pytest.mark.parametrize("chunks", [1, 2])
def test_unet_bank_reads_grouped(att, chunks):
    from comfyui_storydiffusion.common.attention import multihead_attention

    core = att[0]
    b, tokens = 5, 12
    q, k, v = rand((chunks * b, tokens, HEADS * DIM), seed=3)
    bk, bv = bank_tokens(core, chunks, 3, 6, seed=4)
    reads = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    bank = core.BankTokens(bk, bv, reads)
    kw = dict(chunks=chunks, share=torch.zeros(b, b, dtype=torch.bool),
              sampled=core.sample_panel_tokens(tokens, 0.5, 1, 2, 3, range(b)), bank=bank)
    reference = core.consistent_attention(q, k, v, HEADS, **kw)
    kernel, calls = counting(multihead_attention)
    out = core.consistent_attention(q, k, v, HEADS, budget=10**12, attention=kernel, **kw)
    assert (out - reference).abs().max() <= GROUPING_ATOL
    assert sorted(calls) == sorted([chunks, chunks, 3 * chunks])  # panels 0, 1, 4 together; 2 alone; 3 plain
    # a panel reading no bank panel is still plain attention, bit for bit
    assert torch.equal(out.view(chunks, b, tokens, -1)[:, 3], multihead_attention(
        q.view(chunks, b, tokens, -1)[:, 3], k.view(chunks, b, tokens, -1)[:, 3], v.view(chunks, b, tokens, -1)[:, 3],
        HEADS))


def test_rate_zero_is_plain_attention_whatever_the_budget(att):
    from comfyui_storydiffusion.common.attention import multihead_attention

    core, dit = att[0], att[1]
    q, k, v = rand((6, 12, HEADS * DIM), seed=5)
    sampled = core.sample_panel_tokens(12, 0.0, seed=0, step=0, layer=0, panels=range(3))
    for budget in (0, 10**12):
        out = core.consistent_attention(q, k, v, HEADS, chunks=2, share=~torch.eye(3, dtype=torch.bool),
                                        sampled=sampled, budget=budget)
        assert torch.equal(out, multihead_attention(q, k, v, HEADS))
    q, k, v = rand((6, HEADS, 12, DIM), seed=6)
    for budget in (0, 10**12):
        out = dit.joint_consistent_attention(q, k, v, chunks=2, text_tokens=4, image_tokens=8, share=~torch.eye(
            3, dtype=torch.bool), sampled=core.sample_panel_tokens(8, 0.0, 0, 0, 0, range(3)), budget=budget)
        assert torch.equal(out, dit.sdpa_joint(q, k, v))


@pytest.mark.parametrize("chunks", [1, 2, 3])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("share_kind", ["all", "groups"])
@pytest.mark.parametrize("masked", [False, True])
def test_dit_grouped_equals_one_panel_per_call(att, chunks, window, share_kind, masked):
    core, dit = att[0], att[1]
    b, text, image, trailing = 6, 3, 16, 2
    tokens = text + image + trailing
    q, k, _ = rand((chunks * b, HEADS, tokens, DIM), seed=chunks + 7 * window)
    v = rand((chunks * b, tokens, HEADS, DIM), seed=9)[0].transpose(1, 2)  # a strided v, as Flux's single blocks pass it
    sampled = core.sample_panel_tokens(image, 0.5, 1, 2, 3, range(b))
    mask = None
    if masked:
        mask = torch.zeros(chunks * b, tokens, tokens)
        mask[:, :, 1] = float("-inf")  # a padded text token
    kw = dict(chunks=chunks, text_tokens=text, image_tokens=image, share=SHARES[share_kind](b), sampled=sampled,
              window=window, mask=mask)
    one_kernel, one_calls = counting(dit.sdpa_joint)
    reference = dit.joint_consistent_attention(q, k, v, attention=one_kernel, **kw)
    kernel, calls = counting(dit.sdpa_joint)
    out = dit.joint_consistent_attention(q, k, v, budget=10**12, attention=kernel, **kw)
    assert (out - reference).abs().max() <= GROUPING_ATOL
    assert len(calls) < len(one_calls) and set(one_calls) == {chunks}


@pytest.mark.parametrize("chunks", [1, 2])
def test_dit_bank_reads_grouped(att, chunks):
    core, dit = att[0], att[1]
    b, text, image = 4, 3, 10
    q, k, v = rand((chunks * b, HEADS, text + image, DIM), seed=11)
    bk, bv = bank_tokens(core, chunks, 2, 5, seed=12, heads=HEADS)
    reads = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 1]], dtype=torch.bool)
    kw = dict(chunks=chunks, text_tokens=text, image_tokens=image, share=torch.zeros(b, b, dtype=torch.bool),
              sampled=core.sample_panel_tokens(image, 0.5, 1, 2, 3, range(b)), bank=core.BankTokens(bk, bv, reads))
    reference = dit.joint_consistent_attention(q, k, v, **kw)
    kernel, calls = counting(dit.sdpa_joint)
    out = dit.joint_consistent_attention(q, k, v, budget=10**12, attention=kernel, **kw)
    assert (out - reference).abs().max() <= GROUPING_ATOL
    assert sorted(calls) == sorted([chunks, 3 * chunks])


def test_budget_resolution(att):
    run = att[2]
    cpu, cuda = torch.device("cpu"), torch.device("cuda")

    def free(device):
        return 8 * 2**30

    assert run.resolve_budget(0, cuda, free) == 0
    assert run.resolve_budget(512, cpu, free) == 512 * 2**20
    assert run.resolve_budget(run.AUTO_BUDGET, cpu, free) == 0  # the CPU default: one panel per call
    assert run.resolve_budget(run.AUTO_BUDGET, cuda, free) == int(8 * 2**30 * run.AUTO_BUDGET_SHARE)

    def broken(device):
        raise RuntimeError("no such device")

    assert run.resolve_budget(run.AUTO_BUDGET, cuda, broken) == 0


# ---------------------------------------------------------------------------------------------------
# through ComfyUI: the node's input reaches the run, and a KSampler run gives the same latents


def _record_budgets(monkeypatch, module, name):
    seen = []
    real = getattr(module, name)

    def recording(*args, **kwargs):
        seen.append(kwargs["budget"])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, recording)
    return seen


def _node_patch(model, budget=None, **kw):
    from comfyui_storydiffusion.nodes.consistent_attention import ConsistentSelfAttention

    args = dict(rate=0.5, rate_high_res=0.5, window_size=0, layers="output blocks (official)", custom_layers="",
                start_percent=0.0, end_percent=1.0, schedule="every step", seed=3)
    args.update(kw)
    if budget is not None:
        args["attention_memory_budget"] = budget
    return ConsistentSelfAttention().patch(model, **args)[0]


def test_node_budget_reaches_a_unet_run(pack, monkeypatch):
    import test_attention_comfy as unet_tests
    from comfyui_storydiffusion.attention import core

    sd15 = tiny_models.make_model("sd15", seed=1)
    seen = _record_budgets(monkeypatch, core, "consistent_attention")
    results = {}
    for budget in (None, 0, 64):  # None: the input left out (workflows saved before it): automatic
        model = _node_patch(sd15, budget, window_size=2)
        seen.clear()
        results[budget] = unet_tests.ksampler(model, panels=3)
        assert seen and set(seen) == {0 if budget is None else budget * 2**20}  # automatic on the CPU: 0
    assert (results[64] - results[0]).abs().max() <= GROUPING_ATOL
    assert torch.equal(results[None], results[0])


def test_node_budget_reaches_a_dit_run(pack, monkeypatch):
    import test_attention_dit as dit_tests
    from comfyui_storydiffusion.attention import dit

    flux = tiny_models.make_dit("flux", seed=1)
    seen = _record_budgets(monkeypatch, dit, "joint_consistent_attention")
    results = {}
    story = dit_tests.make_story([("Ann",), ("Bob",), ("Ann",), ()])
    for budget in (0, 32):
        model = _node_patch(flux, budget, story=story)
        seen.clear()
        results[budget] = dit_tests.ksampler(model, panels=4)
        assert seen and set(seen) == {budget * 2**20}
    assert (results[32] - results[0]).abs().max() <= GROUPING_ATOL

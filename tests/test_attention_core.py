"""attention/ core, schedule and bank against references written from the formulas (no ComfyUI model)."""
from __future__ import annotations

import math

import pytest
import torch


@pytest.fixture(scope="module")
def att(pack):
    from comfyui_storydiffusion.attention import bank, core, schedule

    return core, schedule, bank


def multihead_attention(q, k, v, heads):
    from comfyui_storydiffusion.common.attention import multihead_attention as attend

    return attend(q, k, v, heads)


HEADS, DIM = 2, 8


def naive_attention(q, k, v, heads=HEADS):
    """softmax(q k^T / sqrt(d)) v per head, written out."""
    d = q.shape[-1] // heads
    out = []
    for h in range(heads):
        qh, kh, vh = (t[:, h * d:(h + 1) * d].double() for t in (q, k, v))
        w = torch.softmax(qh @ kh.T / math.sqrt(d), dim=-1)
        out.append(w @ vh)
    return torch.cat(out, dim=-1)


def naive_csa(q, k, v, chunks, share, sampled, members=None, bank=None):
    """Output rows of the panels in `members` (default all) when each reads the sampled tokens of
    the members it shares with, the bank panels it reads, and itself."""
    b = q.shape[0] // chunks
    members = list(range(b)) if members is None else list(members)
    out = {}
    for c in range(chunks):
        for i in members:
            parts = []
            if bank is not None:
                bk, bv, reads = bank
                parts_k = [bk[c, p] for p in range(bk.shape[1]) if reads[i, p]]
                parts_v = [bv[c, p] for p in range(bk.shape[1]) if reads[i, p]]
            else:
                parts_k, parts_v = [], []
            for j in members:
                if j != i and share[i, j]:
                    parts_k.append(k[c * b + j, sampled[j]])
                    parts_v.append(v[c * b + j, sampled[j]])
            kk = torch.cat(parts_k + [k[c * b + i]])
            vv = torch.cat(parts_v + [v[c * b + i]])
            del parts
            out[c * b + i] = naive_attention(q[c * b + i], kk, vv)
    return out


def rand_qkv(rows, tokens=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, tokens, HEADS * DIM, generator=g) for _ in range(3)]


def test_batch_mode_matches_reference(att):
    core = att[0]
    b, chunks = 4, 2
    q, k, v = rand_qkv(chunks * b)
    sampled = core.sample_panel_tokens(12, 0.5, seed=1, step=3, layer=7, panels=range(b))
    share = ~torch.eye(b, dtype=torch.bool)
    out = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled)
    ref = naive_csa(q, k, v, chunks, share, sampled)
    for row, expected in ref.items():
        torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)
    # it really is different from plain attention
    plain = multihead_attention(q, k, v, HEADS)
    assert (out - plain).abs().max() > 1e-3


def test_window_mode_is_the_mean_over_windows(att):
    core = att[0]
    b, w, chunks = 5, 3, 2
    q, k, v = rand_qkv(chunks * b, seed=1)
    sampled = core.sample_panel_tokens(12, 0.5, seed=2, step=0, layer=1, panels=range(b))
    share = ~torch.eye(b, dtype=torch.bool)
    out = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled, window=w)
    sums, counts = {}, {}
    for s in range(b - w + 1):
        for row, o in naive_csa(q, k, v, chunks, share, sampled, members=range(s, s + w)).items():
            sums[row] = sums.get(row, 0) + o
            counts[row] = counts.get(row, 0) + 1
    assert counts[0] == 1 and counts[2] == 3  # edge panels sit in fewer windows
    for row, total in sums.items():
        torch.testing.assert_close(out[row].double(), total / counts[row], atol=1e-5, rtol=1e-5)
    whole = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled, window=0)
    assert (out - whole).abs().max() > 1e-4
    assert torch.equal(core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled, window=b),
                       whole)  # W >= B is one window


def test_character_groups_and_no_character_panels(att):
    from comfyui_storydiffusion.story.model import Character, Panel, Story

    core = att[0]
    story = Story(characters=(Character("Ann", "a girl"), Character("Bob", "a boy")),
                  panels=(Panel("a", "", ("Ann",)), Panel("b", "", ("Bob",)), Panel("c", "", ("Ann", "Bob")),
                          Panel("d", "", ()), Panel("e", "", ("Ann",))))
    share = torch.tensor(story.share_mask())
    b, chunks = 5, 1
    q, k, v = rand_qkv(b, seed=2)
    sampled = core.sample_panel_tokens(12, 0.5, seed=3, step=1, layer=2, panels=range(b))
    out = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled)
    ref = naive_csa(q, k, v, chunks, share, sampled)
    for row, expected in ref.items():
        torch.testing.assert_close(out[row].double(), expected, atol=1e-5, rtol=1e-5)
    # the [NC] panel reads nothing: plain attention
    torch.testing.assert_close(out[3], multihead_attention(q[3:4], k[3:4], v[3:4], HEADS)[0], atol=1e-6, rtol=0)
    # Ann's panel 0 does not read Bob's panel 1: changing panel 1 leaves it alone, changing panel 4 does not
    k2 = k.clone()
    k2[1] += 1.0
    out2 = core.consistent_attention(q, k2, v, HEADS, chunks=chunks, share=share, sampled=sampled)
    assert torch.equal(out2[0], out[0]) and not torch.equal(out2[2], out[2])


def test_bank_read_equals_batch_write(att):
    """Panel X alone reading the identity panels' stored tokens == X inside a batch with them."""
    core = att[0]
    b, chunks, ids = 3, 2, 2  # rows: identity 0, identity 1, panel X
    q, k, v = rand_qkv(chunks * b, seed=3)
    sampled = core.sample_panel_tokens(12, 0.5, seed=4, step=2, layer=5, panels=range(b))
    share = ~torch.eye(b, dtype=torch.bool)
    batch = core.consistent_attention(q, k, v, HEADS, chunks=chunks, share=share, sampled=sampled)
    # what a write run stores: the identity panels' sampled tokens per chunk
    kc, vc = k.reshape(chunks, b, 12, -1), v.reshape(chunks, b, 12, -1)
    bank_k = torch.stack([torch.stack([kc[c, p, sampled[p]] for p in range(ids)]) for c in range(chunks)])
    bank_v = torch.stack([torch.stack([vc[c, p, sampled[p]] for p in range(ids)]) for c in range(chunks)])
    rows_x = [2, 5]
    bank = core.BankTokens(bank_k, bank_v, torch.ones(1, ids, dtype=torch.bool))
    read = core.consistent_attention(q[rows_x], k[rows_x], v[rows_x], HEADS, chunks=chunks,
                                     share=torch.zeros(1, 1, dtype=torch.bool), sampled=sampled[2:], bank=bank)
    torch.testing.assert_close(read, batch[rows_x], atol=1e-5, rtol=1e-5)
    # a panel reading no bank panel is plain attention
    none = core.BankTokens(bank_k, bank_v, torch.zeros(1, ids, dtype=torch.bool))
    plain = core.consistent_attention(q[rows_x], k[rows_x], v[rows_x], HEADS, chunks=chunks,
                                      share=torch.zeros(1, 1, dtype=torch.bool), sampled=sampled[2:], bank=none)
    torch.testing.assert_close(plain, multihead_attention(q[rows_x], k[rows_x], v[rows_x], HEADS), atol=1e-6, rtol=0)


def test_rate_zero_is_plain_attention(att):
    core = att[0]
    q, k, v = rand_qkv(6, seed=4)
    sampled = core.sample_panel_tokens(12, 0.0, seed=0, step=0, layer=0, panels=range(3))
    assert sampled.shape == (3, 0)
    out = core.consistent_attention(q, k, v, HEADS, chunks=2, share=~torch.eye(3, dtype=torch.bool), sampled=sampled)
    assert torch.equal(out, multihead_attention(q, k, v, HEADS))


def test_sampling_is_seeded_per_step_layer_and_panel(att):
    core = att[0]
    a = core.sample_tokens(100, 0.3, seed=5, step=2, layer=3, panel=4)
    assert a.numel() == 30 and torch.equal(a, a.sort().values) and len(set(a.tolist())) == 30
    assert torch.equal(a, core.sample_tokens(100, 0.3, seed=5, step=2, layer=3, panel=4))
    for other in [dict(seed=6, step=2, layer=3, panel=4), dict(seed=5, step=3, layer=3, panel=4),
                  dict(seed=5, step=2, layer=4, panel=4), dict(seed=5, step=2, layer=3, panel=5)]:
        assert not torch.equal(a, core.sample_tokens(100, 0.3, **other))
    # a panel's tokens do not depend on which other panels are in the batch
    batch = core.sample_panel_tokens(100, 0.3, seed=5, step=2, layer=3, panels=[1, 4, 9])
    assert torch.equal(batch[1], a)


def test_official_schedule(att):
    _, schedule, _ = att
    s = schedule.Schedule(official=True, seed=11)
    layer = ("output", 3, 0)
    assert not any(s.active(0, 5.0, ("output", i, 0)) for i in range(12))
    early = [s.active(step, 5.0, ("output", i, j)) for step in range(1, 20) for i in range(12) for j in range(4)]
    late = [s.active(step, 5.0, ("output", i, j)) for step in range(20, 50) for i in range(12) for j in range(4)]
    assert 0.62 < sum(early) / len(early) < 0.78 and 0.85 < sum(late) / len(late) < 0.95
    assert [s.active(st, 1.0, layer) for st in range(40)] == [s.active(st, 1.0, layer) for st in range(40)]
    every = schedule.Schedule(window=schedule.SigmaWindow(start_sigma=10.0, end_sigma=2.0))
    assert every.active(0, 5.0, layer) and not every.active(3, 11.0, layer) and not every.active(9, 1.0, layer)


def test_step_index(att):
    _, schedule, _ = att
    sigmas = [14.6, 7.0, 3.0, 1.0, 0.0]
    assert [schedule.step_index(s, sigmas) for s in sigmas[:-1]] == [0, 1, 2, 3]
    assert schedule.step_index(5.0, sigmas) == 1  # a mid-step call belongs to the step it refines
    assert schedule.step_index(0.5, sigmas) == 3


def test_layer_selection(att):
    _, schedule, _ = att
    layers = [("input", 1, 0), ("input", 7, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 0, 1), ("output", 4, 0)]
    assert schedule.select_layers(layers, schedule.LAYERS_OUTPUT) == layers[3:]
    assert schedule.select_layers(layers, schedule.LAYERS_ALL) == layers
    assert schedule.select_layers(layers, schedule.LAYERS_CUSTOM, "middle, output 0.1, input 2-9") == \
        [("input", 7, 0), ("middle", 0, 0), ("output", 0, 1)]
    with pytest.raises(ValueError, match="entry 2 'outptu 3'"):
        schedule.select_layers(layers, schedule.LAYERS_CUSTOM, "output 1, outptu 3")
    with pytest.raises(ValueError, match="matches no transformer block"):
        schedule.select_layers(layers, schedule.LAYERS_CUSTOM, "output 11")


def _filled_bank(bank_mod, storage="cpu", dtype="fp16"):
    bank = bank_mod.IdentityBank(storage=storage, dtype=dtype)
    writer = bank.begin_write([0, 2], [("Ann",), ("Bob",)], [3.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    for step in range(2):
        hidden = torch.randn(2, 2, 5, 16, generator=g) * 3  # chunks, panels, sampled tokens, channels
        writer.put(step, ("output", 3, 0), ["positive", "negative"], hidden, num_tokens=10)
    assert bank.empty  # nothing visible before the run completes
    writer.commit()
    return bank


def _written(step, chunk):
    g = torch.Generator().manual_seed(0)
    for _ in range(step + 1):
        hidden = torch.randn(2, 2, 5, 16, generator=g) * 3
    return hidden[chunk]


def _write_steps(writer, steps, layers=(("output", 3, 0), ("output", 4, 0))):
    for step in range(steps):
        for i, layer in enumerate(layers):
            writer.put(step, layer, ["positive", "negative"], torch.randn(2, 2, 5 + i, 16), num_tokens=10)


def test_bank_writer_refuses_a_run_that_would_not_fit_after_its_first_step(att):
    _, _, bank_mod = att
    sigmas = [float(10 - i) for i in range(11)]  # 10 steps
    step_bytes = 2 * 2 * (5 + 6) * 16 * 2  # roles x panels x sampled tokens of both layers x channels x fp16

    bank = bank_mod.IdentityBank()
    writer = bank.begin_write([0, 1], None, sigmas, planned_steps=lambda layer: 10, memory_limit=10 * step_bytes)
    _write_steps(writer, 10)  # exactly fits
    assert writer.projected_bytes() == writer.nbytes == 10 * step_bytes
    writer.commit()
    assert bank.nbytes() == 10 * step_bytes

    bank = bank_mod.IdentityBank()
    writer = bank.begin_write([0, 1], None, sigmas, planned_steps=lambda layer: 10, memory_limit=10 * step_bytes - 1)
    _write_steps(writer, 1)  # the first step alone fits; the projection is known once it is done
    assert writer.projected_bytes() == 10 * step_bytes
    with pytest.raises(bank_mod.BankError, match=r"would store about .* 10 steps, 2 layers, fp16.*fp8"):
        _write_steps(writer, 2)
    assert bank.empty

    # a schedule that writes a layer at fewer steps is counted per layer
    planned = {("output", 3, 0): 10, ("output", 4, 0): 4}
    writer = bank_mod.IdentityBank().begin_write([0, 1], None, sigmas, planned_steps=planned.__getitem__)
    _write_steps(writer, 1)
    assert writer.projected_bytes() == 2 * 2 * 16 * 2 * (5 * 10 + 6 * 4)

    # stored bytes past the limit stop the run too (layers first seen after the first step)
    writer = bank_mod.IdentityBank().begin_write([0, 1], None, sigmas, memory_limit=step_bytes // 2)
    with pytest.raises(bank_mod.BankError, match="has stored about"):
        _write_steps(writer, 1)


def test_bank_writer_moves_finished_steps_to_disk_when_memory_runs_out(att, tmp_path):
    """keep 'auto' with a projection that undercounts (a random schedule's first step): the stored bytes passing
    the memory limit move the finished steps to disk, mid-run; the bank holds the same tokens."""
    _, _, bank_mod = att
    sigmas = [float(10 - i) for i in range(11)]
    step_bytes = 2 * 2 * (5 + 6) * 16 * 2
    torch.manual_seed(0)
    in_memory = bank_mod.IdentityBank()
    writer = in_memory.begin_write([0, 1], None, sigmas)
    _write_steps(writer, 4)
    writer.commit()

    torch.manual_seed(0)
    bank = bank_mod.IdentityBank(keep="auto")
    writer = bank.begin_write([0, 1], None, sigmas, planned_steps=lambda layer: 1, memory_limit=3 * step_bytes // 2,
                              spill_parent=str(tmp_path))
    _write_steps(writer, 4)
    assert writer.memory_bytes <= 3 * step_bytes // 2 and writer.nbytes > 4 * step_bytes
    writer.commit()
    assert not bank.entries and len(bank.files()) == 4 and bank.keys() == in_memory.keys()
    for step, layer, role in bank.keys():
        assert torch.equal(bank.stored_tokens(step, layer, [role], 10), in_memory.stored_tokens(step, layer, [role], 10))
    with pytest.raises(bank_mod.BankError, match="keep must be one of"):
        bank_mod.IdentityBank(keep="swap")


def test_bank_lookup_and_errors(att):
    _, _, bank_mod = att
    bank = _filled_bank(bank_mod)
    assert bank.panels == (0, 2) and next(iter(bank.entries.values()))[0].dtype == torch.float16
    bank.check_run([3.0, 1.0, 0.0])
    reads = bank.reads_for(3, [("Ann",), ("Ann", "Bob"), ()])
    assert bank.reads_for(2).all() and bank.reads_for(2).shape == (2, 2)  # no story: every bank panel
    assert reads.tolist() == [[True, False], [True, True], [False, False]]
    hidden = bank.stored_tokens(1, ("output", 3, 0), ["negative", "positive"], 10)
    assert hidden.shape == (2, 2, 5, 16)
    torch.testing.assert_close(hidden[0], _written(1, 1).half().float(), atol=0, rtol=0)  # negative first, as asked
    with pytest.raises(bank_mod.BankError, match="2 sampling steps, this run has 3"):
        bank.check_run([3.0, 2.0, 1.0, 0.0])
    with pytest.raises(bank_mod.BankError, match="another resolution"):
        bank.stored_tokens(0, ("output", 3, 0), ["positive"], 40)
    with pytest.raises(bank_mod.BankError, match="no tokens for layer output.4.0"):
        bank.stored_tokens(0, ("output", 4, 0), ["positive"], 10)
    with pytest.raises(bank_mod.BankError, match="no middle pass for step 0"):
        bank.stored_tokens(0, ("output", 3, 0), ["middle"], 10)
    with pytest.raises(bank_mod.BankError, match="empty"):
        bank_mod.IdentityBank().check_run([1.0, 0.0])


@pytest.mark.parametrize("dtype, tolerance", [("fp32", 0.0), ("fp16", 1e-3), ("bf16", 8e-3), ("fp8", 7e-2)])
def test_bank_storage_precision(att, dtype, tolerance):
    """fp32 stores the hidden states exactly; the others within their format's relative precision
    (fp8: e4m3, relative error <= 2^-4 of the token's largest value)."""
    _, _, bank_mod = att
    bank = _filled_bank(bank_mod, dtype=dtype)
    for step in range(2):
        got = bank.stored_tokens(step, ("output", 3, 0), ["positive", "negative"], 10)
        for chunk in range(2):
            want = _written(step, chunk)
            error = (got[chunk] - want).abs() / want.abs().amax(dim=-1, keepdim=True)
            assert float(error.max()) <= tolerance
    if dtype == "fp32":
        assert torch.equal(bank.stored_tokens(0, ("output", 3, 0), ["positive"], 10)[0], _written(0, 0))


def test_fp8_bank_is_half_of_fp16(att):
    _, _, bank_mod = att
    fp16, fp8 = _filled_bank(bank_mod, dtype="fp16"), _filled_bank(bank_mod, dtype="fp8")
    values = sum(t.numel() for t, _ in fp16.entries.values())
    assert fp16.nbytes() == 2 * values
    assert fp8.nbytes() == values  # one byte a value


def test_bank_file_round_trip(att, tmp_path):
    _, _, bank_mod = att
    for dtype in ("fp16", "fp8"):
        bank = _filled_bank(bank_mod, dtype=dtype)
        path = tmp_path / f"ann_bob_{dtype}.safetensors"
        bank.save(str(path))
        loaded = bank_mod.IdentityBank.load(str(path))
        assert loaded.panels == bank.panels and loaded.characters == bank.characters
        assert loaded.sample_sigmas == bank.sample_sigmas and loaded.layer_tokens == bank.layer_tokens
        assert loaded.keys() == bank.keys() and loaded.dtype_name == dtype
        for step in range(2):
            args = (step, ("output", 3, 0), ["positive", "negative"], 10)
            assert torch.equal(loaded.stored_tokens(*args), bank.stored_tokens(*args))
        copy = tmp_path / f"copy_{dtype}.safetensors"
        loaded.save(str(copy))  # a loaded bank saves as its file
        assert copy.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ann_bob_fp16.safetensors", "ann_bob_fp8.safetensors",
                                                          "copy_fp16.safetensors", "copy_fp8.safetensors"]  # no temp file left
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(bank_mod.BankError, match="not a StoryDiffusion identity bank"):
        bank_mod.IdentityBank.load(str(tmp_path / "other.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(bank_mod.BankError, match="cannot read identity bank broken.safetensors"):
        bank_mod.IdentityBank.load(str(tmp_path / "broken.safetensors"))
    save_file({"output.3.0/step0/kind0/k": torch.zeros(2, 5, 16), "output.3.0/step0/kind0/v": torch.zeros(2, 5, 16)},
              str(tmp_path / "old.safetensors"), metadata={"format": "storydiffusion-identity-bank/1", "bank": "{}"})
    with pytest.raises(bank_mod.BankError, match="earlier version of this pack.*re-create it"):
        bank_mod.IdentityBank.load(str(tmp_path / "old.safetensors"))


def test_loaded_bank_streams_one_step_at_a_time(att, tmp_path, monkeypatch):
    """A read asks for one step's tensors: the bank reads only that step from the file and keeps no other."""
    _, _, bank_mod = att
    _filled_bank(bank_mod).save(str(tmp_path / "b.safetensors"))
    loaded = bank_mod.IdentityBank.load(str(tmp_path / "b.safetensors"))
    assert loaded.entries == {}  # nothing read at load time
    seen = []
    real = bank_mod.IdentityBank._load_step
    monkeypatch.setattr(bank_mod.IdentityBank, "_load_step",
                        lambda self, step, *a, **k: seen.append(step) or real(self, step, *a, **k))
    for step in (0, 0, 1, 1):
        loaded.stored_tokens(step, ("output", 3, 0), ["positive", "negative"], 10)
        assert loaded.decoded_steps() == {torch.device("cpu"): step}
    assert seen == [0, 1]


def test_banks_and_predictors_share_the_folder_but_not_the_lists(att, comfy_nodes, models_dir):
    """models/storydiffusion holds identity banks and motion predictors: each loader lists its own kind
    (and any unreadable file, whose load then says what is wrong), never the other kind."""
    _, _, bank_mod = att
    from comfyui_storydiffusion.attention.comfy import list_bank_files
    from comfyui_storydiffusion.motion.comfy_adapter import predictor_filenames
    from comfyui_storydiffusion.motion.predictor import PredictorConfig, SemanticMotionPredictor, save_predictor

    folder = models_dir / "storydiffusion"
    _filled_bank(bank_mod).save(str(folder / "listing_bank.safetensors"))
    save_predictor(SemanticMotionPredictor(PredictorConfig(embed_dim=8, tokens=1, width=8, layers=1, heads=1,
                                                           max_frames=4, kind="pooled")),
                   str(folder / "listing_predictor.safetensors"))
    (folder / "listing_broken.safetensors").write_bytes(b"not a safetensors file")
    banks, predictors = list_bank_files(), predictor_filenames()
    assert "listing_bank.safetensors" in banks and "listing_predictor.safetensors" not in banks
    assert "listing_predictor.safetensors" in predictors and "listing_bank.safetensors" not in predictors
    assert "listing_broken.safetensors" in banks and "listing_broken.safetensors" in predictors
    for name in ("listing_bank", "listing_predictor", "listing_broken"):
        (folder / f"{name}.safetensors").unlink()

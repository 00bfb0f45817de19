"""The identity bank's own life (issue 20, plain torch): it never leaks step files, never loses a committed bank,
never misreads another grid, says what happened when its files are gone, and refuses writes it cannot store."""
from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch

LAYER = ("output", 3, 0)
SIGMAS = [3.0, 2.0, 1.0, 0.0]  # 3 steps


@pytest.fixture(scope="module")
def bank_mod(pack):
    from comfyui_storydiffusion.attention import bank

    return bank


def tokens(step: int, chunks: int = 2, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(chunks, 2, 5, 16, generator=g) + offset  # chunks, panels, sampled tokens, channels


def write(bank, steps=2, spill_parent=None, offset=0.0, **options):
    """A completed write run of `steps` steps (positive + negative) at LAYER; returns the committed bank."""
    writer = bank.begin_write([0, 1], None, SIGMAS, spill_parent=spill_parent, **options)
    for step in range(steps):
        writer.put(step, LAYER, ["positive", "negative"], tokens(step, offset=offset), num_tokens=10)
    writer.commit()
    return bank


def read_all(bank, steps=2):
    return [bank.stored_tokens(step, LAYER, ["positive", "negative"], 10) for step in range(steps)]


def files_under(folder) -> list:
    return sorted(name for _, _, names in os.walk(folder) for name in names)


# --- step files go with the bank -------------------------------------------------------------------------------


def test_dropping_a_bank_kept_on_disk_removes_its_step_files(bank_mod, tmp_path):
    bank = write(bank_mod.IdentityBank(keep="disk"), spill_parent=str(tmp_path))
    folder = bank.spill_folder
    assert os.path.isdir(folder) and len(files_under(folder)) == 2
    del bank
    gc.collect()
    assert not os.path.exists(folder) and files_under(tmp_path) == []

    # a writer dropped in the middle of its run (never committed, never discarded) leaves nothing either
    bank = bank_mod.IdentityBank(keep="disk")
    writer = bank.begin_write([0, 1], None, SIGMAS, spill_parent=str(tmp_path))
    for step in range(2):
        writer.put(step, LAYER, ["positive"], tokens(step, chunks=1), num_tokens=10)
    assert files_under(tmp_path) == ["step0000.safetensors"]
    del writer, bank
    gc.collect()
    assert files_under(tmp_path) == []


def test_clear_and_a_rewrite_remove_the_old_step_files_but_never_a_loaded_file(bank_mod, tmp_path):
    spill = tmp_path / "temp"
    bank = write(bank_mod.IdentityBank(keep="disk"), spill_parent=str(spill))
    first = bank.spill_folder
    bank.save(str(tmp_path / "kept.safetensors"))
    write(bank, spill_parent=str(spill), offset=1.0)
    assert not os.path.exists(first) and len(files_under(spill)) == 2  # the rewrite's files only
    bank.clear()
    assert files_under(spill) == [] and bank.empty

    loaded = bank_mod.IdentityBank.load(str(tmp_path / "kept.safetensors"))
    loaded.clear()
    del loaded
    gc.collect()
    assert (tmp_path / "kept.safetensors").is_file()  # a loaded bank's file is the user's


# --- release -------------------------------------------------------------------------------------------------


def test_release_drops_the_decoded_step_and_the_next_read_decodes_it_again(bank_mod, tmp_path, monkeypatch):
    write(bank_mod.IdentityBank(), steps=2).save(str(tmp_path / "b.safetensors"))
    bank = bank_mod.IdentityBank.load(str(tmp_path / "b.safetensors"))
    loads = []
    real = bank_mod.IdentityBank._load_step
    monkeypatch.setattr(bank_mod.IdentityBank, "_load_step",
                        lambda self, step, *a, **k: loads.append(step) or real(self, step, *a, **k))
    before = bank.stored_tokens(1, LAYER, ["positive", "negative"], 10)
    assert len(bank._step_cache[torch.device("cpu")][3]) == 2 and loads == [1]
    bank.release()
    assert bank._step_cache == {}
    assert torch.equal(bank.stored_tokens(1, LAYER, ["positive", "negative"], 10), before)
    assert loads == [1, 1]


# --- the latent grid -----------------------------------------------------------------------------------------


def test_a_read_at_another_grid_of_the_same_token_count_is_refused(bank_mod, tmp_path):
    bank = write(bank_mod.IdentityBank(), grid=(8, 16))
    assert bank.grid == (8, 16)
    bank.check_run(SIGMAS, grid=(8, 16))
    bank.check_run(SIGMAS)  # a glue that does not know the grid: the token counts still decide
    with pytest.raises(bank_mod.BankError, match=r"another resolution: a latent of 8x16 .* this run's is 16x8 \(the same size in another shape"):
        bank.check_run(SIGMAS, grid=(16, 8))
    with pytest.raises(bank_mod.BankError, match=r"8x16 .* 16x16: use the identity run's width and height"):
        bank.check_run(SIGMAS, grid=[16, 16])
    with pytest.raises(bank_mod.BankError, match="rows, columns"):
        bank.check_run(SIGMAS, grid=(8,))

    bank.save(str(tmp_path / "grid.safetensors"))
    loaded = bank_mod.IdentityBank.load(str(tmp_path / "grid.safetensors"))
    assert loaded.grid == (8, 16)
    with pytest.raises(bank_mod.BankError, match="16x8"):
        loaded.check_run(SIGMAS, grid=(16, 8))


def test_a_bank_saved_without_a_grid_loads_and_falls_back_to_the_token_count(bank_mod, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    write(bank_mod.IdentityBank()).save(str(tmp_path / "new.safetensors"))
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:  # as a bank saved before the grid
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    header = json.loads(metadata["bank"])
    del header["grid"], header["fingerprint"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**metadata, "bank": json.dumps(header)})

    old = bank_mod.IdentityBank.load(str(tmp_path / "old.safetensors"))
    assert old.grid is None and old.fingerprint is None
    old.check_run(SIGMAS, grid=(16, 8))  # nothing to compare the grid with
    assert old.writer_mismatch("flux-dev") is None
    assert old.stored_tokens(0, LAYER, ["positive"], 10).shape == (1, 2, 5, 16)
    with pytest.raises(bank_mod.BankError, match="another resolution"):
        old.stored_tokens(0, LAYER, ["positive"], 40)


# --- the writer's fingerprint --------------------------------------------------------------------------------


def test_the_writer_fingerprint_is_stored_saved_and_compared(bank_mod, tmp_path):
    bank = write(bank_mod.IdentityBank(), fingerprint="flux:dev:3072:sum=12.5:lora=none")
    assert bank.writer_mismatch("flux:dev:3072:sum=12.5:lora=none") is None
    assert bank.writer_mismatch(None) is None  # a glue that cannot tell: nothing to say
    message = bank.writer_mismatch("flux:schnell:3072:sum=9.1:lora=none")
    assert "another model" in message and "flux:dev:3072:sum=12.5" in message and "flux:schnell" in message

    bank.save(str(tmp_path / "fp.safetensors"))
    loaded = bank_mod.IdentityBank.load(str(tmp_path / "fp.safetensors"))
    assert loaded.fingerprint == bank.fingerprint
    assert loaded.writer_mismatch("x" * 200).count("…") == 1  # a long fingerprint is shortened in the message
    assert write(bank_mod.IdentityBank()).fingerprint is None  # written without one


# --- files gone ----------------------------------------------------------------------------------------------


def test_a_bank_whose_step_files_are_gone_says_what_happened_and_what_to_do(bank_mod, tmp_path):
    bank = write(bank_mod.IdentityBank(keep="disk"), spill_parent=str(tmp_path / "temp"))
    shutil.rmtree(tmp_path / "temp")  # another ComfyUI emptied the temp folder at start-up
    (tmp_path / "out").mkdir()
    expected = r"lost 2 of its 2 step files.*Identity Bank Write.*again.*Save Identity Bank"
    with pytest.raises(bank_mod.BankError, match=expected):
        bank.stored_tokens(0, LAYER, ["positive"], 10)
    with pytest.raises(bank_mod.BankError, match=expected):
        bank.save(str(tmp_path / "out" / "bank.safetensors"))
    with pytest.raises(bank_mod.BankError, match=expected):
        bank.describe()
    assert list((tmp_path / "out").iterdir()) == []  # no partial file

    write(bank_mod.IdentityBank()).save(str(tmp_path / "saved.safetensors"))
    loaded = bank_mod.IdentityBank.load(str(tmp_path / "saved.safetensors"))
    os.remove(tmp_path / "saved.safetensors")
    with pytest.raises(bank_mod.BankError, match="saved.safetensors is gone.*Load Identity Bank"):
        loaded.stored_tokens(0, LAYER, ["positive"], 10)


# --- a failed rewrite ----------------------------------------------------------------------------------------


def test_a_refused_or_interrupted_rewrite_keeps_the_committed_bank(bank_mod, tmp_path):
    spill = str(tmp_path / "temp")
    bank = write(bank_mod.IdentityBank(keep="disk"), spill_parent=spill)
    committed, folder = read_all(bank), bank.spill_folder

    refused = bank.begin_write([0, 1], None, SIGMAS, spill_parent=spill, disk_limit=1)
    refused.put(0, LAYER, ["positive", "negative"], tokens(0, offset=5.0), num_tokens=10)
    with pytest.raises(bank_mod.BankError, match="free disk space"):
        refused.put(1, LAYER, ["positive", "negative"], tokens(1, offset=5.0), num_tokens=10)
    interrupted = bank.begin_write([0, 1], None, SIGMAS, spill_parent=spill)
    interrupted.put(0, LAYER, ["positive", "negative"], tokens(0, offset=7.0), num_tokens=10)
    interrupted.put(1, LAYER, ["positive", "negative"], tokens(1, offset=7.0), num_tokens=10)
    interrupted.discard()  # what the glue calls when sampling raises (and nothing else)

    assert bank.spill_folder == folder and files_under(spill) == ["step0000.safetensors", "step0001.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(read_all(bank), committed))


# --- writes the bank cannot store ----------------------------------------------------------------------------


def test_two_chunks_of_one_role_are_refused_at_write_time(bank_mod, tmp_path):
    bank = bank_mod.IdentityBank(keep="disk")
    writer = bank.begin_write([0, 1], None, SIGMAS, spill_parent=str(tmp_path))
    writer.put(0, LAYER, ["positive", "negative"], tokens(0), num_tokens=10)
    with pytest.raises(bank_mod.BankError, match=r"two positive chunks in one model call .*Conditioning \(Combine\)"):
        writer.put(1, LAYER, ["positive", "positive", "negative"], tokens(1, chunks=3), num_tokens=10)
    assert files_under(tmp_path) == [] and bank.empty  # nothing was written

    # the same, split over two calls of one model evaluation (the glue says which evaluation a call belongs to)
    writer = bank_mod.IdentityBank().begin_write([0, 1], None, SIGMAS)
    writer.put(0, LAYER, ["positive"], tokens(0, chunks=1), num_tokens=10, evaluation=0)
    with pytest.raises(bank_mod.BankError, match="two positive chunks in two calls of one model evaluation"):
        writer.put(0, LAYER, ["positive"], tokens(0, chunks=1, offset=1.0), num_tokens=10, evaluation=0)
    # a later evaluation of the same step (Heun's second one) keeps the first tokens, as before
    bank = bank_mod.IdentityBank()
    writer = bank.begin_write([0, 1], None, SIGMAS)
    writer.put(0, LAYER, ["positive"], tokens(0, chunks=1), num_tokens=10, evaluation=0)
    writer.put(0, LAYER, ["positive"], tokens(0, chunks=1, offset=1.0), num_tokens=10, evaluation=1)
    writer.commit()
    assert torch.equal(bank.stored_tokens(0, LAYER, ["positive"], 10), tokens(0, chunks=1).half().float())


def test_one_layer_at_two_token_counts_in_a_write_is_refused_at_write_time(bank_mod):
    bank = bank_mod.IdentityBank()
    writer = bank.begin_write([0, 1], None, SIGMAS)
    writer.put(0, LAYER, ["positive"], tokens(0, chunks=1), num_tokens=10)
    with pytest.raises(bank_mod.BankError, match=r"output.3.0 with 10 tokens and then with 40.*area conditioning"):
        writer.put(0, LAYER, ["negative"], tokens(0, chunks=1), num_tokens=40)
    assert bank.empty and writer.entries == {}


# --- fp8 precision -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_error_bound_holds_below_the_normal_range_too(bank_mod, scaled):
    """|error| <= max(2^-4 |x|, 2^-10 * scale): relative in fp8's normal range, absolute below it, where the
    relative error is far above 6.25% (so a bound of 6.25% per value alone would be false)."""
    from comfyui_storydiffusion.attention.bank_format import decode, encode

    magnitudes = torch.logspace(-14, 8.7, 4001, base=2)
    values = torch.cat([magnitudes, -magnitudes, torch.tensor([0.003, 0.0009])]) * (50.0 if scaled else 1.0)
    stored, scale = encode(values, "fp8", scaled=scaled)
    back = decode(stored, scale, torch.float32)
    floor = 2.0 ** -10 * (float(scale) if scaled else 1.0)
    assert bool(((back - values).abs() <= torch.clamp(values.abs() / 16, min=floor) * (1 + 1e-6)).all())
    if not scaled:
        assert back[-2:].tolist() == [0.00390625, 0.0]  # the examples: 0.003 -> 0.0039, 0.0009 -> 0
    small = values.abs() < floor * 4
    assert float(((back - values).abs() / values.abs())[small].max()) > 0.0625


# --- pinned reads --------------------------------------------------------------------------------------------


def test_only_cpu_storage_read_by_a_cuda_device_is_pinned(bank_mod, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bank_mod.pins_reads("cpu", torch.device("cuda", 0)) and bank_mod.pins_reads("cpu", "cuda")
    assert not bank_mod.pins_reads("device", "cuda") and not bank_mod.pins_reads("cpu", "cpu")
    assert not bank_mod.pins_reads("cpu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not bank_mod.pins_reads("cpu", "cuda")


def test_a_pinned_read_keeps_the_step_pinned_and_copies_it_non_blocking(bank_mod, monkeypatch):
    """On a CPU machine: the pinning decision is faked, pin_memory is recorded and "meta" stands for the GPU."""
    bank = write(bank_mod.IdentityBank(dtype="fp32"))
    plain = bank.stored_tokens(0, LAYER, ["positive", "negative"], 10, device="cpu")
    assert torch.equal(plain, tokens(0))

    pinned, copies = [], []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and str(args[0]) == "meta":
            copies.append(kwargs.get("non_blocking"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(bank_mod, "pins_reads", lambda storage, device: str(device) == "meta")
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.shape) or self.clone())
    monkeypatch.setattr(torch.Tensor, "to", to)
    out = bank.stored_tokens(0, LAYER, ["positive", "negative"], 10, device="meta")
    assert out.device.type == "meta" and out.shape == (2, 2, 5, 16)
    assert pinned == [torch.Size([2, 5, 16])] * 2 and copies == [True, True]
    _, _, pinned_step, decoded = bank._step_cache[torch.device("cpu")]
    assert pinned_step is True and all(t.device.type == "cpu" for t in decoded.values())
    bank.stored_tokens(0, LAYER, ["positive"], 10, device="meta")
    assert len(pinned) == 2  # the step stays pinned: no second pin for the next layer call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_storage_read_on_cuda_is_pinned_and_exact(bank_mod):
    bank = write(bank_mod.IdentityBank(dtype="fp32"))
    out = bank.stored_tokens(1, LAYER, ["negative", "positive"], 10, device="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), tokens(1).flip(0))
    assert all(t.is_pinned() and t.device.type == "cpu" for t in bank._step_cache[torch.device("cpu")][3].values())
    bank.release()
    assert bank._step_cache == {}

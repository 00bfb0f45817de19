"""The identity bank inside ComfyUI never leaks, never loses, never misreads (issue 20, the glue's part): a read at
another latent shape of the same size is refused, a bank read by another model or LoRA set says so, a failed
rewrite keeps the committed bank, a read drops its decoded step when it ends, a cache node that skips model
evaluations during a write is named, and Save Identity Bank reports a full disk as such."""
from __future__ import annotations

import logging
import os

import pytest
import torch

from test_attention_comfy import STEPS, conds, make_sd15, make_story, patch


@pytest.fixture(scope="module")
def sd15():
    return make_sd15()


def sample(model, panels=2, height=8, width=8, steps=STEPS, cond_seed=0, callback=None, seed=5):
    import comfy.sample

    positive, negative = conds("sd15", panels, cond_seed)
    latent = torch.zeros(panels, 4, height, width)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, 4.0, "euler", "normal", positive, negative, latent,
                               callback=callback, disable_pbar=True, seed=seed)


def written(csa, sd15, **size):
    from comfyui_storydiffusion.attention.bank import IdentityBank

    story = make_story([("Ann",), ("Ann",), ("Ann",)], identity={"Ann": (0, 1)})
    patched = patch(csa, sd15, story=story)
    bank = IdentityBank()
    sample(csa.with_bank(patched, csa.MODE_WRITE, bank), **size)
    return patched, bank


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "identity bank" in r.getMessage()]


def test_a_read_at_another_latent_shape_of_the_same_size_is_refused(csa, sd15):
    patched, bank = written(csa, sd15, height=8, width=16)
    reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2)
    sample(reader, panels=1, height=8, width=16)  # the write's shape reads
    with pytest.raises(ValueError, match=r"another resolution: a latent of 8x16 .* this run's is 16x8 .*same size in another shape"):
        sample(reader, panels=1, height=16, width=8)


def test_a_bank_read_by_another_model_or_lora_set_warns(csa, sd15, caplog):
    patched, bank = written(csa, sd15)
    with caplog.at_level(logging.WARNING):
        sample(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), panels=1)
    assert not _warnings(caplog)  # the writer itself reads quietly

    other = patch(csa, make_sd15(seed=7))
    for reader_model, what in ((other, "another checkpoint"), (_with_lora(patched), "a LoRA on the reader only")):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sample(csa.with_bank(reader_model, csa.MODE_READ, bank, first_panel=0), panels=1)
        (message,) = _warnings(caplog)
        assert "written by another model" in message, what
    # the fingerprint is saved with the bank
    assert bank.fingerprint and bank.fingerprint.startswith("UNetModel|")


def _with_lora(model):
    """The same model with a weight patch on one attention projection (what LoraLoader adds)."""
    lora = model.clone()
    key = next(k for k in lora.model.state_dict() if k.endswith("attn1.to_q.weight"))
    delta = torch.full_like(lora.model.state_dict()[key], 1e-3)
    lora.add_patches({key: (delta,)}, 1.0)
    return lora


def test_a_failed_rewrite_keeps_the_committed_bank(csa, sd15):
    import comfy.model_management

    patched, bank = written(csa, sd15)
    reader = csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2)
    before = sample(reader, panels=1)
    keys = bank.keys()

    def interrupt(step, *args):
        if step == 1:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        sample(csa.with_bank(patched, csa.MODE_WRITE, bank), cond_seed=3, callback=interrupt)
    assert bank.keys() == keys and torch.equal(sample(reader, panels=1), before)
    with pytest.raises(ValueError, match="names 2 identity panels"):  # a refused rewrite too
        sample(csa.with_bank(patched, csa.MODE_WRITE, bank), panels=3)
    assert bank.keys() == keys and torch.equal(sample(reader, panels=1), before)


def test_a_read_run_drops_its_decoded_step_when_it_ends(csa, sd15):
    patched, bank = written(csa, sd15)
    seen = []
    real = bank.stored_tokens

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(bank.decoded_steps())
        return out

    bank.stored_tokens = spy
    sample(csa.with_bank(patched, csa.MODE_READ, bank, first_panel=2), panels=1)
    assert seen and seen[-1]  # the read decoded steps while it ran ...
    assert bank.decoded_steps() == {}  # ... and holds none after it


def test_a_cache_node_skipping_evaluations_during_a_write_is_named(csa, sd15):
    """ComfyUI's own EasyCache reuses earlier outputs instead of evaluating the model: the steps it skips would have
    no bank tokens, and a read there would fail later with a misleading message. The write says so instead."""
    from comfy_extras.nodes_easycache import EasyCacheNode

    from comfyui_storydiffusion.attention.bank import IdentityBank

    patched, _ = written(csa, sd15)
    bank = IdentityBank()
    writer = csa.with_bank(patched, csa.MODE_WRITE, bank)
    cached = EasyCacheNode.execute(writer, 3.0, 0.0, 1.0, False).args[0]
    with pytest.raises(ValueError, match=r"identity bank write skipped steps \[.*\] of 8.*EasyCache"):
        sample(cached, steps=8)
    assert bank.empty
    sample(writer, steps=8)  # without the cache the same write stores every step
    assert {step for step, _, _ in bank.keys()} == set(range(8))


def test_saving_to_a_full_disk_says_so(csa, sd15, monkeypatch):
    _, bank = written(csa, sd15)

    def full(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bank, "save", full)
    with pytest.raises(ValueError, match=r"could not save the identity bank into .*No space left on device.*Free disk"):
        csa.save_bank_file(bank, "ann")
    with pytest.raises(ValueError, match="must stay inside models/storydiffusion"):
        csa.save_bank_file(bank, os.path.join("..", "ann"))

"""The life cycle of a Consistent Self-Attention run: an OUTER_SAMPLE wrapper builds a fresh RunState for every
sampling run (and commits or drops a bank write at its end), the sampler's callback tells it which step is in
progress, and a PREDICT_NOISE wrapper reads each evaluation's sigma once (not once per layer)."""
from __future__ import annotations

import logging
import os
import shutil

import torch

from ...common.roles import CFG_ROLES, chunk_roles
from ..run import CONFIG_KEY, MODE_READ, MODE_WRITE, RUN_KEY, CSAConfig, PatchError, RunState, planned_steps

WRAPPER_KEY = "storydiffusion_csa"
log = logging.getLogger(__name__)

# share of the CPU memory (disk space) free when a write run starts that its identity bank may fill (the rest
# stays for the model, the latents and everything else the process holds)
BANK_MEMORY_SHARE = 0.8
BANK_DISK_SHARE = 0.9
BANK_SPILL_FOLDER = "storydiffusion_banks"  # in ComfyUI's temp folder (emptied when ComfyUI starts)


def bank_spill_parent() -> str:
    """Where a bank kept on disk gets its folder: ComfyUI's temp folder."""
    import folder_paths

    return os.path.join(folder_paths.get_temp_directory(), BANK_SPILL_FOLDER)


def bank_disk_limit(folder: str) -> int | None:
    """Bytes a bank kept on disk may take: BANK_DISK_SHARE of the free space where `folder` is (or will be)."""
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        return int(shutil.disk_usage(probe or ".").free * BANK_DISK_SHARE)
    except OSError:
        return None


def bank_memory_limit() -> int | None:
    """Bytes a write run's bank may take: BANK_MEMORY_SHARE of the free CPU memory as ComfyUI sees it."""
    import comfy.model_management

    try:
        free = comfy.model_management.get_free_memory(torch.device("cpu"))
    except Exception:  # noqa: BLE001 (any failure of a ComfyUI that cannot tell means: no limit, as before)
        return None
    return int(free * BANK_MEMORY_SHARE) if free else None


def device_free_memory(device) -> int:
    """Free memory of `device` as ComfyUI sees it (its allocator's free blocks included)."""
    import comfy.model_management

    return int(comfy.model_management.get_free_memory(device))


def start_run(config: CSAConfig, batch: int, sample_sigmas, roles: tuple = CFG_ROLES, grid=None) -> RunState:
    """The state of one sampling run; `grid`: the latent's (height, width), which a bank read must share with its
    write (equal token counts of another shape mix places in the picture)."""
    sigmas = tuple(float(s) for s in sample_sigmas)
    rows = config.rows_for(batch)
    run = RunState(sigmas, rows, config.share_for(rows), tuple(roles))
    if config.mode == MODE_WRITE:
        spill_parent = bank_spill_parent()
        run.writer = config.bank.begin_write(rows, config.characters_of(rows), sigmas, config.bank_content,
                                             planned_steps=planned_steps(config, sigmas),
                                             memory_limit=bank_memory_limit(), spill_parent=spill_parent,
                                             disk_limit=bank_disk_limit(spill_parent), grid=grid,
                                             fingerprint=config.fingerprint)
    elif config.mode == MODE_READ:
        config.bank.check_run(sigmas, config.bank_content, grid=grid)
        run.bank_reads = config.bank.reads_for(len(rows), config.characters_of(rows))
        mismatch = config.bank.writer_mismatch(config.fingerprint)
        if mismatch is not None:
            log.warning("StoryDiffusion: %s", mismatch)
    return run


def outer_sample_wrapper(executor, *args, **kwargs):
    """Fresh RunState per sampling run (args: noise, latent, sampler, sigmas, denoise_mask, callback, ...);
    counts the steps the sampler reports; commits or drops the bank write; a read drops its decoded step."""
    guider = executor.class_obj
    original = guider.model_options
    config = original.get("transformer_options", {}).get(CONFIG_KEY)
    if config is None:
        return executor(*args, **kwargs)
    noise, sigmas = args[0], args[3]
    grid = tuple(int(n) for n in noise.shape[-2:])
    run = start_run(config, int(noise.shape[0]), sigmas.flatten().tolist(), chunk_roles(guider), grid=grid)
    sampler_function = getattr(args[2], "sampler_function", None)
    run.sampler = getattr(sampler_function, "__name__", "")
    args, kwargs = count_steps(run, args, kwargs)
    import comfy.model_patcher

    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options["transformer_options"][RUN_KEY] = run
    try:
        output = executor(*args, **kwargs)
        unreached = run.unreached_message(config)
        if unreached is not None and run.writer is not None:
            raise PatchError(unreached + " Nothing was written to the identity bank.")
        if unreached is not None:
            log.warning(unreached)
        if run.writer is not None:
            skipped = run.skipped_write_message(config)
            if skipped is not None:
                raise PatchError(skipped)
            run.writer.commit()
            log.info("StoryDiffusion: %s", config.bank.describe())
        return output
    except BaseException:
        if run.writer is not None:
            run.writer.discard()  # the bank keeps what an earlier, finished write committed; no step files are left
        raise
    finally:
        guider.model_options = original
        if config.mode == MODE_READ:
            config.bank.release()  # the decoded step (on the device with storage 'device') goes with the run


def count_steps(run: RunState, args: tuple, kwargs: dict):
    """Wrap the sampler callback (called after each step's first evaluation, with the step index)."""
    position = 5  # outer_sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, ...)
    previous = args[position] if len(args) > position else kwargs.get("callback")

    def callback(step, *rest):
        run.report(step)
        if previous is not None:
            return previous(step, *rest)

    if len(args) > position:
        args = args[:position] + (callback,) + args[position + 1:]
    else:
        kwargs = dict(kwargs, callback=callback)
    return args, kwargs


def predict_noise_wrapper(executor, *args, **kwargs):
    """PREDICT_NOISE wrapper: tells the run state that a model evaluation starts (args: x, timestep, ...). Runs
    once per evaluation on the sampling thread, also under ComfyUI's multi-GPU (whose worker threads only run the
    chunks), so steps are counted once; it hands the run the per-device model clones of that multi-GPU."""
    options = executor.class_obj.model_options
    run = options.get("transformer_options", {}).get(RUN_KEY)
    if run is not None:
        run.clones = options.get("multigpu_clones")
        run.start_evaluation(float(args[1].flatten()[0]))
    return executor(*args, **kwargs)




def install_run_wrappers(patched) -> None:
    """Put (or put back) this module's OUTER_SAMPLE and PREDICT_NOISE wrappers on a patched clone."""
    import comfy.patcher_extension

    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                          (comfy.patcher_extension.WrappersMP.PREDICT_NOISE, predict_noise_wrapper)):
        patched.remove_wrappers_with_key(kind, WRAPPER_KEY)
        patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)

"""The ComfyUI glue that several packages share (the only module of common/ that speaks ComfyUI).

- `comfy_attention`: ComfyUI's own attention kernel (xformers/sdpa/sage/... as the user configured)
  with the signature the cores expect, attention(q, k, v, heads).
- `sigma_window` / `call_sigma`: start/end percent of the schedule -> sigmas, validated once, and the
  sigma of the model call a patch is running in.
- `model_folder`: the pack's model folders (models/storydiffusion, models/ipadapter) registered
  with folder_paths in one way, whoever asks first; the extensions of every caller are honoured.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from .attention import AttentionFn
from .roles import CFG_ROLES, chunk_roles, role_names
from .sigmas import SigmaWindow, check_percents


def comfy_attention(extra_options: dict) -> AttentionFn:
    """attention(q, k, v, heads) on [rows, tokens, heads*dim] through comfy's optimized_attention."""
    from comfy.ldm.modules import attention

    precision = extra_options.get("attn_precision")

    def attend(q, k, v, heads):
        return attention.optimized_attention(q, k, v, heads, attn_precision=precision, transformer_options=extra_options)

    return attend


def sigma_window(model, start_percent: float, end_percent: float) -> SigmaWindow:
    """The sigmas between start_percent and end_percent of this MODEL's schedule (raises on a bad range)."""
    check_percents(start_percent, end_percent)
    sampling = model.get_model_object("model_sampling")
    return SigmaWindow(start_sigma=float(sampling.percent_to_sigma(start_percent)),
                       end_sigma=float(sampling.percent_to_sigma(end_percent)))


def call_sigma(extra_options: dict) -> float | None:
    """The sigma of the current model call (None outside sampling)."""
    sigmas = extra_options.get("sigmas")
    return None if sigmas is None else float(sigmas.reshape(-1)[0])


def model_folder(name: str, extensions: Iterable[str]) -> list[str]:
    """Register models/<name> (if no one did) and make sure `extensions` are listed; returns its paths.

    extra_model_paths.yaml entries for the same name are kept: they are added to the same list.
    """
    import folder_paths

    wanted = {e.lower() for e in extensions}
    if name not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[name] = ([os.path.join(folder_paths.models_dir, name)], set(wanted))
    else:
        paths, known = folder_paths.folder_names_and_paths[name]
        if not wanted <= set(known):
            folder_paths.folder_names_and_paths[name] = (paths, set(known) | wanted)
    return folder_paths.get_folder_paths(name)


def model_files(name: str, extensions: Iterable[str], accept: Callable[[str], bool] = lambda path: True) -> list[str]:
    """File names in models/<name> with one of `extensions` whose full path `accept`s (e.g. 'is a bank')."""
    import folder_paths

    extensions = tuple(e.lower() for e in extensions)
    model_folder(name, extensions)
    return [f for f in folder_paths.get_filename_list(name)
            if f.lower().endswith(extensions) and accept(folder_paths.get_full_path(name, f))]


def model_file_path(name: str, file: str, extensions: Iterable[str]) -> str | None:
    """Full path of `file` in models/<name>, or None."""
    import folder_paths

    model_folder(name, extensions)
    return folder_paths.get_full_path(name, file)


# ---------------------------------------------------------------------------------------------------
# the chunks of a model call


ROLES_KEY = "storydiffusion_chunk_roles"
ROLES_WRAPPER_KEY = "storydiffusion_chunk_roles"


def roles_of_call(extra_options: dict) -> list:
    """The role of each chunk of this model call (per-run roles set by `with_chunk_roles`, CFG otherwise)."""
    return role_names(extra_options.get(ROLES_KEY) or CFG_ROLES, extra_options.get("cond_or_uncond") or [0])


def _roles_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: put this guider's chunk roles into the run's transformer_options."""
    import comfy.model_patcher

    guider = executor.class_obj
    original = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original)
    guider.model_options.setdefault("transformer_options", {})[ROLES_KEY] = chunk_roles(guider)
    try:
        return executor(*args, **kwargs)
    finally:
        guider.model_options = original


def with_chunk_roles(model_patcher) -> None:
    """Install (once) the wrapper that tells patches of this clone what each chunk of a call is."""
    import comfy.patcher_extension

    kind = comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
    model_patcher.remove_wrappers_with_key(kind, ROLES_WRAPPER_KEY)
    model_patcher.add_wrapper_with_key(kind, ROLES_WRAPPER_KEY, _roles_wrapper)

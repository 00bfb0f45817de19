"""Consistent Self-Attention on DiTs: transformer_options["optimized_attention_override"] runs CSA on the
selected blocks' joint attention and plain attention elsewhere, always through the override the MODEL had
before (another pack's attention backend), so it is never dropped."""
from __future__ import annotations

import inspect

from .. import core, dit
from ..bank import BankError
from ..run import CALLS_KEY, CONFIG_KEY, RUN_KEY, TOKENS_KEY, AttentionCalls, CSAConfig, PatchError, RunState
from ..schedule import layer_ordinal
from .dit_families import DiTFamily, DiTTokenLayout
from .lifecycle import WRAPPER_KEY, device_free_memory

OVERRIDE_SLOT = "optimized_attention_override"  # ComfyUI's one override slot (wrap_attn, 0.3.60+)


class DiTAttentionOverride:
    """transformer_options["optimized_attention_override"]: CSA on the selected DiT blocks, plain attention
    elsewhere. `inner` is the override the MODEL had before (another pack's attention backend): every
    attention we run goes through it, so it is never dropped.

    q/k/v come as [rows, heads, tokens, dim] (skip_reshape: Flux, Chroma, Qwen-Image, Lumina) or as
    [rows, tokens, heads*dim] (SD3, HiDream; SD3's v is [rows, tokens, heads, dim]); the mask as the `mask`
    keyword or the one positional argument after heads (optimized_attention_masked)."""

    def __init__(self, inner=None):
        self.inner = inner

    def __deepcopy__(self, memo):
        return self

    def attend(self, func, *args, **kwargs):
        if self.inner is not None:
            return self.inner(func, *args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def locate(options: dict, tokens: int):
        """(layer, tokens before the image, image tokens) of this call, or None when it is no panel's joint attention."""
        calls: AttentionCalls | None = options.get(CALLS_KEY)
        if calls is not None:
            return calls.next(tokens)
        layout = options.get(TOKENS_KEY)
        block_type, block_index = options.get("block_type"), options.get("block_index")
        if layout is None or block_type is None or block_index is None:
            return None
        image, trailing = layout
        text = tokens - image - trailing  # [text (maybe longer than the prompt), image, reference images]
        if text < 0:
            raise PatchError(f"StoryDiffusion: a {block_type} block attends over {tokens} tokens, fewer than the {image} "
                             f"image and {trailing} reference-image tokens of the model call (another patch changed the "
                             "tokens?): cannot place the image tokens")
        return (str(block_type), int(block_index), 0), text, image

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        options = kwargs.get("transformer_options") or {}
        config: CSAConfig | None = options.get(CONFIG_KEY)
        run: RunState | None = options.get(RUN_KEY)
        skip = bool(kwargs.get("skip_reshape", False))
        if config is None or run is None or len(args) > 1 or (q.ndim, skip) not in ((4, True), (3, False)):
            return self.attend(func, q, k, v, heads, *args, **kwargs)  # not a joint attention of a sampled panel batch
        tokens = k.shape[2] if skip else k.shape[1]
        if (q.shape[2] if skip else q.shape[1]) != tokens:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        located = self.locate(options, int(tokens))
        if located is None:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        layer, text, image = located
        if layer is None or layer not in config.layers:
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        kinds = list(options.get("cond_or_uncond") or [0])
        chunks = len(kinds)
        rows, share = run.rows_of_call(q.shape[0], chunks, options)
        if text + image > tokens:
            raise PatchError(f"StoryDiffusion: a {config.family} block attends over {tokens} tokens, fewer than the "
                             f"{text} text + {image} image tokens of the model call (another patch changed the tokens?)")
        sigma = run.sigma_of(options)
        step = run.step_of(sigma)
        if not config.schedule.active(step, sigma, layer):
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        run.reach(step, layer)
        calls = options.get(CALLS_KEY)
        if calls is not None:
            calls.used = True
        sampled = core.sample_panel_tokens(image, config.rate, config.seed, step, layer_ordinal(layer), rows)
        if not skip:  # [rows, tokens, heads*dim] (v may be [rows, tokens, heads, dim]) -> [rows, heads, tokens, dim]
            q4, k4, v4 = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        else:
            q4, k4, v4 = q, k, v
        if run.writer is not None and sampled.shape[1] > 0:
            stored = dit.sampled_keys_values(k4, v4, chunks=chunks, text_tokens=text, sampled=sampled)
            run.write(step, layer, run.roles_of(kinds), stored, image)
        bank = self.bank_tokens(config, run, step, layer, kinds, image, heads, k4) if run.bank_reads is not None else None
        nothing_shared = sampled.shape[1] == 0 or not bool(share.any())
        if nothing_shared and (bank is None or not bool(bank.reads.any())):
            return self.attend(func, q, k, v, heads, *args, **kwargs)
        mask = args[0] if args else kwargs.get("mask")
        rest = {key: value for key, value in kwargs.items() if key not in ("mask", "skip_reshape")}

        def kernel(qq, kk, vv, panel_mask):
            return self.attend(func, qq, kk, vv, heads, mask=panel_mask, skip_reshape=True, **rest)

        return dit.joint_consistent_attention(q4, k4, v4, chunks=chunks, text_tokens=text, image_tokens=image,
                                              share=share, sampled=sampled, window=run.window(config),
                                              mask=mask, bank=bank, attention=kernel,
                                              budget=run.attention_budget(config, q.device, device_free_memory))

    @staticmethod
    def bank_tokens(config: CSAConfig, run: RunState, step: int, layer, kinds, image: int, heads: int,
                    k) -> core.BankTokens:
        """The bank's keys and values for this call, [chunks, bank panels, heads, n, dim] each."""
        try:
            stored = config.bank.stored_tokens(step, layer, run.roles_of(kinds), image, device=k.device, dtype=k.dtype)
        except BankError as e:
            raise BankError(f"StoryDiffusion: {e}") from None
        bank_k, bank_v = dit.bank_keys_values(stored.to(k.device, k.dtype), heads)
        return core.BankTokens(bank_k, bank_v, run.bank_reads)


def patch_dit(model, family: DiTFamily):
    """A clone of a DiT MODEL with the override (chained to the one it had) and the token-layout wrapper."""
    import comfy.patcher_extension

    patched = model.clone()
    options = patched.model_options.setdefault("transformer_options", {})
    previous = options.get(OVERRIDE_SLOT)
    if isinstance(previous, DiTAttentionOverride):  # patching an already patched model: replace ours, keep theirs
        previous = previous.inner
    options[OVERRIDE_SLOT] = DiTAttentionOverride(previous)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY)
    diffusion_model = model.model.diffusion_model
    forward = getattr(diffusion_model, "_forward", None) or diffusion_model.forward  # MMDiT has no _forward (and no wrapper)
    layout = DiTTokenLayout(family, inspect.signature(forward))
    patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, WRAPPER_KEY, layout)
    family.install(patched, diffusion_model)
    return patched


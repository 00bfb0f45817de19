"""Test-only ComfyUI custom node (loaded by the workflow test server, tests/wan_fixtures.server_args; never shipped).

Core ComfyUI builds a umt5 text encoder from umt5_config_xxl.json whatever the file's shapes (5.7 B parameters),
so a tiny random umt5 cannot be loaded as it is. This wraps comfy.sd.load_text_encoder_state_dicts: when one text
encoder state dict has umt5-xxl's layout (d_model 4096, per-block relative attention bias) but other sizes, the
sizes read from its shapes go to ComfyUI's own override, model_options["umt5xxl_model_config"]. Real files are
left alone (their sizes are the config's); tokenizer, model class and encoding stay ComfyUI's, and so does detection
up to 0.8.0, which takes block 23's wi_1 of width 4096 for T5-XXL. ComfyUI 0.29.0 wants that tensor's first
dimension to be umt5-xxl's d_ff (10240) and takes anything else for a 768-wide T5-base, so for a tiny umt5 (only)
detection says T5-XXL, what it says for the real file.
"""
import json
import os
import re

import comfy.sd
import comfy.text_encoders.t5

_load = comfy.sd.load_text_encoder_state_dicts
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")


def umt5_sizes(sd) -> dict:
    """The umt5 config entries that differ from umt5-xxl's, read from a state dict ({} for anything else)."""
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    if bias not in sd or "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in sd:
        return {}  # not umt5 (T5 keeps its bias in block 0 only)
    heads = sd[bias].shape[1]
    sizes = {"num_layers": 1 + max(int(m.group(1)) for k in sd for m in [_BLOCK.match(k)] if m),
             "num_heads": heads, "d_kv": sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
             "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
             "vocab_size": sd["shared.weight"].shape[0]}
    with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "umt5_config_xxl.json")) as f:
        config = json.load(f)
    return {k: v for k, v in sizes.items() if config[k] != v}


def load_text_encoder_state_dicts(state_dicts=(), embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                                  model_options=None, *extra, **kwargs):
    """ComfyUI's loader; `extra` / `kwargs` are its newer arguments (0.29.0: disable_dynamic), passed on."""
    state_dicts, model_options = list(state_dicts), dict(model_options or {})
    sizes = umt5_sizes(state_dicts[0]) if len(state_dicts) == 1 and clip_type == comfy.sd.CLIPType.WAN else {}
    if not sizes:
        return _load(state_dicts, embedding_directory, clip_type, model_options, *extra, **kwargs)
    model_options = {**model_options, "umt5xxl_model_config": sizes}
    detect = comfy.sd.detect_te_model
    comfy.sd.detect_te_model = lambda sd: comfy.sd.TEModel.T5_XXL if sd is state_dicts[0] else detect(sd)
    try:
        return _load(state_dicts, embedding_directory, clip_type, model_options, *extra, **kwargs)
    finally:
        comfy.sd.detect_te_model = detect


comfy.sd.load_text_encoder_state_dicts = load_text_encoder_state_dicts
NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

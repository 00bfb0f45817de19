"""Tiny random text-encoder files for the DiT families, loadable by ComfyUI's own CLIP loaders.

`write(kind, path)` saves a safetensors file whose tensor names are exactly the ones ComfyUI loads from
the real public file (they are taken from ComfyUI's own text-encoder classes, whose module names are the
checkpoint key names: "text_model.encoder.layers.0.self_attn.q_proj.weight", "shared.weight",
"encoder.block.0.layer.0.SelfAttention.q.weight", "model.embed_tokens.weight",
"model.layers.0.self_attn.q_proj.weight", ...), with narrow widths and few layers. Every embedding keeps
the real vocabulary size, so every id the real tokenizer can produce has a row.

What ComfyUI reads from the file and what it fixes (ComfyUI 0.3.75, comfy/sd.py + comfy/text_encoders):

* Widths/depths are NOT read from the state dict: CLIP-L/G and T5 configs come from the JSON files next
  to the encoders and the Llama-style configs (Qwen2.5-VL, Qwen3, Mistral-3, Gemma-2) are fixed
  dataclasses. The only override ComfyUI offers is the model option ``"<name>_model_config"`` (a dict
  merged into the config, comfy/sd1_clip.py SDClipModel.__init__), e.g. ``{"t5xxl_model_config":
  {"d_model": 16, ...}}``; for CLIP-L/G the loader itself overwrites those two with the generic
  ``"model_config"`` option (comfy/text_encoders/long_clipl.py), so both CLIPs share one override there.
  `load()` passes exactly that to `comfy.sd.load_clip`, and `install_loader_hook()` makes the loader
  nodes (CLIPLoader, DualCLIPLoader, TripleCLIPLoader) do the same for files written here (the config is stored in the file's safetensors metadata). Nothing else of the loader is changed.
  `head_dim` of the Llama-style configs is a class constant (128; 256 for Gemma) and stays real.
* Detection (comfy.sd.detect_te_model) for single-file / SD3-dual routes reads shapes of a few keys:
  - T5-XXL: "encoder.block.23.layer.1.DenseReluDense.wi_1.weight" must exist with width 4096. The
    smallest real-width T5 file would carry a 32128 x 4096 embedding (> 250 MB), so the tiny T5 has 2
    blocks plus that one *marker* tensor (shape (1, 4096)); the 2-block model does not have that key,
    so ComfyUI ignores it when loading ("clip unexpected", debug log only). ComfyUI 0.29.0 reads the marker's
    first dimension instead (T5-XXL's d_ff, 10240: an 80 MB marker): `load()` / `install_loader_hook()` detect a
    file written here as T5-XXL by the older rule on every version (`_detect_t5xxl`).
  - CLIP-G: "text_model.encoder.layers.30..." must exist, so the tiny CLIP-G keeps its 32 layers.
  - Qwen2.5-VL 7B: the k_proj bias must be 512 wide (4 KV heads x 128): kept (hidden width stays tiny).
  - Qwen3-4B: presence of q_norm; Gemma-2: presence of post_feedforward_layernorm: kept.
  - Mistral-3 (Flux.2): layer-0 post_attention_layernorm must be 5120 wide, i.e. a 5120-wide model
    (30 layers, >80 M parameters even with one head): no small file passes. `load()` /
    `install_loader_hook()` therefore map a file written here with kind "mistral3_24b" to
    TEModel.MISTRAL3_24B_PRUNED_FLUX2 (what detection gives the real pruned Flux.2 file); the clip
    target built from it is the loader's own.
* Tokenizers: CLIP, T5 and Qwen2.5 (used by Qwen-Image and Z-Image) ship under comfy/text_encoders/ and
  are used as they are. Gemma-2 (Lumina 2) and Mistral-3 (Flux.2) tokenizers are NOT shipped: the real
  files carry them as a tensor ("spiece_model" / "tekken_model"). The tiny files carry a small tokenizer
  of the same format trained/built here (a SentencePiece unigram model with Gemma's special ids; a
  byte-level tekken vocabulary with Mistral's special tokens). NOTE: ComfyUI 0.3.75 builds the Flux.2
  tokenizer with `MistralConverter(vocab=..., additional_special_tokens=...)`, which the transformers of
  the harness (5.x: `MistralConverter(vocab_file)`) rejects, so CLIPLoader type "flux2" fails there
  for any file, real or tiny (a ComfyUI/transformers version mismatch, not a property of the file).
* Qwen2.5-VL: ComfyUI always builds the 32-layer vision tower (its sizes are constants); its weights are
  not in the tiny file (a "clip missing" warning) and text-only encoding never runs it.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import math
import os

import torch

# kind -> (loader node, clip type, file name used in workflows): the usual loader of that file
KINDS = {
    "clip_l": ("DualCLIPLoader", "flux", "tiny_clip_l.safetensors"),
    "clip_g": ("TripleCLIPLoader", "sd3", "tiny_clip_g.safetensors"),
    "t5xxl": ("DualCLIPLoader", "flux", "tiny_t5xxl.safetensors"),
    "qwen25_7b": ("CLIPLoader", "qwen_image", "tiny_qwen_2.5_vl_7b.safetensors"),
    "qwen3_4b": ("CLIPLoader", "lumina2", "tiny_qwen_3_4b.safetensors"),
    "gemma2_2b": ("CLIPLoader", "lumina2", "tiny_gemma_2_2b.safetensors"),
    "mistral3_24b": ("CLIPLoader", "flux2", "tiny_mistral_3_small_flux2.safetensors"),
    "llama3_8b": ("QuadrupleCLIPLoader", "hidream", "tiny_llama_3.1_8b_instruct.safetensors"),
}

# family -> (loader node, clip type, kinds in the loader's input order)
FAMILIES = {
    "flux": ("DualCLIPLoader", "flux", ("clip_l", "t5xxl")),
    "flux2": ("CLIPLoader", "flux2", ("mistral3_24b",)),
    "chroma": ("CLIPLoader", "chroma", ("t5xxl",)),
    # SD3 with all three needs a 4096-wide T5 (ComfyUI pads the CLIP-L+G cond to 4096 and concatenates
    # it with the T5 tokens), i.e. a >250 MB embedding: the tiny files cover the two SD3 routes without it
    "sd3_lg": ("DualCLIPLoader", "sd3", ("clip_l", "clip_g")),
    "sd3_t5": ("CLIPLoader", "sd3", ("t5xxl",)),
    "qwen_image": ("CLIPLoader", "qwen_image", ("qwen25_7b",)),
    "z_image": ("CLIPLoader", "lumina2", ("qwen3_4b",)),
    "lumina2": ("CLIPLoader", "lumina2", ("gemma2_2b",)),
    "hidream": ("QuadrupleCLIPLoader", "hidream", ("clip_l", "clip_g", "t5xxl", "llama3_8b")),
}

WIDTH = 16
METADATA_KEY = "storydiffusion_tiny_text_encoder"
T5_MARKER = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"

_CLIP = {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH, "num_attention_heads": 2, "projection_dim": WIDTH}

# the model option name ComfyUI reads the config override from, and the override itself
_CONFIGS = {
    # CLIP-L and CLIP-G share one override: ComfyUI replaces "clip_l_model_config"/"clip_g_model_config"
    # by the generic "model_config" option (comfy/text_encoders/long_clipl.py); layer counts stay real
    # (12 / 32: detection tells CLIP-L from CLIP-G by layers 1 and 30)
    "clip_l": ("model_config", _CLIP),
    "clip_g": ("model_config", _CLIP),
    "t5xxl": ("t5xxl_model_config", {"d_model": WIDTH, "d_ff": 2 * WIDTH, "d_kv": 8, "num_heads": 2,
                                     "num_layers": 2}),
    "qwen25_7b": ("qwen25_7b_model_config", {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 4}),
    "qwen3_4b": ("qwen3_4b_model_config", {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                                           "num_hidden_layers": 3, "num_attention_heads": 2,
                                           "num_key_value_heads": 1}),
    "gemma2_2b": ("gemma2_2b_model_config", {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                                             "num_hidden_layers": 3, "num_attention_heads": 2,
                                             "num_key_value_heads": 1}),
    # HiDream I1's Llama-3.1 8B: every layer's states (layer "all"); HiDream builds it with vocab 128256
    "llama3_8b": ("llama_model_config", {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                                         "num_hidden_layers": 3, "num_attention_heads": 2,
                                         "num_key_value_heads": 1, "vocab_size": 128256}),
    # 30 layers: Flux.2 reads the outputs of layers 10, 20 and 30
    "mistral3_24b": ("mistral3_24b_model_config", {"hidden_size": WIDTH, "intermediate_size": 2 * WIDTH,
                                                   "num_hidden_layers": 30, "num_attention_heads": 1,
                                                   "num_key_value_heads": 1}),
}


def model_options(kinds) -> dict:
    """The `model_options` that make ComfyUI build the tiny configs of these kinds."""
    if isinstance(kinds, str):
        kinds = (kinds,)
    return {_CONFIGS[k][0]: dict(_CONFIGS[k][1]) for k in kinds}


def _module(kind: str):
    """ComfyUI's own text model for `kind` at the tiny config: its state-dict names are the file's."""
    import comfy.clip_model
    import comfy.ops
    import comfy.text_encoders.t5
    from comfy.text_encoders import llama

    here = os.path.dirname(comfy.clip_model.__file__)
    config = dict(_CONFIGS[kind][1])
    ops = comfy.ops.disable_weight_init
    if kind in ("clip_l", "clip_g"):
        name = "sd1_clip_config.json" if kind == "clip_l" else "clip_config_bigg.json"
        with open(os.path.join(here, name)) as f:
            full = json.load(f)
        full.update(config)
        return comfy.clip_model.CLIPTextModel(full, torch.float32, "cpu", ops)
    if kind == "t5xxl":
        with open(os.path.join(here, "text_encoders", "t5_config_xxl.json")) as f:
            full = json.load(f)
        full.update(config)
        return comfy.text_encoders.t5.T5(full, torch.float32, "cpu", ops)
    cls = {"qwen25_7b": llama.Qwen25_7BVLI, "qwen3_4b": llama.Qwen3_4B, "gemma2_2b": llama.Gemma2_2B,
           "mistral3_24b": llama.Mistral3Small24B, "llama3_8b": llama.Llama2}[kind]
    if kind == "mistral3_24b":
        config["final_norm"] = False  # the pruned Flux.2 encoder has no final norm (as ComfyUI builds it)
    model = cls(config, torch.float32, "meta" if kind == "qwen25_7b" else "cpu", ops)
    if kind == "qwen25_7b":  # text part only: build it for real, leave the vision tower (not in the file)
        model.model = llama.Llama2_(llama.Qwen25_7BVLI_Config(**config), device="cpu", dtype=torch.float32, ops=ops)
        del model.visual
    return model


@torch.no_grad()
def _random_state_dict(module: torch.nn.Module, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in module.state_dict().items():
        if name.endswith("position_ids"):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim == 1:
            if "norm" in name and leaf == "weight":
                # Gemma's RMSNorm multiplies by (1 + weight)
                value = torch.zeros(p.shape) if "gemma" in type(module).__name__.lower() else torch.ones(p.shape)
            else:
                value = 0.02 * torch.randn(p.shape, generator=gen)
        elif "embed" in name or name == "shared.weight" or "relative_attention_bias" in name:
            value = 0.5 * torch.randn(p.shape, generator=gen)
        else:
            value = torch.randn(p.shape, generator=gen) * (0.7 / math.sqrt(p[0].numel()))
        out[name] = value.to(torch.float32).contiguous()
    return out


def _gemma_spiece() -> bytes:
    """A small SentencePiece model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import io

    import sentencepiece

    words = ["a", "girl", "with", "red", "hair", "green", "raincoat", "an", "old", "man", "white", "beard", "waits",
             "at", "bus", "stop", "on", "the", "in", "rain", "night", "car", "fire", "explosion", "swims", "sea",
             "reads", "newspaper", "runs", "comic", "book", "panel", "anime", "style", "detail", "number", "photo",
             "of", "cinematic", "lighting", "blurry", "low", "quality", "is", "this", "seat", "taken", "monday"]
    sentences = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 4
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=320, hard_vocab_limit=False, model_type="unigram",
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0,
        minloglevel=2, num_threads=1)
    return model.getvalue()


# Mistral-3 special tokens used by the Flux.2 template, at their tekken ranks
_MISTRAL_SPECIALS = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "[INST]", 4: "[/INST]", 11: "<pad>",
                     17: "[SYSTEM_PROMPT]", 18: "[/SYSTEM_PROMPT]"}


def _tekken(num_special: int = 1000, vocab_size: int = 131072) -> bytes:
    """A tekken.json with Mistral's special-token layout and a byte-level vocabulary (no merges)."""
    specials = [{"rank": r, "token_str": _MISTRAL_SPECIALS.get(r, f"<SPECIAL_{r}>"), "is_control": True}
                for r in range(num_special)]
    vocab = [{"rank": r, "token_bytes": base64.b64encode(bytes([r])).decode(), "token_str": None}
             for r in range(256)]
    data = {"config": {"pattern": r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
                                  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
                                  r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
                       "num_vocab_tokens": 256, "default_vocab_size": vocab_size,
                       "default_num_special_tokens": num_special, "version": "v7"},
            "vocab": vocab, "special_tokens": specials}
    return json.dumps(data).encode()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def write(kind: str, path: str, seed: int = 0) -> str:
    """Write a tiny random `kind` text-encoder file (see KINDS) to `path`; returns `path`."""
    from safetensors.torch import save_file

    if kind not in _CONFIGS:
        raise KeyError(f"unknown text encoder kind {kind!r}; known: {sorted(_CONFIGS)}")
    sd = _random_state_dict(_module(kind), seed)
    if kind == "t5xxl":
        sd[T5_MARKER] = torch.zeros(1, 4096)  # detection marker only, see module docstring
    elif kind == "gemma2_2b":
        sd["spiece_model"] = _bytes_tensor(_gemma_spiece())
    elif kind == "mistral3_24b":
        sd["tekken_model"] = _bytes_tensor(_tekken())
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    metadata = {METADATA_KEY: json.dumps({"kind": kind, "option": _CONFIGS[kind][0],
                                          "config": _CONFIGS[kind][1]})}
    save_file(sd, path, metadata=metadata)
    return path


def read_kind(path: str) -> dict | None:
    """{"kind", "option", "config"} of a file written here, None for any other file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):  # not a safetensors file, or none at that path
        return None
    return json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else None


@contextlib.contextmanager
def _detect_first(rule):
    """comfy.sd.detect_te_model with `rule(state_dict)` (a TEModel, or None to fall through) tried first."""
    import comfy.sd

    original = comfy.sd.detect_te_model
    comfy.sd.detect_te_model = lambda sd: rule(sd) or original(sd)
    try:
        yield
    finally:
        comfy.sd.detect_te_model = original


def _detect_flux2():
    """Detection of the tiny Mistral-3 file as the pruned Flux.2 encoder (see module docstring)."""
    import comfy.sd

    def rule(sd):
        if "tekken_model" in sd and "model.layers.0.post_attention_layernorm.weight" in sd:
            return comfy.sd.TEModel.MISTRAL3_24B_PRUNED_FLUX2
        return None

    return _detect_first(rule)


def _detect_t5xxl():
    """Detection of the tiny T5 file as T5-XXL on every version: 0.3.75 and 0.8.0 take the 4096-wide marker's last
    dimension (d_model); 0.29.0 reads its first dimension instead and wants T5-XXL's d_ff (10240), which no small file
    can have (a 10240 x 4096 marker alone is 80 MB), and else takes the file for a 768-wide T5-base."""
    import comfy.sd

    def rule(sd):
        marker = sd.get(T5_MARKER)
        if marker is not None and marker.shape[-1] == 4096 and "encoder.block.0.layer.0.SelfAttention.k.weight" in sd:
            return comfy.sd.TEModel.T5_XXL
        return None

    return _detect_first(rule)


def _clip_type(clip_type):
    import comfy.sd

    if isinstance(clip_type, str):
        return getattr(comfy.sd.CLIPType, clip_type.upper(), comfy.sd.CLIPType.STABLE_DIFFUSION)
    return clip_type


def _detect_qwen3_4b():
    """Detection of the tiny Qwen3-4B file as Qwen3-4B: ComfyUI 0.8.0 tells Qwen3-4B from Qwen3-2B by the hidden
    width (2560 / 2048) and takes anything else for Llama-3 8B; 0.3.75 needs only the q_norm key."""
    import comfy.sd

    width = _CONFIGS["qwen3_4b"][1]["hidden_size"]

    def rule(sd):
        norm = sd.get("model.layers.0.post_attention_layernorm.weight")
        if "model.layers.0.self_attn.q_norm.weight" in sd and norm is not None and norm.shape[0] == width:
            return comfy.sd.TEModel.QWEN3_4B
        return None

    return _detect_first(rule)


def load_files(paths: list[str], clip_type, model_options: dict | None = None, *extra, **kwargs):
    """`comfy.sd.load_clip` on files written here, with their config overrides (what the loader nodes
    do once `install_loader_hook()` is active). `extra` / `kwargs`: load_clip's newer arguments, passed on
    (0.29.0's disable_dynamic, which its model patcher passes positionally when it reloads a CLIP)."""
    options = dict(model_options or {})
    kinds = [read_kind(p) for p in paths]
    for info in kinds:
        if info is not None:
            options.setdefault(info["option"], dict(info["config"]))
    ctx = _detect_flux2() if any(i and i["kind"] == "mistral3_24b" for i in kinds) else contextlib.nullcontext()
    qwen3 = _detect_qwen3_4b() if any(i and i["kind"] == "qwen3_4b" for i in kinds) else contextlib.nullcontext()
    t5 = _detect_t5xxl() if any(i and i["kind"] == "t5xxl" for i in kinds) else contextlib.nullcontext()
    with ctx, qwen3, t5:
        return _ORIGINAL_LOAD_CLIP[0](list(paths), None, _clip_type(clip_type), options, *extra, **kwargs)


_ORIGINAL_LOAD_CLIP: list = []


def _remember_original():
    import comfy.sd

    if not _ORIGINAL_LOAD_CLIP:
        _ORIGINAL_LOAD_CLIP.append(getattr(comfy.sd.load_clip, "_tiny_original", comfy.sd.load_clip))


def _layout_tag(kind: str) -> str:
    """Names and shapes of ComfyUI's own module for `kind` plus its config: files written by ComfyUI versions
    whose text models differ get their own cache entry."""
    shapes = sorted((k, list(v.shape)) for k, v in _module(kind).state_dict().items())
    return hashlib.sha1(json.dumps([shapes, _CONFIGS[kind]], sort_keys=True).encode()).hexdigest()[:10]


def path_for(kind: str, directory: str | None = None, seed: int = 0) -> str:
    """The tiny `kind` file (KINDS file name) in `directory`, written once; by default in the per-machine cache
    (.harness/cache/text_encoders/<layout tag>/)."""
    name = KINDS[kind][2] if seed == 0 else KINDS[kind][2].replace(".safetensors", f"_s{seed}.safetensors")
    if directory is None:
        import comfy_env

        return comfy_env.cached_file(f"text_encoders/{_layout_tag(kind)}", name,
                                     lambda path: write(kind, path, seed=seed))
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        write(kind, path, seed=seed)
    return path


def load(kind_or_kinds, clip_type, seed: int = 0, directory: str | None = None):
    """A ComfyUI CLIP object from the tiny file(s), loaded like CLIPLoader / DualCLIPLoader /
    TripleCLIPLoader with `clip_type` ("flux", "chroma", "sd3", "qwen_image", "lumina2", "flux2", ...).
    A family name of FAMILIES may be given instead of kinds (then clip_type may be None)."""
    if isinstance(kind_or_kinds, str) and kind_or_kinds in FAMILIES:
        _, family_type, kinds = FAMILIES[kind_or_kinds]
        clip_type = clip_type or family_type
    else:
        kinds = (kind_or_kinds,) if isinstance(kind_or_kinds, str) else tuple(kind_or_kinds)
    _remember_original()
    return load_files([path_for(k, directory, seed) for k in kinds], clip_type)


def install_loader_hook():
    """Make `comfy.sd.load_clip` (hence the CLIPLoader / DualCLIPLoader / TripleCLIPLoader nodes) load
    files written here with their tiny configs; other files load exactly as before. Idempotent; returns
    a function that removes the hook."""
    import comfy.sd

    _remember_original()
    original = _ORIGINAL_LOAD_CLIP[0]

    def load_clip(ckpt_paths, embedding_directory=None, clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION,
                  model_options=None, *extra, **kwargs):
        model_options = model_options or {}
        if not any(read_kind(p) for p in ckpt_paths):
            return original(ckpt_paths, embedding_directory, clip_type, model_options, *extra, **kwargs)
        return load_files(ckpt_paths, clip_type, model_options, *extra, **kwargs)

    load_clip._tiny_original = original
    comfy.sd.load_clip = load_clip

    def remove():
        comfy.sd.load_clip = original

    return remove

"""IP-Adapter weight files: what a file holds, and its image projection, in plain torch (no ComfyUI).

Stage 2 of StoryDiffusion steers each video frame with its own (predicted) CLIP image embedding.
The authors never released their conditioning weights, so the pack reuses the public IP-Adapter
files (tencent-ailab/IP-Adapter), which add exactly that: an image-token branch next to every
cross-attention of the UNet,

    out = Attention(q, K_text, V_text) + weight * Attention(q, to_k_ip(tokens), to_v_ip(tokens)),

where `tokens` are the CLIP image embedding projected to a few context tokens. Here frame j of the
latent batch gets the tokens of embedding j (frames.py).

Facts about the public files (tencent-ailab/IP-Adapter, cubiq/ComfyUI_IPAdapter_plus):
- A `.bin` is a torch pickle `{"image_proj": {...}, "ip_adapter": {...}}`; a `.safetensors` is flat
  with the prefixes `image_proj.` and `ip_adapter.` (some training scripts save `adapter_modules.`).
- `ip_adapter` holds `"{n}.to_k_ip.weight"` / `"{n}.to_v_ip.weight"` ([inner_dim, context_dim], no
  bias). `n` counts the attention processors of the diffusers UNet (attn1, attn2, attn1, attn2, …)
  in module order down blocks → up blocks → mid block; only the cross-attentions (odd n = 2i+1)
  carry IP weights. SD1.5 has 16 of them (context 768), SDXL 70 (context 2048).
- `image_proj` is one of
  * plain (`ip-adapter_sd15`, `ip-adapter_sdxl_vit-h`, …): `proj.weight` [tokens*C, clip_dim],
    `proj.bias`, `norm.weight/bias` [C]; input CLIP `image_embeds` [N, clip_dim]; 4 tokens;
  * plus (`ip-adapter-plus_sd15`, `ip-adapter-plus_sdxl_vit-h`, `…plus-face…`): a perceiver
    resampler: `latents` [1, tokens, dim], `proj_in`, `proj_out`, `norm_out`, and per layer i
    `layers.i.0.{norm1,norm2,to_q,to_kv,to_out}` (attention, dim_head 64, no bias) and
    `layers.i.1.{0,1,3}` (LayerNorm, Linear dim→4·dim, GELU, Linear back; no bias); input the
    penultimate CLIP hidden states [N, 257, clip_dim]; 16 tokens;
  * full (`ip-adapter-full-face_sd15`): `proj.0` Linear, GELU, `proj.2` Linear, `proj.3` LayerNorm
    over the penultimate hidden states (one token per CLIP token).
- FaceID files (`…to_q_lora…` keys) need InsightFace and a LoRA: not supported here.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..common.attention import multihead_attention
from ..common.errors import StoryDiffusionError, load_failure_reason

IMAGE_PROJ = "image_proj"
IP_ADAPTER = "ip_adapter"
_GROUP_PREFIXES = {"image_proj.": IMAGE_PROJ, "ip_adapter.": IP_ADAPTER, "adapter_modules.": IP_ADAPTER}
_KEY_RE = re.compile(r"^(\d+)\.to_([kv])_ip\.weight$")
_PERCEIVER_DIM_HEAD = 64  # every public "plus" resampler uses 64-wide heads

# context width -> the model family that cross-attends to it (for error messages)
CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


def family_name(context_dim: int) -> str:
    return CONTEXT_FAMILIES.get(context_dim, f"a model with {context_dim}-wide text context")


class IPAdapterFormatError(StoryDiffusionError):
    """The file is not a usable IP-Adapter weight file; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------------
# weight files


def group_state_dict(state_dict: dict, source: str = "the IP-Adapter file") -> dict:
    """Nested {"image_proj": {...}, "ip_adapter": {...}} from either the nested `.bin` layout or the
    flat `.safetensors` layout."""
    if not isinstance(state_dict, dict):
        raise IPAdapterFormatError(f"{source} holds a {type(state_dict).__name__}, not a state dict of tensors.")
    if IP_ADAPTER in state_dict or IMAGE_PROJ in state_dict or "adapter_modules" in state_dict:
        groups = {IMAGE_PROJ: dict(state_dict.get(IMAGE_PROJ) or {}),
                  IP_ADAPTER: dict(state_dict.get(IP_ADAPTER) or state_dict.get("adapter_modules") or {})}
    else:
        groups = {IMAGE_PROJ: {}, IP_ADAPTER: {}}
        for key, value in state_dict.items():
            for prefix, group in _GROUP_PREFIXES.items():
                if key.startswith(prefix):
                    groups[group][key[len(prefix):]] = value
                    break
    for name in (IMAGE_PROJ, IP_ADAPTER):
        if not groups[name]:
            raise IPAdapterFormatError(
                f"{source} has no '{name}' weights: it is not an IP-Adapter file (expected top-level groups "
                f"'image_proj' and 'ip_adapter', or keys prefixed 'image_proj.' / 'ip_adapter.'). Put an "
                f"IP-Adapter model such as ip-adapter_sd15.safetensors in models/ipadapter.")
        for key, value in groups[name].items():
            if not isinstance(value, torch.Tensor):
                raise IPAdapterFormatError(f"{source}: '{name}.{key}' is a {type(value).__name__}, not a tensor.")
    return groups


def load_ipadapter_file(path: str) -> dict:
    """Read an IP-Adapter `.safetensors` or torch pickle (weights only) into the nested layout."""
    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path, device="cpu")
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (corrupt, truncated, or not a weight file at all: loaders raise many types)
        # never PyTorch's own text when it advises weights_only=False (unsafe); `from None` keeps it out of logs
        raise IPAdapterFormatError(
            f"IP-Adapter file '{name}' is corrupt, incomplete or not an IP-Adapter file ({load_failure_reason(e)}): "
            f"download it again into models/ipadapter.") from None
    groups = group_state_dict(state_dict, f"IP-Adapter file '{name}'")
    inspect_ipadapter(groups, name)  # fail at load time, not in the middle of sampling
    return groups


# ---------------------------------------------------------------------------------------------------
# what a file contains


@dataclass(frozen=True)
class IPAdapterSpec:
    """What an IP-Adapter file is, read from its key names and shapes."""

    kind: str  # "plain" | "plus" | "full"
    clip_dim: int  # width of the CLIP embedding it projects
    context_dim: int  # input width of to_k_ip/to_v_ip: the UNet's text context width
    num_tokens: int  # image tokens per frame (0: one per CLIP token, for "full")
    layer_dims: tuple  # inner (query) width of each cross-attention, in file order

    @property
    def input_field(self) -> str:
        """Which CLIP vision output the projection reads."""
        return "image_embeds" if self.kind == "plain" else "penultimate_hidden_states"

    @property
    def family(self) -> str:
        return family_name(self.context_dim)


def _require(group: dict, keys, source: str, what: str):
    missing = [k for k in keys if k not in group]
    if missing:
        raise IPAdapterFormatError(f"{source}: the {what} image projection lacks {', '.join(IMAGE_PROJ + '.' + k for k in missing)}; "
                                   f"the file is incomplete or not an IP-Adapter file.")


def inspect_ipadapter(groups: dict, source: str = "IP-Adapter") -> IPAdapterSpec:
    """Classify and validate a nested IP-Adapter state dict; every problem is a clear error."""
    proj, layers = groups[IMAGE_PROJ], groups[IP_ADAPTER]
    if any("lora" in k for k in layers) or "perceiver_resampler.proj_in.weight" in proj:
        raise IPAdapterFormatError(f"{source} is an IP-Adapter FaceID model (it needs InsightFace and a LoRA); "
                                   f"per-frame conditioning supports the plain, plus and full-face IP-Adapter files.")
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in layers.items():
        m = _KEY_RE.match(key)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not found:
        raise IPAdapterFormatError(f"{source}: no 'ip_adapter.<n>.to_k_ip.weight' keys; it is not an IP-Adapter file.")
    numbers = sorted(found)
    expected = [2 * i + 1 for i in range(len(numbers))]
    if numbers != expected:
        raise IPAdapterFormatError(f"{source}: cross-attention layers are numbered {numbers[:6]}…, expected 1, 3, 5, … "
                                   f"(diffusers attention-processor order); the file is damaged.")
    layer_dims, context_dims = [], set()
    for n in numbers:
        if set(found[n]) != {"k", "v"}:
            missing = "to_v_ip" if "v" not in found[n] else "to_k_ip"
            raise IPAdapterFormatError(f"{source}: key 'ip_adapter.{n}.{missing}.weight' is missing.")
        k, v = found[n]["k"], found[n]["v"]
        if k.ndim != 2 or k.shape != v.shape:
            raise IPAdapterFormatError(f"{source}: layer {n} has to_k_ip {tuple(k.shape)} and to_v_ip {tuple(v.shape)}; "
                                       f"expected two equal [inner_dim, context_dim] matrices.")
        layer_dims.append(int(k.shape[0]))
        context_dims.add(int(k.shape[1]))
    if len(context_dims) != 1:
        raise IPAdapterFormatError(f"{source}: layers disagree on the context width ({sorted(context_dims)}).")
    context_dim = context_dims.pop()

    if "latents" in proj:
        _require(proj, ["latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_q.weight"], source, "plus")
        kind, clip_dim, tokens, out_dim = "plus", proj["proj_in.weight"].shape[1], proj["latents"].shape[1], proj["proj_out.weight"].shape[0]
    elif "proj.3.weight" in proj:
        _require(proj, ["proj.0.weight", "proj.2.weight", "proj.3.weight"], source, "full")
        kind, clip_dim, tokens, out_dim = "full", proj["proj.0.weight"].shape[1], 0, proj["proj.2.weight"].shape[0]
    elif "proj.weight" in proj:
        _require(proj, ["proj.weight", "proj.bias", "norm.weight", "norm.bias"], source, "plain")
        out_dim = proj["norm.weight"].shape[0]
        if proj["proj.weight"].shape[0] % out_dim:
            raise IPAdapterFormatError(f"{source}: image_proj.proj.weight {tuple(proj['proj.weight'].shape)} is not a whole "
                                       f"number of {out_dim}-wide tokens.")
        kind, clip_dim, tokens = "plain", proj["proj.weight"].shape[1], proj["proj.weight"].shape[0] // out_dim
    else:
        raise IPAdapterFormatError(f"{source}: unknown image projection (keys {sorted(proj)[:5]}…); expected the plain "
                                   f"('proj.weight'), plus ('latents') or full-face ('proj.3.weight') IP-Adapter layout.")
    if out_dim != context_dim:
        raise IPAdapterFormatError(f"{source}: the image projection makes {out_dim}-wide tokens but to_k_ip reads "
                                   f"{context_dim}-wide ones; the file is damaged.")
    return IPAdapterSpec(kind, int(clip_dim), int(context_dim), int(tokens), tuple(layer_dims))


# ---------------------------------------------------------------------------------------------------
# image projections (module attribute names = the file's key names, so load_state_dict is strict)


class PlainImageProjection(nn.Module):
    """One CLIP image embedding -> `num_tokens` context tokens (linear + LayerNorm)."""

    def __init__(self, clip_dim: int, context_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.context_dim = num_tokens, context_dim
        self.proj = nn.Linear(clip_dim, num_tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.num_tokens, self.context_dim))


class FullImageProjection(nn.Module):
    """Every CLIP token -> one context token (MLP + LayerNorm), the full-face variant."""

    def __init__(self, clip_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """Learned latents attend to [image tokens, latents] (the key/value set includes the latents)."""

    def __init__(self, dim: int, inner_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim, bias=False)

    def forward(self, image_tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        image_tokens, latents = self.norm1(image_tokens), self.norm2(latents)
        k, v = self.to_kv(torch.cat([image_tokens, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(multihead_attention(self.to_q(latents), k, v, self.heads))


class PerceiverResampler(nn.Module):
    """CLIP hidden states -> `num_tokens` context tokens (the "plus" projection)."""

    def __init__(self, clip_dim: int, dim: int, context_dim: int, num_tokens: int, depth: int, inner_dim: int, ff_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.proj_in = nn.Linear(clip_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        heads = max(inner_dim // _PERCEIVER_DIM_HEAD, 1)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, inner_dim, heads),
                           nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_dim, bias=False), nn.GELU(),
                                         nn.Linear(ff_dim, dim, bias=False))])
            for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(hidden_states)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_image_projection(groups: dict, spec: IPAdapterSpec) -> nn.Module:
    """The image projection of `spec.kind`, loaded strictly from the file's `image_proj` weights."""
    sd = groups[IMAGE_PROJ]
    if spec.kind == "plain":
        module = PlainImageProjection(spec.clip_dim, spec.context_dim, spec.num_tokens)
    elif spec.kind == "full":
        module = FullImageProjection(spec.clip_dim, spec.context_dim)
    else:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
        module = PerceiverResampler(spec.clip_dim, sd["latents"].shape[2], spec.context_dim, spec.num_tokens, depth,
                                    sd["layers.0.0.to_q.weight"].shape[0], sd["layers.0.1.1.weight"].shape[0])
    try:
        module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise IPAdapterFormatError(f"The {spec.kind} IP-Adapter image projection does not match its weights: "
                                   f"{str(e).splitlines()[0][:300]}") from None
    return module.eval()


# ---------------------------------------------------------------------------------------------------
# the adapter


class IPAdapter:
    """A parsed IP-Adapter: project CLIP embeddings to tokens; per layer, the to_k_ip/to_v_ip weights."""

    def __init__(self, groups: dict, source: str = "IP-Adapter"):
        self.spec = inspect_ipadapter(groups, source)
        self.projection = build_image_projection(groups, self.spec)
        layers = groups[IP_ADAPTER]
        self.kv_weights = tuple((layers[f"{2 * i + 1}.to_k_ip.weight"], layers[f"{2 * i + 1}.to_v_ip.weight"])
                                for i in range(len(self.spec.layer_dims)))

    @torch.no_grad()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """[frames, clip_dim] (plain) or [frames, clip_tokens, clip_dim] -> [frames, tokens, context_dim]."""
        spec = self.spec
        want = 2 if spec.kind == "plain" else 3
        if embeds.ndim != want or embeds.shape[-1] != spec.clip_dim:
            layout = "[frames, width]" if want == 2 else "[frames, clip_tokens, width]"
            raise ValueError(
                f"This {spec.kind} IP-Adapter ({spec.family}) reads CLIP {spec.input_field} {layout} with width "
                f"{spec.clip_dim}, but got embeddings of shape {tuple(embeds.shape)}. Encode the frames with the CLIP "
                f"vision model the adapter was trained with (e.g. ViT-H/14 for *_vit-h / SD1.5 files).")
        return self.projection(embeds.float().cpu())

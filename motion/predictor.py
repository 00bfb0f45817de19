"""The Semantic Motion Predictor (StoryDiffusion stage 2): refine interpolated CLIP image embeddings.

Given the CLIP embeddings of a start and an end frame, the paper interpolates them to L frames and
lets a transformer turn that straight path into the path a real motion would take. Here:

    x = interpolate(start, end, L)                       [L, T, D]   (motion/interpolate.py)
    h = in_proj((x - mean) / embed_std) + frame_pos[j] + token_pos[t]   width W
    h = N x TransformerEncoderLayer over the L frames of each token  (pre-norm, GELU)
    y = x + embed_std * out_proj(LayerNorm(h))   on frames 1..L-2      out_proj is zero-initialised

- One model serves one configured (tokens T, embed_dim D): T = 1, D = 1024 for ViT-H pooled
  `image_embeds`; T = 257, D = 1280 for ViT-H `penultimate_hidden_states` (IP-Adapter "plus").
- Attention runs across frames, separately for every token position (cost T * L^2, not (T*L)^2);
  the learned token-position embedding tells the layers which token they are refining.
- Frame positions are learned for `max_frames` slots spread over [0, 1]; frame j of an L-frame
  transition uses slot round(j / (L - 1) * (max_frames - 1)), so one model serves any L <= max_frames.
- `mean` [T, D] and `embed_std` are the training set's statistics (saved with the weights): the
  layers see how a frame differs from a typical one, not the large constant part CLIP embeddings share.
- The residual head starts at zero: an untrained predictor returns the interpolation bit for bit,
  so loading one can never be worse than the training-free default.

Files are `.safetensors` with the config as JSON in the metadata (`CONFIG_KEY`).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .interpolate import interpolate

CONFIG_KEY = "storydiffusion_motion_predictor"
FORMAT_VERSION = 1
KINDS = ("penultimate", "pooled")  # which CLIP vision output the predictor works on


@dataclass(frozen=True)
class PredictorConfig:
    embed_dim: int = 1280  # D: width of the CLIP embeddings
    tokens: int = 257  # T: tokens per frame (1 for pooled image_embeds)
    width: int = 1024  # transformer width (paper: 1024)
    layers: int = 8  # transformer layers (paper: 8)
    heads: int = 16
    max_frames: int = 64  # learned frame-position slots
    kind: str = "penultimate"  # "penultimate" (penultimate_hidden_states) or "pooled" (image_embeds)
    mlp_ratio: float = 4.0
    embed_std: float = 1.0  # typical size of one embedding value (set by training): scales the residual
    version: int = FORMAT_VERSION

    def __post_init__(self):
        problems = []
        for name in ("embed_dim", "tokens", "width", "layers", "heads", "max_frames"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if self.width % max(self.heads, 1):
            problems.append(f"width {self.width} must be divisible by heads {self.heads}")
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "pooled" and self.tokens != 1:
            problems.append("a pooled predictor has tokens = 1")
        if self.max_frames < 2:
            problems.append("max_frames must be >= 2")
        if not (self.embed_std > 0 and math.isfinite(self.embed_std)):
            problems.append("embed_std must be a positive number")
        if problems:
            raise ValueError("Invalid motion predictor config: " + "; ".join(problems) + ".")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PredictorConfig:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("the predictor config is not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown} (a newer file format? update the node pack)")
        if int(data.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise ValueError(f"format version {data['version']} is newer than this pack supports ({FORMAT_VERSION})")
        return cls(**data)


class SemanticMotionPredictor(nn.Module):
    """Interpolated embeddings [B, L, T, D] -> refined embeddings of the same shape."""

    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        c = config
        self.register_buffer("embed_mean", torch.zeros(c.tokens, c.embed_dim))
        self.in_proj = nn.Linear(c.embed_dim, c.width)
        self.frame_pos = nn.Parameter(torch.randn(c.max_frames, c.width) * 0.02)
        self.token_pos = nn.Parameter(torch.randn(c.tokens, c.width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(c.width, c.heads, int(c.width * c.mlp_ratio), dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(c.layers))
        self.out_norm = nn.LayerNorm(c.width)
        self.out_proj = nn.Linear(c.width, c.embed_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def frame_slots(self, frames: int, device=None) -> torch.Tensor:
        """Which learned frame-position slot each of `frames` frames uses (spread over [0, 1])."""
        if frames > self.config.max_frames:
            raise ValueError(f"This predictor handles at most {self.config.max_frames} frames per transition, "
                             f"got {frames}: lower the frame count or train a predictor with a larger max_frames.")
        slots = torch.linspace(0, self.config.max_frames - 1, frames, device=device)
        return slots.round().long()

    def forward(self, interpolated: torch.Tensor) -> torch.Tensor:
        squeeze = interpolated.ndim == 3
        x = interpolated.unsqueeze(0) if squeeze else interpolated
        if x.ndim != 4 or x.shape[2] != self.config.tokens or x.shape[3] != self.config.embed_dim:
            raise ValueError(f"The predictor expects embeddings [frames, {self.config.tokens}, {self.config.embed_dim}], "
                             f"got {tuple(interpolated.shape)}.")
        batch, frames, tokens, _ = x.shape
        compute_dtype = self.in_proj.weight.dtype
        h = self.in_proj((x.to(compute_dtype) - self.embed_mean) / self.config.embed_std)
        h = h + self.frame_pos[self.frame_slots(frames, x.device)].view(1, frames, 1, -1)
        h = h + self.token_pos.view(1, 1, tokens, -1)
        # every token position is its own trajectory over the frames
        h = h.permute(0, 2, 1, 3).reshape(batch * tokens, frames, -1)
        for layer in self.layers:
            h = layer(h)
        h = h.reshape(batch, tokens, frames, -1).permute(0, 2, 1, 3)
        residual = self.out_proj(self.out_norm(h)) * self.config.embed_std
        inner = torch.ones(frames, 1, 1, dtype=residual.dtype, device=residual.device)
        inner[0] = inner[-1] = 0  # start and end are the real panels: only in-betweens are predicted
        y = x + (residual * inner).to(x.dtype)
        return y.squeeze(0) if squeeze else y


def predict_transition(start: torch.Tensor, end: torch.Tensor, frames: int, mode: str = "linear",
                       predictor: SemanticMotionPredictor | None = None) -> torch.Tensor:
    """Per-frame embeddings [frames, T, D] from start/end [T, D]; no predictor = training-free path."""
    path = interpolate(start, end, frames, mode)
    if predictor is None:
        return path
    check_compatible(predictor.config, path.shape[-2], path.shape[-1])
    with torch.no_grad():
        return predictor(path.to(next(predictor.parameters()).device)).to(path.device)


def check_compatible(config: PredictorConfig, tokens: int, embed_dim: int, kind: str | None = None) -> None:
    """Raise a clear error when a predictor does not fit the CLIP vision model's embeddings."""
    if kind is not None and kind != config.kind:
        raise ValueError(f"This motion predictor was trained on {config.kind} embeddings but {kind} embeddings were "
                         f"requested: set the embeddings input to '{config.kind}' or load a {kind} predictor.")
    if embed_dim != config.embed_dim or tokens != config.tokens:
        raise ValueError(
            f"The motion predictor expects {config.kind} embeddings of {config.tokens} token(s) x {config.embed_dim} "
            f"but the CLIP vision model gives {tokens} x {embed_dim}: use the CLIP vision model the predictor was "
            "trained with, or set the predictor to 'none' (training-free interpolation).")


# ---------------------------------------------------------------------------------------------------
# files


def save_predictor(model: SemanticMotionPredictor, path: str, extra_metadata: dict | None = None) -> str:
    """Write weights + config JSON atomically (a crash never leaves a half-written predictor)."""
    from safetensors.torch import save_file

    metadata = {CONFIG_KEY: model.config.to_json()}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = f"{path}.tmp"
    save_file(state, tmp, metadata=metadata)
    os.replace(tmp, path)
    return path


def read_metadata(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def load_predictor(path: str, device="cpu") -> SemanticMotionPredictor:
    """Load a predictor file; every way a file can be wrong becomes a message that says what to do."""
    from safetensors import safe_open

    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Motion predictor file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001  (safetensors raises its own error types for truncated/garbage files)
        raise ValueError(f"{name} is not a readable .safetensors file ({exc}): the file is corrupt or truncated; "
                         "download it again or re-run `python -m motion.train`.") from None
    if CONFIG_KEY not in metadata:
        raise ValueError(f"{name} has no '{CONFIG_KEY}' entry in its metadata, so it is not a StoryDiffusion motion "
                         "predictor (IP-Adapter, CLIP vision and checkpoint files go in their own folders). "
                         "Train one with `python -m motion.train` or choose 'none'.")
    try:
        config = PredictorConfig.from_json(metadata[CONFIG_KEY])
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name}: its predictor config is invalid ({exc}).") from None
    model = SemanticMotionPredictor(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{name} does not match its own config: missing keys {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}. The file is damaged; re-train or re-download it.")
    wrong = [f"{k} {tuple(state[k].shape)} (config says {tuple(v.shape)})" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{name}: tensor shapes do not match its config: {'; '.join(wrong[:3])}. "
                         "The file is damaged; re-train or re-download it.")
    model.load_state_dict(state)
    return model.to(device).eval()


def looks_like_predictor_file(path: str) -> bool:
    """False only for a readable .safetensors without a predictor config (e.g. an identity bank sharing
    the models/storydiffusion folder); unreadable files stay listed so loading them explains why."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return CONFIG_KEY in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (whatever makes it unreadable, loading it explains; the list keeps it)
        return True

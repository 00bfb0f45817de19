"""A cheap fingerprint of the model that writes or reads an identity bank.

A bank holds what the writing model computed: on UNets the hidden states entering attn1 (projected by the
reader's own to_k/to_v), on DiTs keys and values after the model's own projections, norms and RoPE. Another
checkpoint of the same family (Flux.1 dev vs schnell, a fine-tune) or the same one with other LoRAs reads it
without an error, but the tokens no longer fit. The fingerprint tells them apart without hashing gigabytes:
the architecture (class, parameter count), a few sums of weights that no LoRA patches, and the weight patches
(LoRAs) on the MODEL — which keys, with which strengths and shapes.

What it cannot tell: two different LoRAs patching the same keys with the same strengths and ranks, or a
fine-tune that changed none of the probed tensors (four spread over the network)."""
from __future__ import annotations

import hashlib

import torch

PROBES = 4  # weight tensors summed, spread over the network
PROBE_VALUES = 4096  # values summed of each


def model_fingerprint(model_patcher) -> str | None:
    """'<class>|<parameters>|<weight sums>|<patches>' for a ModelPatcher, or None when it cannot be read."""
    diffusion_model = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        return None
    patches = getattr(model_patcher, "patches", {}) or {}
    named = list(diffusion_model.named_parameters())
    count = sum(p.numel() for _, p in named)
    unpatched = [(name, p) for name, p in named if f"diffusion_model.{name}" not in patches and p.numel() > 0]
    picks = [unpatched[round(i * (len(unpatched) - 1) / max(1, PROBES - 1))] for i in range(min(PROBES, len(unpatched)))]
    sums = []
    for _, p in picks:
        if p.device.type == "meta":
            return None
        sums.append(f"{float(p.detach().flatten()[:PROBE_VALUES].double().sum()):.6e}")
    return f"{type(diffusion_model).__name__}|{count}|{','.join(sums)}|{_patches_digest(patches)}"


def _patches_digest(patches: dict) -> str:
    """'<n keys>:<digest>' of the weight patches: keys, strengths and tensor shapes (not their values)."""
    if not patches:
        return "0"
    digest = hashlib.sha1()
    for key in sorted(patches):
        digest.update(key.encode())
        for patch in patches[key]:
            strengths = (patch[0], patch[2]) if len(patch) > 2 else (patch[0],)
            digest.update(repr(tuple(float(s) for s in strengths if isinstance(s, (int, float)))).encode())
            digest.update(repr(_shapes(patch[1])).encode())
    return f"{len(patches)}:{digest.hexdigest()[:12]}"


def _shapes(data, depth: int = 0):
    """The tensor shapes inside one patch's data (a tensor, a tuple of them, or a weight-adapter object)."""
    if isinstance(data, torch.Tensor):
        return tuple(data.shape)
    if depth > 3:
        return type(data).__name__
    if isinstance(data, (tuple, list)):
        return tuple(_shapes(d, depth + 1) for d in data)
    weights = getattr(data, "weights", None)  # ComfyUI's weight adapters (LoRAAdapter, ...)
    if weights is not None:
        return (type(data).__name__, _shapes(weights, depth + 1))
    return type(data).__name__

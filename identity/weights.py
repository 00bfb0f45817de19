"""Reading PhotoMaker v1 files (.bin torch state dict or .safetensors) into id_encoder + lora_weights.

The public `photomaker-v1.bin` is `{"id_encoder": {...}, "lora_weights": {...}}`; the .safetensors
form flattens that to `id_encoder.<key>` / `lora_weights.<key>`. A bare id_encoder state dict
(what some converters write) is accepted too, without a LoRA.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..common.errors import StoryDiffusionError, load_failure_reason
from .encoder import PhotoMakerIDEncoder
from .lora import LoraPair, parse_lora_weights

SECTIONS = ("id_encoder", "lora_weights")


class PhotoMakerFileError(StoryDiffusionError):
    """The file cannot be read as a PhotoMaker v1 file (message names the file and the problem)."""


@dataclass(eq=False)
class PhotoMakerModel:
    """The PHOTOMAKER value: the ID encoder and the UNet LoRA pairs (empty if the file has none)."""

    encoder: PhotoMakerIDEncoder
    lora: dict  # base name -> LoraPair
    name: str = ""

    def __deepcopy__(self, memo):  # immutable after loading: share it
        return self


def read_sections(path: str) -> dict[str, dict]:
    """{'id_encoder': {...}, 'lora_weights': {...}} from a .bin/.pt or .safetensors file."""
    name = os.path.basename(path)
    try:
        if path.lower().endswith(".safetensors"):
            import safetensors.torch

            flat = safetensors.torch.load_file(path, device="cpu")
            data = {}
            for key, value in flat.items():
                section, _, rest = key.partition(".")
                if section in SECTIONS and rest:
                    data.setdefault(section, {})[rest] = value
                else:
                    data.setdefault("_other", {})[key] = value
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (corrupt, truncated, or a pickle that is not a plain state dict: loaders raise many types)
        # never PyTorch's own text when it advises weights_only=False (unsafe); `from None` keeps it out of logs
        raise PhotoMakerFileError(f"{name} is corrupt, incomplete or not a PhotoMaker v1 file "
                                  f"({load_failure_reason(e)}): download it again (photomaker-v1.bin) "
                                  "into models/photomaker.") from None
    if not isinstance(data, dict):
        raise PhotoMakerFileError(f"{name} holds a {type(data).__name__}, not a PhotoMaker state dict.")
    if "id_encoder" not in data:
        other = data.get("_other", data)
        if any(str(k).startswith("vision_model.") for k in other):  # a bare id_encoder state dict
            return {"id_encoder": dict(other), "lora_weights": {}}
        raise PhotoMakerFileError(f"{name} has no 'id_encoder' section (top-level keys: "
                                  f"{sorted(map(str, data))[:8]}): it is not a PhotoMaker v1 file.")
    if data.get("_other"):
        raise PhotoMakerFileError(f"{name} has keys outside id_encoder./lora_weights.: {sorted(data['_other'])[:8]}.")
    return {"id_encoder": data["id_encoder"], "lora_weights": data.get("lora_weights", {})}


def load_photomaker(path: str) -> PhotoMakerModel:
    """Read and check a PhotoMaker v1 file; the encoder is built from the file's own shapes."""
    sections = read_sections(path)
    try:
        encoder = PhotoMakerIDEncoder.from_state_dict(sections["id_encoder"])
        lora: dict[str, LoraPair] = parse_lora_weights(sections["lora_weights"]) if sections["lora_weights"] else {}
    except ValueError as e:
        raise PhotoMakerFileError(f"{os.path.basename(path)}: {e}") from e
    return PhotoMakerModel(encoder=encoder, lora=lora, name=os.path.basename(path))

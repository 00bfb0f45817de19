"""AnimateDiff-Evolved (ADE) next to this pack, for tests: the unmodified snapshot, a full-width random
motion module and a real-width SD1.5 checkpoint.

- ADE comes from `../shared/thirdparty/ComfyUI-AnimateDiff-Evolved.tar.gz` (Apache-2.0), unpacked once
  into `.harness/thirdparty/ade/ComfyUI-AnimateDiff-Evolved`. Nothing here copies its code: in-process
  tests load it with ComfyUI's own custom-node loader (`nodes.load_custom_node`), and a server loads it
  from a `custom_nodes:` entry of an extra_model_paths file (`server_args()`), so servers that do not
  ask for it (the other tests') never see it. Without the snapshot every user of these fixtures skips.
- The motion module has the public key layout of `mm_sd_v15_v2.ckpt` (down_blocks 0-3 x 2 modules,
  up_blocks 0-3 x 3, mid_block x 1; two temporal self-attentions with a 32-frame position table each,
  a GEGLU feed-forward) at SD1.5's real widths 320/640/1280/1280: ADE builds its modules at those
  widths whatever the file says. Seeded random values, fp16, ~0.9 GB: written once into
  `.harness/cache/animatediff/` and linked into the test models folder's `animatediff_models`.
- ADE injects a module after every res block, so the UNet needs SD1.5's real level widths and res-block
  layout (transformers may be shallow): `tiny_models.write_real_width_sd15_checkpoint`, cached likewise.
"""
from __future__ import annotations

import asyncio
import math
import os
import shutil
import sys
import tarfile
import tempfile

import pytest
import torch

import comfy_env

REPO = comfy_env.REPO
SNAPSHOT = os.path.join(os.path.dirname(REPO), "shared", "thirdparty", "ComfyUI-AnimateDiff-Evolved.tar.gz")
ADE_NAME = "ComfyUI-AnimateDiff-Evolved"
CUSTOM_NODES = os.path.join(REPO, ".harness", "thirdparty", "ade")  # holds only ADE: a custom_nodes folder
ADE_DIR = os.path.join(CUSTOM_NODES, ADE_NAME)
MOTION_FOLDER = "animatediff_models"

# mm_sd_v15_v2 facts: widths per level, modules per block, attention blocks per module, position table length
SD15_WIDTHS = (320, 640, 1280, 1280)
MID_WIDTH = 1280
ATTENTION_BLOCKS = 2
POSITION_LENGTH = 32
MOTION_FILE = "tiny_mm_sd_v15_v2.safetensors"  # the name the tests and workflow use
_MOTION_CACHE = "mm_sd_v15_v2_random_seed0_v1.safetensors"
CHECKPOINT_FILE = "real_width_sd15.safetensors"
_CHECKPOINT_CACHE = "real_width_sd15_seed0_v1.safetensors"


def snapshot_missing_reason() -> str | None:
    if os.path.isfile(os.path.join(ADE_DIR, "__init__.py")) or os.path.isfile(SNAPSHOT):
        return None
    return (f"AnimateDiff-Evolved snapshot not found at {SNAPSHOT} (third-party code for interop tests only; "
            f"see ../shared/thirdparty/README.md)")


def install_ade() -> str:
    """Unpack the snapshot once into .harness/thirdparty/ade/ (atomic rename); returns ADE's folder."""
    if os.path.isfile(os.path.join(ADE_DIR, "__init__.py")):
        return ADE_DIR
    reason = snapshot_missing_reason()
    if reason:
        raise FileNotFoundError(reason)
    os.makedirs(CUSTOM_NODES, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".unpack-", dir=CUSTOM_NODES)
    try:
        with tarfile.open(SNAPSHOT) as tar:
            tar.extractall(tmp, filter="data")
        try:
            os.rename(os.path.join(tmp, ADE_NAME), ADE_DIR)
        except OSError:
            if not os.path.isfile(os.path.join(ADE_DIR, "__init__.py")):  # lost a race: fine if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ADE_DIR


def server_args(workdir: str) -> tuple:
    """Extra `main.py` arguments that load ADE into that server only (a `custom_nodes:` search path)."""
    install_ade()
    path = os.path.join(workdir, "ade_custom_nodes.yaml")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"animatediff_evolved:\n    custom_nodes: {CUSTOM_NODES}/\n")
    return ("--extra-model-paths-config", path)


def load_ade_in_process(nodes) -> dict:
    """Import ADE with ComfyUI's own custom-node loader; returns its node mappings (already registered)."""
    path = install_ade()
    before = set(nodes.NODE_CLASS_MAPPINGS)
    if "ADE_UseEvolvedSampling" not in before:
        ok = asyncio.run(nodes.load_custom_node(path, module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI could not import AnimateDiff-Evolved from {path} (see the log above)")
    return {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if k.startswith("ADE_")}


def ade_submodule(name: str):
    """An imported module of ADE, e.g. "animatediff.motion_module_ad" (ComfyUI names the package by its path)."""
    return sys.modules[f"{ADE_DIR.replace('.', '_x_')}.{name}"]


# ---------------------------------------------------------------------------------------------------
# the motion module file


def _module_keys(prefix: str, c: int) -> dict:
    """Shapes of one VanillaTemporalModule of mm_sd_v15_v2 at width c (8 heads, one transformer block)."""
    t = prefix + "temporal_transformer."
    shapes = {t + "norm.weight": (c,), t + "norm.bias": (c,), t + "proj_in.weight": (c, c), t + "proj_in.bias": (c,),
              t + "proj_out.weight": (c, c), t + "proj_out.bias": (c,)}
    b = t + "transformer_blocks.0."
    for i in range(ATTENTION_BLOCKS):
        a = f"{b}attention_blocks.{i}."
        shapes.update({a + "to_q.weight": (c, c), a + "to_k.weight": (c, c), a + "to_v.weight": (c, c),
                       a + "to_out.0.weight": (c, c), a + "to_out.0.bias": (c,),
                       a + "pos_encoder.pe": (1, POSITION_LENGTH, c),
                       f"{b}norms.{i}.weight": (c,), f"{b}norms.{i}.bias": (c,)})
    shapes.update({b + "ff.net.0.proj.weight": (8 * c, c), b + "ff.net.0.proj.bias": (8 * c,),
                   b + "ff.net.2.weight": (c, 4 * c), b + "ff.net.2.bias": (c,),
                   b + "ff_norm.weight": (c,), b + "ff_norm.bias": (c,)})
    return shapes


def motion_module_shapes() -> dict:
    """Every key of mm_sd_v15_v2 with its shape (public layout; down 0-3 x 2, up 0-3 x 3, mid x 1)."""
    shapes = {}
    for i, c in enumerate(SD15_WIDTHS):
        for m in range(2):
            shapes.update(_module_keys(f"down_blocks.{i}.motion_modules.{m}.", c))
    for i, c in enumerate(reversed(SD15_WIDTHS)):
        for m in range(3):
            shapes.update(_module_keys(f"up_blocks.{i}.motion_modules.{m}.", c))
    shapes.update(_module_keys("mid_block.motion_modules.0.", MID_WIDTH))
    return shapes


def _position_table(length: int, c: int) -> torch.Tensor:
    """The sinusoidal table the released files store: sin on even channels, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, c, 2, dtype=torch.float64) * (-math.log(10000.0) / c))
    pe = torch.zeros(1, length, c, dtype=torch.float64)
    pe[0, :, 0::2] = torch.sin(position * freq)
    pe[0, :, 1::2] = torch.cos(position * freq)
    return pe.float()


def motion_module_state_dict(seed: int = 0, dtype=torch.float16, out_scale: float = 0.2) -> dict:
    """Seeded random values: norms 1/0, fan-in scaled weights, the real position tables. Released files
    zero-initialise proj_out before training; here it is `out_scale` x fan-in scaled, so the module
    changes the output while the residual stays moderate."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in motion_module_shapes().items():
        leaf = key.rsplit(".", 1)[-1]
        if key.endswith("pos_encoder.pe"):
            value = _position_table(shape[1], shape[2])
        elif len(shape) == 1:
            value = torch.ones(shape) if ("norm" in key and leaf == "weight") else torch.zeros(shape)
        else:
            std = 0.7 / math.sqrt(shape[1])
            if "proj_out" in key:
                std *= out_scale
            value = torch.randn(shape, generator=gen) * std
        sd[key] = value.to(dtype).contiguous()
    return sd


def _cached(name: str, write) -> str:
    return comfy_env.cached_file("animatediff", name, write)


def cached_motion_module() -> str:
    from safetensors.torch import save_file

    return _cached(_MOTION_CACHE, lambda p: save_file(motion_module_state_dict(), p))


def cached_real_width_checkpoint() -> str:
    import tiny_models

    return _cached(_CHECKPOINT_CACHE, tiny_models.write_real_width_sd15_checkpoint)


def link_into(models_dir, folder: str, name: str, target: str) -> str:
    dest_dir = os.path.join(str(models_dir), folder)
    os.makedirs(dest_dir, exist_ok=True)
    dest = os.path.join(dest_dir, name)
    if not os.path.lexists(dest):
        os.symlink(target, dest)
    return name


def register_motion_folder(models_dir) -> str:
    """models/animatediff_models of the test models folder, registered with folder_paths like ADE does."""
    import folder_paths

    path = os.path.join(str(models_dir), MOTION_FOLDER)
    os.makedirs(path, exist_ok=True)
    folder_paths.add_model_folder_path(MOTION_FOLDER, path, is_default=True)
    _, extensions = folder_paths.folder_names_and_paths[MOTION_FOLDER]
    extensions.update(folder_paths.supported_pt_extensions)
    return path


# ---------------------------------------------------------------------------------------------------
# pytest fixtures (tests/conftest.py registers this module as a plugin: a test asks for them by name)


@pytest.fixture(scope="module")
def ade(comfy_nodes, models_dir):
    """ADE loaded in-process; its nodes are removed from ComfyUI's mappings again after the module, so
    later test modules see the same node set as before."""
    reason = snapshot_missing_reason()
    if reason:
        pytest.skip(reason)
    mappings = dict(comfy_nodes.NODE_CLASS_MAPPINGS)
    names = dict(comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS)
    loaded = load_ade_in_process(comfy_nodes)
    register_motion_folder(models_dir)
    yield type("ADE", (), {"nodes": loaded, "path": ADE_DIR, "submodule": staticmethod(ade_submodule)})
    for mapping, saved in ((comfy_nodes.NODE_CLASS_MAPPINGS, mappings), (comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS, names)):
        for key in set(mapping) - set(saved):
            del mapping[key]


@pytest.fixture(scope="module")
def motion_model_file(ade, models_dir):
    """The random full-width mm_sd_v15_v2 in models/animatediff_models; returns its name."""
    return link_into(models_dir, MOTION_FOLDER, MOTION_FILE, cached_motion_module())


@pytest.fixture(scope="module")
def real_width_checkpoint(ade, models_dir):
    """A real-width (shallow) SD1.5 checkpoint in models/checkpoints; returns its name."""
    return link_into(models_dir, "checkpoints", CHECKPOINT_FILE, cached_real_width_checkpoint())


if __name__ == "__main__":  # `python tests/animatediff_fixtures.py`: unpack ADE, write the cached files
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    comfy_env.import_comfy()
    print(install_ade())
    print(cached_motion_module())
    print(cached_real_width_checkpoint())

"""What users read when something fails: error type names in ComfyUI's history / "Show Report", and
weight-file errors that never pass on PyTorch's advice to load a file with weights_only=False."""
from __future__ import annotations

import importlib
import traceback

import pytest
import torch

import identity_fixtures as F
import ipadapter_fixtures as fx

# (module of the pack, exception class): every exception class of these modules
PACK_ERRORS = [
    ("story.parse", "StoryError"),
    ("identity.encoder", "IdWeightsError"),
    ("identity.weights", "PhotoMakerFileError"),
    ("ipadapter.weights", "IPAdapterFormatError"),
    ("video.join", "VideoError"),
]


def _pack_class(module: str, name: str):
    return getattr(importlib.import_module(f"comfyui_storydiffusion.{module}"), name)


@pytest.fixture(scope="module")
def full_type_name(comfy_nodes):
    import execution  # ComfyUI's own: what the history and "Show Report" print as the exception type

    return execution.full_type_name


@pytest.fixture(scope="module")
def errors(pack):
    return importlib.import_module("comfyui_storydiffusion.common.errors")


# ---------------------------------------------------------------------------------------------------
# error type names


@pytest.mark.parametrize("module,name", PACK_ERRORS, ids=[n for _, n in PACK_ERRORS])
def test_pack_errors_report_as_storydiffusion(full_type_name, module, name):
    cls = _pack_class(module, name)
    reported = full_type_name(cls)
    assert reported == f"StoryDiffusion.{name}"
    assert "/" not in reported and "\\" not in reported
    assert issubclass(cls, ValueError)  # the nodes catch ValueError


def test_the_mechanism_for_other_base_classes_and_subclasses(errors, full_type_name):
    @errors.pack_error
    class PatchError(RuntimeError):
        pass

    class DeeperError(errors.StoryDiffusionError):
        pass

    class Deepest(DeeperError):
        pass

    assert full_type_name(PatchError) == "StoryDiffusion.PatchError" and issubclass(PatchError, RuntimeError)
    assert full_type_name(errors.StoryDiffusionError) == "StoryDiffusion.StoryDiffusionError"
    assert full_type_name(Deepest) == "StoryDiffusion.Deepest" and issubclass(Deepest, ValueError)
    with pytest.raises(TypeError):
        errors.pack_error(int)


def test_history_names_the_error_storydiffusion(comfy):
    """A real prompt: Story Video with an overlap longer than its one-frame segments fails with VideoError."""
    import harness

    prompt = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 3, "color": 0}},
        "pairs": {"class_type": "StoryDiffusionPanelPairs", "inputs": {"panels": ["img", 0]}},
        "video": {"class_type": "StoryDiffusionStoryVideo",
                  "inputs": {"segments": ["pairs", 0], "fps": 8.0, "overlap": 2, "hold_frames": 0,
                             "frame_rate_multiplier": 1}},
        "show": {"class_type": "PreviewImage", "inputs": {"images": ["video", 0]}},
    }
    with pytest.raises(harness.PromptFailed) as failed:
        comfy.run(prompt)
    assert failed.value.info["exception_type"] == "StoryDiffusion.VideoError"
    assert "lower 'overlap'" in failed.value.info["exception_message"]


# ---------------------------------------------------------------------------------------------------
# corrupt weight files


class NotATensor:
    """A custom class: torch.load(weights_only=True) refuses a pickle that holds one."""

    def __init__(self):
        self.value = 1


def _bad_files(tmp_path, good: dict, stem: str) -> list:
    truncated = tmp_path / f"{stem}_truncated.bin"
    torch.save(good, truncated)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    custom = tmp_path / f"{stem}_custom_class.bin"
    torch.save({**good, "extra": NotATensor()}, custom)
    junk = tmp_path / f"{stem}_junk.bin"
    junk.write_bytes(b"this is not a pickle at all " * 8)
    return [truncated, custom, junk]


def _assert_safe_message(error: BaseException, folder: str):
    message = str(error)
    # what ComfyUI logs (traceback.format_exc()): the message of every chained exception that is shown
    logged = "".join(line for line in traceback.format_exception(error) if not line.startswith("  "))
    assert "weights_only" not in message and "weights_only" not in logged
    assert "can still be loaded" not in logged.lower() and "weights only" not in logged.lower()
    assert "download it again" in message and folder in message


def test_corrupt_photomaker_files_never_advise_weights_only_false(pack, tmp_path):
    weights = importlib.import_module("comfyui_storydiffusion.identity.weights")
    for path in _bad_files(tmp_path, F.photomaker_state_dict(seed=3), "photomaker"):
        with pytest.raises(weights.PhotoMakerFileError) as failed:
            weights.load_photomaker(str(path))
        assert "corrupt, incomplete or not a PhotoMaker v1 file" in str(failed.value)
        _assert_safe_message(failed.value, "models/photomaker")


def test_corrupt_ipadapter_files_never_advise_weights_only_false(pack, tmp_path):
    weights = importlib.import_module("comfyui_storydiffusion.ipadapter.weights")
    for path in _bad_files(tmp_path, fx.tiny_ipadapter("sd15"), "ipadapter"):
        with pytest.raises(weights.IPAdapterFormatError) as failed:
            weights.load_ipadapter_file(str(path))
        assert "corrupt, incomplete or not an IP-Adapter file" in str(failed.value)
        _assert_safe_message(failed.value, "models/ipadapter")


def test_load_failure_reason_keeps_other_texts(errors):
    assert errors.load_failure_reason(RuntimeError("failed finding central directory")) == \
        "RuntimeError: failed finding central directory"
    reason = errors.load_failure_reason(Exception("Weights only load failed ... `weights_only` set to False"))
    assert "weights_only" not in reason and "False" not in reason
    assert len(errors.load_failure_reason(ValueError("x" * 1000))) < 230

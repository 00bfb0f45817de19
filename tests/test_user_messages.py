"""What users read when something fails: error type names in ComfyUI's history / "Show Report"."""
from __future__ import annotations

import importlib

import pytest

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

"""Batch Images (StoryDiffusion): joins 2..8 IMAGE batches in input order at image1's size; other sizes are
scaled to cover and centre-cropped with a warning (never refused), alpha is added where it is missing."""
from __future__ import annotations

import logging

import pytest
import torch


def filled(n: int, h: int, w: int, value: float, channels: int = 3) -> torch.Tensor:
    return torch.full((n, h, w, channels), value)


@pytest.fixture(scope="module")
def node(comfy_nodes):
    return comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionBatchImages"]()


def test_joins_every_connected_input_in_order(node):
    out, = node.join(filled(2, 8, 8, 0.1), filled(1, 8, 8, 0.2), image4=filled(3, 8, 8, 0.4), image3=None)
    assert out.shape == (6, 8, 8, 3)
    assert [round(float(v), 3) for v in out[:, 0, 0, 0]] == [0.1, 0.1, 0.2, 0.4, 0.4, 0.4]


def test_other_sizes_take_image1s_size_with_a_warning(node, caplog):
    # 16x8 (w x h) into 8x8: cover = 16x8 already, the centre 8 columns are kept
    wide = torch.zeros(1, 8, 16, 3)
    wide[:, :, 4:12] = 1.0
    with caplog.at_level(logging.WARNING):
        out, = node.join(filled(1, 8, 8, 0.5), wide)
    assert out.shape == (2, 8, 8, 3)
    assert torch.allclose(out[1], torch.ones(8, 8, 3))  # the centre, not a squashed image
    assert any("image2 is 16x8" in r.getMessage() and "8x8" in r.getMessage() for r in caplog.records)


def test_same_sizes_log_nothing_and_keep_values(node, caplog):
    a, b = torch.rand(2, 4, 6, 3), torch.rand(3, 4, 6, 3)
    with caplog.at_level(logging.WARNING):
        out, = node.join(a, b)
    assert torch.equal(out, torch.cat([a, b])) and not caplog.records


def test_alpha_is_added_where_missing(node):
    out, = node.join(filled(1, 4, 4, 0.3), filled(1, 4, 4, 0.6, channels=4))
    assert out.shape == (2, 4, 4, 4) and float(out[0, 0, 0, 3]) == 1.0


def test_a_wrong_value_is_refused_with_the_input_name(node):
    with pytest.raises(ValueError, match="image2 is not an IMAGE batch"):
        node.join(filled(1, 4, 4, 0.3), torch.zeros(4, 4))


def test_node_metadata(comfy_nodes):
    cls = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionBatchImages"]
    assert cls.CATEGORY.startswith("StoryDiffusion/") and cls.DESCRIPTION.strip()
    inputs = cls.INPUT_TYPES()
    specs = {**inputs["required"], **inputs["optional"]}
    assert list(specs) == [f"image{i}" for i in range(1, 9)]
    assert all(spec[1]["tooltip"].strip() for spec in specs.values())
    assert not getattr(cls, "DEPRECATED", False)

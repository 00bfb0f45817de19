"""A selection split among machines (ComfyUI-Distributed, issue 24 part 2), without ComfyUI-Distributed: Select Story
Panels' participant / participants / latent, Panels In Story Order on a collected batch, and the split run itself
in-process (each participant's prompt run on its own: the identity bank written again, its share read) against the
unsplit run, exactly. tests/test_distributed.py runs the same graph through the real ComfyUI-Distributed."""
from __future__ import annotations

import os

import pytest
import safetensors.torch
import torch

import distributed_fixtures as df
import harness


def test_shares_are_contiguous_in_participant_order_remainder_first(pack):
    from comfyui_storydiffusion.story.share import participant_rows, share_bounds

    assert share_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert share_bounds(6, 3) == [(0, 2), (2, 4), (4, 6)]
    rows = (2, 3, 4, 5, 6, 7, 8)
    shares = [participant_rows(rows, k, 3) for k in range(3)]
    assert shares == [(2, 3, 4), (5, 6), (7, 8)]
    assert sum(shares, ()) == rows  # the collector's order (master, then workers in order) is the selection's


def test_shares_split_like_comfyui_distributed_batch_divider(distributed):
    """ComfyUI-Distributed's Image Batch Divider (nodes/utilities.py: _chunk_bounds) cuts a batch the same way."""
    from comfyui_storydiffusion.story.share import share_bounds

    chunk_bounds = distributed.submodule("nodes.utilities")._chunk_bounds
    for total in range(1, 12):
        for parts in range(1, total + 1):
            assert share_bounds(total, parts) == chunk_bounds(total, parts), (total, parts)


@pytest.mark.parametrize("participant, participants, count, message", [
    (3, 3, 7, "participant 3 but participants is 3"),
    (0, 4, 3, "3 panels for 4 participants"),
])
def test_bad_participants_say_what_to_do(pack, participant, participants, count, message):
    from comfyui_storydiffusion.story.share import participant_rows

    with pytest.raises(ValueError, match=message):
        participant_rows(tuple(range(count)), participant, participants)


def _shares(rows, participants, length=9):
    from comfyui_storydiffusion.story.model import PanelSelection
    from comfyui_storydiffusion.story.share import participant_rows

    return [PanelSelection(participant_rows(rows, k, participants), length, split_rows=rows, participant=k,
                           participants=participants) for k in range(participants)]


def _images(rows):
    return torch.stack([torch.full((4, 4, 3), (r + 1) / 10) for r in rows])


def test_story_order_takes_the_collected_batch_of_every_share(pack):
    from comfyui_storydiffusion.story.model import PanelSelection
    from comfyui_storydiffusion.story.order import in_story_order

    other = (2, 3, 4, 5, 6, 7, 8)
    master = _shares(other, 3)[0]
    images, order = in_story_order([("a", _images(other), master), ("b", _images((0, 1)), PanelSelection((0, 1), 9))])
    assert order == tuple(range(9))
    assert torch.equal(images, _images(range(9)))


@pytest.mark.parametrize("received, missing, who", [
    (3, "5-8", "the master's share only"),
    (5, "7-8", "participants 0-1 only"),
])
def test_a_missing_share_stops_naming_the_panels(pack, received, missing, who):
    from comfyui_storydiffusion.story.model import PanelSelection
    from comfyui_storydiffusion.story.order import in_story_order

    other = (2, 3, 4, 5, 6, 7, 8)
    master = _shares(other, 3)[0]
    with pytest.raises(ValueError, match=f"{who}.*story panels {missing} are missing.*participants on Select Story "
                                         f"Panels to {received // 2}"):
        in_story_order([("a", _images(other[:received]), master), ("b", _images((0, 1)), PanelSelection((0, 1), 9))])


def test_select_gives_this_participant_its_share_and_noise_by_story_index(comfy_nodes, checkpoint_files):
    import comfy.sd
    import folder_paths

    ckpt = comfy.sd.load_checkpoint_guess_config(folder_paths.get_full_path("checkpoints", checkpoint_files("sd15")),
                                                 output_vae=False)
    story_node = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionStory"]()
    positive, negative, _, story, _ = story_node.build(ckpt[1], df.CHARACTERS, df.PANELS, "(No style)", "", 1)
    select = comfy_nodes.NODE_CLASS_MAPPINGS["StoryDiffusionSelectPanels"]()
    template = {"samples": torch.zeros(1, 4, 8, 8)}
    out = select.select(positive, negative, story, "panels that are not identity panels", 0, 0,
                        participant=1, participants=3, latent=template)
    assert out[2] == 2 and out[3] == 5  # panels 5 and 6
    assert out[4].rows == (5, 6) and out[4].whole().rows == (2, 3, 4, 5, 6, 7, 8)
    assert out[5]["batch_index"] == [5, 6] and out[5]["samples"].shape == (2, 4, 8, 8)
    assert out[0][0][0].shape[0] == 2
    with pytest.raises(ValueError, match="participants is 1"):
        select.select(positive, negative, story, "panel range", 0, 0, participant=2)
    from comfy_execution.graph_utils import ExecutionBlocker

    assert isinstance(select.select(positive, negative, story, "panel range", 0, 0)[5], ExecutionBlocker)


def _latents(output_dir, outputs) -> torch.Tensor:
    info = outputs["18"]["latents"][0]
    return safetensors.torch.load_file(os.path.join(output_dir, info["subfolder"], info["filename"]))["latent_tensor"]


def test_split_runs_are_the_unsplit_run_up_to_batch_rounding_and_repeat_exactly(comfy, comfy_nodes, checkpoint_files,
                                                                                  output_dir):
    """Each participant's prompt on its own (the identity bank written again from the same identity panels and
    seed, its share read with noise by story index) gives the rows of the unsplit run's latents up to float
    rounding, and exactly the same latents when a fresh executor runs a share again (the bank rewritten: bit-identical).

    Why not exactly the unsplit run: CPU (and GPU) kernels round differently for another batch size, even a plain
    UNet forward (the tiny SD1.5 UNet: rows 0-2 of a batch of 7 alone differ by ~1e-6). The split changes which
    panels share a batch, nothing else: noise, CSA token samples and the bank are per story panel."""
    ckpt, widgets = checkpoint_files("sd15"), df.csa_defaults(comfy_nodes)
    whole = _latents(output_dir, comfy.run(df.comic_prompt(ckpt, widgets, 1, distributed=False, prefix="split_1")))
    assert whole.shape[0] == df.STORY_PANELS - len(df.IDENTITY_ROWS)

    def share(k, tag, runner):
        return _latents(output_dir, runner.run(df.comic_prompt(ckpt, widgets, 3, distributed=False, participant=k,
                                                               prefix=f"split_3_{tag}_{k}")))

    first = [share(k, "a", comfy) for k in range(3)]
    assert [s.shape[0] for s in first] == [3, 2, 2]
    torch.testing.assert_close(torch.cat(first), whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())
    again = share(1, "b", harness.InProcessComfy())  # a new executor, empty caches: the bank is written again
    assert torch.equal(again, first[1])


def test_what_the_split_relies_on_in_comfyui_distributed(distributed):
    """The unmodified snapshot, in-process: Distributed Seed with seed 0 gives the master 0 and worker k (its index
    among the workers that answered, as the orchestrator names it "worker_<k>") k + 1; the Collector puts the
    master's images first and then each worker's in the enabled order."""
    seed = distributed.nodes["DistributedSeed"]()
    assert seed.distribute(0, is_worker=False, worker_id="") == (0,)
    assert [seed.distribute(0, is_worker=True, worker_id=f"worker_{k}")[0] for k in range(3)] == [1, 2, 3]
    collector = distributed.nodes["DistributedCollector"]()
    master = torch.zeros(2, 1, 1, 3)
    workers = {"w2": {0: torch.full((1, 1, 1, 3), 2.0)}, "w1": {1: torch.full((1, 1, 1, 3), 1.5),
                                                                 0: torch.full((1, 1, 1, 3), 1.0)}}
    out = collector._reorder_and_combine_tensors(workers, ["w1", "w2"], 2, master, False, master)
    assert out[:, 0, 0, 0].tolist() == [0.0, 0.0, 1.0, 1.5, 2.0]


def test_the_latent_output_without_a_latent_input_stops_with_what_to_do(comfy, comfy_nodes, checkpoint_files):
    prompt = df.comic_prompt(checkpoint_files("sd15"), df.csa_defaults(comfy_nodes), 1, distributed=False)
    del prompt["10"]["inputs"]["latent"]
    outputs = comfy.run(prompt)  # ComfyUI reports a blocked node as an error message and runs nothing after it
    errors = [d["exception_message"] for e, d in comfy.server.messages if e == "execution_error"]
    assert any("connect Empty Latent Image (batch_size 1, the panel size) to its latent input" in m for m in errors)
    assert "18" not in outputs  # the read run's latents were never sampled or saved

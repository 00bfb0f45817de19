"""Several machines through ComfyUI-Distributed (issue 24 part 2), end to end: a master and two worker ComfyUI
processes on localhost (CPU, tiny SD1.5), each with the unmodified ComfyUI-Distributed snapshot, the distributed
comic (tests/distributed_fixtures.py, the graph of workflows/story_distributed.json) queued through the master's
`POST /distributed/queue`.

- Every participant writes the identity bank itself and samples its share of the other panels; the master's
  Distributed Collector gathers the shares (the workers' as 8-bit PNG), Panels In Story Order joins them with the
  identity panels. Every saved panel is bit-identical to the same shares sampled on the master alone, in story
  order, and within float rounding of the unsplit single-machine run (another batch size rounds differently:
  tests/test_story_share.py). The banks the servers write are bit-identical.
- workflows/story_distributed.json itself, read the way the frontend queues it, runs on the master and both
  workers (the page comes out: Panels In Story Order refuses a batch without every share).
- A worker that is down when the run starts: ComfyUI-Distributed skips it, the run stops at Panels In Story Order
  naming the missing panels, and no file is written.

Skips with the reason when the snapshot is absent. Prints the wall times of the single-machine and the distributed
run (the README's CPU ratio); CPU contention makes them no speed claim.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

import comfy_env
import distributed_fixtures as df
import harness
import thirdparty_fixtures
import workflow_sizes

FAST_CPU_ARGS = ("--fp32-text-enc",)
WORKERS = ("w1", "w2")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, models_dir, checkpoint_files, comfy_nodes):
    """Two workers and a master (its gpu_config.json lists both); yields (master, {id: worker}, checkpoint)."""
    reason = thirdparty_fixtures.snapshot_missing_reason(df.PACK)
    if reason:
        pytest.skip(reason)
    ckpt = checkpoint_files("sd15")
    root = tmp_path_factory.mktemp("distributed")
    servers, started = {}, []
    try:
        for name in (*WORKERS, "master"):
            workdir = root / name
            pack_path = df.install_copy(str(workdir / "custom_nodes"))
            # one torch thread each: three processes share the 2 cores of a CI runner (two threads each spin against
            # the others' and made the run ~10x slower); the single-machine reference runs on the same settings
            env = {"OMP_NUM_THREADS": "1"} if name == "master" else {"COMFYUI_IS_WORKER": "1", "OMP_NUM_THREADS": "1"}
            servers[name] = harness.ComfyServer(str(workdir), str(models_dir), env=env,
                                                extra_args=FAST_CPU_ARGS + df.server_args(str(workdir), pack_path))
            if name == "master":
                df.write_config(pack_path, [(w, servers[w].port) for w in WORKERS])
        for server in servers.values():
            server.start()
            started.append(server)
        yield servers["master"], {w: servers[w] for w in WORKERS}, ckpt
    finally:
        for server in started:
            server.stop()


def fresh(*servers):
    """Empty every server's output cache and unload its models: ComfyUI applies /free after the next prompt."""
    for server in servers:
        request = urllib.request.Request(server.url + "/free", data=b'{"unload_models": true, "free_memory": true}',
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        server.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                    "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


def pixels(server, outputs, node) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in server.output_files({node: outputs[node]})]


def saved_files(server) -> set[str]:
    return {os.path.join(d, f) for d, _, files in os.walk(server.output_dir) for f in files}


def queue_distributed(master, prompt) -> str:
    answer = master.post("/distributed/queue", {"prompt": prompt, "client_id": "tests",
                                                "enabled_worker_ids": list(WORKERS)})
    assert not answer.get("node_errors"), answer
    return answer["prompt_id"], answer["worker_count"]


def test_the_distributed_comic_equals_the_single_machine_run(cluster, comfy_nodes):
    master, workers, ckpt = cluster
    widgets = df.csa_defaults(comfy_nodes)

    # single machine: the same graph queued on the master with /prompt (the Collector passes through), one share
    fresh(master, *workers.values())
    start = time.perf_counter()
    single_out = master.run(df.comic_prompt(ckpt, widgets, 1, prefix="single"))
    single_s = time.perf_counter() - start
    single = pixels(master, single_out, "17")
    assert len(single) == df.STORY_PANELS

    # the same three shares, sampled on the master one after the other
    shares = []
    for k in range(3):
        out = master.run(df.comic_prompt(ckpt, widgets, 3, distributed=False, participant=k, prefix=f"share{k}"))
        shares += pixels(master, out, "19")
    reference = single[:len(df.IDENTITY_ROWS)] + shares

    fresh(master, *workers.values())
    start = time.perf_counter()
    prompt_id, worker_count = queue_distributed(master, df.comic_prompt(ckpt, widgets, 3, prefix="distributed"))
    assert worker_count == 2
    distributed_out = master.wait(prompt_id)
    distributed_s = time.perf_counter() - start
    distributed = pixels(master, distributed_out, "17")
    print(f"\nsingle-machine run {single_s:.1f} s, distributed run (master + 2 workers, one CPU) {distributed_s:.1f} s, "
          f"ratio {distributed_s / single_s:.2f}")

    assert len(distributed) == df.STORY_PANELS
    for i, (got, want) in enumerate(zip(distributed, reference)):
        assert np.array_equal(got, want), f"story panel {i} differs from the same share sampled on one machine"
    # the identity panels are the same computation in both runs; a read panel differs from the unsplit run at most
    # by what another batch size rounds differently
    for i in range(len(df.IDENTITY_ROWS)):
        assert np.array_equal(distributed[i], single[i])
    worst = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(distributed, single))
    print(f"largest difference to the unsplit run: {worst} of 255")
    assert worst <= 2
    for w in workers.values():  # a worker writes nothing: its prompt ends at the Collector
        assert not [f for f in saved_files(w) if "distributed" in os.path.basename(f)]


def test_every_server_writes_the_same_identity_bank(cluster, comfy_nodes, models_dir):
    master, workers, ckpt = cluster
    prompt = {k: v for k, v in df.comic_prompt(ckpt, df.csa_defaults(comfy_nodes), 1, distributed=False).items()
              if k in ("1", "2", "3", "4", "5", "6", "7")}
    banks = []
    for name, server in (("master", master), *workers.items()):
        prompt["20"] = {"class_type": "StoryDiffusionSaveIdentityBank",
                        "inputs": {"bank": ["5", 1], "after": ["7", 0], "filename_prefix": f"distributed_test/{name}"}}
        out = server.run(prompt)
        name_saved = out["20"]["text"][0]
        banks.append(safetensors.torch.load_file(os.path.join(models_dir, "storydiffusion", name_saved)))
    assert banks[0].keys() == banks[1].keys() == banks[2].keys() and banks[0]
    for other in banks[1:]:
        assert all(np.array_equal(banks[0][k].float().numpy(), other[k].float().numpy()) for k in banks[0])


def test_the_shipped_workflow_runs_on_master_and_workers(cluster):
    """workflows/story_distributed.json as the frontend would queue it (widget values by name, links; tests'
    sizes and steps), participants = master + 2 workers, through POST /distributed/queue: every machine takes a
    share, the page comes out on the master."""
    master, workers, ckpt = cluster
    with open(os.path.join(comfy_env.REPO, "workflows", "story_distributed.json")) as f:
        workflow = json.load(f)
    settings = workflow_sizes.browser_settings(workflow)
    for node in workflow["nodes"]:
        if node["type"] == "StoryDiffusionSelectPanels" and "participant" in workflow_sizes.linked_widgets(node):
            settings[str(node["id"])]["participants"] = 1 + len(workers)  # the share; the identity run stays whole
        if node["type"] == "CheckpointLoaderSimple":
            settings[str(node["id"])] = {"ckpt_name": ckpt}
    prompt = df.api_prompt(workflow, master.get("/object_info"), settings)
    shares = [n for n in prompt.values() if n["class_type"] == "StoryDiffusionSelectPanels"
              and n["inputs"]["participants"] == 3]
    assert len(shares) == 1 and shares[0]["inputs"]["participant"][0] in prompt
    prompt_id, worker_count = queue_distributed(master, prompt)
    assert worker_count == 2
    outputs = master.wait(prompt_id)
    pages = [p for p in master.output_files(outputs) if p.endswith(".png")]
    # Panels In Story Order refuses a collected batch without every share: a page means all three took part
    assert len(pages) == 1 and np.asarray(Image.open(pages[0])).std() > 0


def test_a_worker_down_at_the_start_stops_the_run_naming_the_missing_panels(cluster, comfy_nodes):
    master, workers, ckpt = cluster
    workers["w2"].stop()
    before = saved_files(master) | saved_files(workers["w1"])
    prompt_id, worker_count = queue_distributed(master, df.comic_prompt(ckpt, df.csa_defaults(comfy_nodes), 3,
                                                                        prefix="worker_down"))
    assert worker_count == 1  # w2 was skipped when the run started
    with pytest.raises(harness.PromptFailed, match=r"story panels 7-8 are missing and nothing was joined.*"
                                                   r"participants on Select Story Panels to 2"):
        master.wait(prompt_id)
    after = saved_files(master) | saved_files(workers["w1"])
    assert not [f for f in after - before if "worker_down" in os.path.basename(f)]

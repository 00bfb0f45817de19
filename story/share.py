"""A panel selection split among the machines of a ComfyUI-Distributed run (plain Python, no ComfyUI).

ComfyUI-Distributed (a separate node pack) queues the same prompt on the master and on every worker
that answers when the run starts; its Distributed Seed node gives the master its seed and worker k
(0-based, in the order of the workers that answered) seed + k + 1, so with seed 0 it gives each machine
its *participant index*: master 0, workers 1, 2, ... Its Distributed Collector then returns the master's
images first and every worker's after them, in that same order.

So a selection of N panels is cut into `participants` contiguous shares, in participant order, with the
remainder going to the first shares (ComfyUI-Distributed's own Image Batch Divider splits the same way):
the collected batch is then the whole selection in its own order, and a missing share (a worker that was
offline when the run started is skipped) shows as a batch that stops early.
"""
from __future__ import annotations

from collections.abc import Sequence


def share_bounds(total: int, participants: int) -> list[tuple[int, int]]:
    """[start, end) of each participant's share of `total` panels: contiguous, in participant order, sizes
    differing by at most one (the first `total % participants` shares are one larger)."""
    base, extra = divmod(int(total), int(participants))
    bounds, start = [], 0
    for k in range(int(participants)):
        end = start + base + (1 if k < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def check_participants(count: int, participant: int, participants: int) -> None:
    """Refuses (ValueError, saying what to do) an index outside the participants or a share that would be empty."""
    if participants < 1:
        raise ValueError(f"participants is {participants}: it must be at least 1 (1 = this machine samples every "
                         f"selected panel)")
    if not 0 <= participant < participants:
        raise ValueError(
            f"this machine is participant {participant} but participants is {participants} (participants 0-"
            f"{participants - 1}): set participants to the number of machines that sample (the master plus every "
            f"enabled ComfyUI-Distributed worker), and feed participant from Distributed Seed with its seed set to 0 "
            f"(master 0, workers 1, 2, ...)")
    if count < participants:
        raise ValueError(f"the selection has {count} panels for {participants} participants: every machine needs at "
                         f"least one panel; lower participants to {count} or select more panels")


def participant_rows(rows: Sequence[int], participant: int, participants: int) -> tuple[int, ...]:
    """The story rows of `participant`'s share of `rows` (see share_bounds)."""
    check_participants(len(rows), participant, participants)
    start, end = share_bounds(len(rows), participants)[participant]
    return tuple(rows[start:end])


def collected_shares(received: int, total: int, participants: int) -> int | None:
    """How many leading shares a collected batch of `received` images holds (None when it ends inside a share)."""
    ends = [0] + [end for _, end in share_bounds(total, participants)]
    return ends.index(received) if received in ends else None

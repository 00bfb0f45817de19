"""PhotoMaker v1 tokenisation on ComfyUI-style token chunks (plain python, no ComfyUI import).

The method (PhotoMaker `encode_prompt_with_trigger_word`): drop the trigger token, the token right
before it is the class word ("man" in "a man img"), repeat that class token once per reference
photo, pad/truncate to the chunk length, and mark the class positions; those text embeddings are
later replaced by fuse(class embedding, ID embedding).

Input is one tokenizer's output as ComfyUI gives it: a list of chunks, each a list of
`(token, weight, word_id)` of fixed length (77): start token, content (word_id > 0), end token,
pads (word_id 0). Weights and word ids of the class word are kept on its copies, so prompt
weighting still works. Several characters are supported: each has its own trigger; characters
that share a trigger word take its occurrences in order.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..common.errors import StoryDiffusionError


class TriggerError(StoryDiffusionError):
    """The prompt cannot carry the reference photos as written (message says how to fix it)."""


@dataclass(frozen=True)
class TriggerSpec:
    """One character's trigger: its word (for messages), its token ids, and how many photos it has."""

    word: str
    token_ids: tuple
    num_images: int


@dataclass(frozen=True)
class ExpandedTokens:
    chunks: list  # same layout as the input chunks
    positions: list  # per spec: flat indices (chunk * chunk_len + i) of its class-token copies; [] if absent


def count_triggers(chunks: list, token_ids: tuple) -> int:
    """How many times the trigger's token sequence occurs in the prompt content."""
    return sum(len(_find(_content(chunk), token_ids)) for chunk in chunks)


def expand_class_tokens(chunks: list, specs: list[TriggerSpec], pad_token: int, where: str = "the prompt") -> ExpandedTokens:
    """Remove every spec's trigger, repeat its class token `num_images` times, re-pad each chunk.

    Specs sharing a trigger take its occurrences in order; a trigger that does not occur leaves
    that spec with no positions (the caller decides whether that is an error). `where` names the
    prompt in error messages (e.g. "panel 3 (line 5)").
    """
    if not chunks:
        raise TriggerError(f"{where} produced no tokens.")
    groups: dict[tuple, list[int]] = {}
    for index, spec in enumerate(specs):
        if not spec.token_ids:
            raise TriggerError(f"the trigger word {spec.word!r} is empty after tokenisation: pick a word such as 'img'.")
        if spec.num_images < 1:
            raise TriggerError(f"the character with trigger {spec.word!r} has no reference photos: connect 1 or more.")
        groups.setdefault(tuple(spec.token_ids), []).append(index)
    for token_ids, members in groups.items():
        found = count_triggers(chunks, token_ids)
        word = specs[members[0]].word
        if found > len(members):
            raise TriggerError(f"the trigger word {word!r} appears {found} times in {where}, but "
                               f"{len(members)} character(s) use it: write it once, right after the class word "
                               f"(e.g. 'a man {word}'), or give each character its own trigger word.")
        if 0 < found < len(members):
            raise TriggerError(f"{where} has the trigger word {word!r} {found} time(s) but names {len(members)} "
                               f"characters that use it: write it after each character's class word.")

    # longest trigger first, so "img2" style triggers are not shadowed by shorter ones
    order = sorted(groups, key=len, reverse=True)
    taken = {token_ids: 0 for token_ids in groups}
    chunk_len = len(chunks[0])
    positions: list[list[int]] = [[] for _ in specs]
    out_chunks = []
    for chunk_index, chunk in enumerate(chunks):
        content = _content(chunk)
        tail = list(chunk[1 + len(content):])
        expanded: list[tuple] = []  # (entry, spec index or None)
        i = 0
        while i < len(content):
            token_ids = next((t for t in order if _matches(content, i, t)), None)
            if token_ids is None:
                expanded.append((content[i], None))
                i += 1
                continue
            spec_index = groups[token_ids][taken[token_ids]]
            taken[token_ids] += 1
            spec = specs[spec_index]
            if not expanded or expanded[-1][1] is not None:
                raise TriggerError(f"the trigger word {spec.word!r} has no class word before it in {where}: "
                                   f"write it right after the word it describes, e.g. 'a photo of a man {spec.word}'.")
            class_entry = expanded[-1][0]
            expanded[-1] = (class_entry, spec_index)
            expanded.extend((class_entry, spec_index) for _ in range(spec.num_images - 1))
            i += len(token_ids)
        new_chunk, kept = _refit([chunk[0]] + [e for e, _ in expanded], tail, chunk_len, pad_token)
        for offset, (_, spec_index) in enumerate(expanded[:kept]):
            if spec_index is not None:
                positions[spec_index].append(chunk_index * chunk_len + 1 + offset)
        out_chunks.append(new_chunk)

    for spec_index, spec in enumerate(specs):
        if positions[spec_index] and len(positions[spec_index]) != spec.num_images:
            raise TriggerError(f"{where} is too long: only {len(positions[spec_index])} of the {spec.num_images} "
                               f"class-word copies for trigger {spec.word!r} fit in {chunk_len} tokens; move the "
                               "trigger word earlier or shorten the prompt.")
    return ExpandedTokens(out_chunks, positions)


# ---------------------------------------------------------------------------------------------------


def _content(chunk: list) -> list:
    """The word tokens of a chunk: after the start token, up to the end token (word id 0)."""
    n = 0
    for entry in chunk[1:]:
        if len(entry) < 3 or entry[2] == 0:
            break
        n += 1
    return list(chunk[1:1 + n])


def _matches(content: list, i: int, token_ids: tuple) -> bool:
    if i + len(token_ids) > len(content):
        return False
    for entry, token in zip(content[i:i + len(token_ids)], token_ids):
        if not isinstance(entry[0], int) or entry[0] != token:
            return False
    return True


def _find(content: list, token_ids: tuple) -> list[int]:
    hits, i = [], 0
    while i < len(content):
        if token_ids and _matches(content, i, token_ids):
            hits.append(i)
            i += len(token_ids)
        else:
            i += 1
    return hits


def _refit(head: list, tail: list, length: int, pad_token: int) -> tuple[list, int]:
    """head (start + content) + tail (end + pads), cut or padded to `length`; the end token is kept.

    Returns the chunk and how many content entries survived.
    """
    tail = list(tail)
    while len(head) + len(tail) > length and len(tail) > 1:
        tail.pop()
    if len(head) + len(tail) > length:
        head = head[:length - len(tail)]
    chunk = head + tail
    chunk += [(pad_token, 1.0, 0)] * (length - len(chunk))
    return chunk, len(head) - 1

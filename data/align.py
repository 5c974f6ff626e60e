"""Cross-tokenizer alignment: language-teacher targets moved into a student tokenizer's positions.

The stored teacher targets live in the teacher's token space (teachers/language.py): teacher position j of
[bos] + caption + [eos] holds the distribution over teacher token j+1. A student with another tokenizer cuts
the same caption differently. Here:

- `vocab_map`: teacher id -> student id with the same surface bytes (-1: none), for the sparse KD, which
  folds the mass of a -1 column into the tail bucket exactly (distill/losses/language.py).
- `encode_row` / `align`: both tokenizations of a caption with character offsets, partitioned into groups
  of consecutive tokens that end at the same character (common boundaries). A group of one teacher and one
  student token is 1:1 aligned.
- `student_targets`: per student position, the teacher's targets where they apply: `exact` positions take
  the sparse KD (distill/losses/language.py), `approx` positions the ULD loss (distill/losses/xtoken.py).
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

import numpy as np

ROLES = ("eos", "bos", "pad", "unk")  # special tokens mapped by role, in this order of priority
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer) -> set[str]:
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    return {d.get("type") for d in [decoder, *decoder.get("decoders", [])]}


def _byte_level_table() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte <-> printable char table

    return {c: b for b, c in bytes_to_unicode().items()}


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Surface bytes of every non-special token id. Byte-level BPE vocab tokens decode through the byte
    table; metaspace tokens turn "▁" into a space and "<0xNN>" into byte NN; added (non-special) tokens are
    their text. Other tokenizer families (e.g. WordPiece "##") are refused: their surface is ambiguous."""
    types = _decoder_types(tokenizer)
    byte_level, metaspace = "ByteLevel" in types, bool(types & {"Metaspace", "Replace", "ByteFallback"})
    if not (byte_level or metaspace):
        raise ValueError(f"vocab_map supports byte-level BPE and metaspace tokenizers, not decoders {types}")
    table = _byte_level_table() if byte_level else {}
    specials = _special_ids(tokenizer)
    out = {}
    for text, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        if i in specials:
            continue
        if byte_level:
            if all(c in table for c in text):
                out[i] = bytes(table[c] for c in text)
        elif m := _BYTE_FALLBACK.fullmatch(text):
            out[i] = bytes([int(m.group(1), 16)])
        else:
            out[i] = text.replace("\u2581", " ").encode()
    for i, added in tokenizer.added_tokens_decoder.items():
        if i not in specials and i not in out:
            out[i] = added.content.encode()
    return out


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    return ids | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def vocab_map(teacher_tokenizer, student_tokenizer, teacher_vocab_size: int | None = None,
              student_vocab_size: int | None = None) -> np.ndarray:
    """int64 [teacher vocab]: for each teacher id, the student id of a token with exactly the same surface
    bytes (`token_bytes`), else -1.

    Rules: special tokens never match by text. A teacher special maps to the student special of the same
    role (eos, bos, pad, unk, in that order) when both tokenizers have one, else -1; a non-special token
    whose text looks like a special of the other side is -1. The map is injective: when several ids on a
    side share a surface, the lowest student id is the target and only the lowest teacher id maps to it
    (the others are -1, their mass goes to the tail bucket). `teacher_vocab_size` pads the map to the
    teacher model's logits width (extra ids -1); student ids >= `student_vocab_size` are never targets.
    """
    n_teacher = max(len(teacher_tokenizer), teacher_vocab_size or 0)
    n_student = student_vocab_size or len(student_tokenizer)
    out = np.full(n_teacher, -1, dtype=np.int64)
    used = set()
    for role in ROLES:
        t, s = getattr(teacher_tokenizer, f"{role}_token_id"), getattr(student_tokenizer, f"{role}_token_id")
        if t is not None and s is not None and t < n_teacher and s < n_student and out[t] < 0 and s not in used:
            out[t] = s
            used.add(s)
    by_surface: dict[bytes, int] = {}
    for i, surface in sorted(token_bytes(student_tokenizer).items()):
        if i < n_student:
            by_surface.setdefault(surface, i)
    for i, surface in sorted(token_bytes(teacher_tokenizer).items()):
        s = by_surface.get(surface)
        if s is not None and i < n_teacher and s not in used:
            out[i] = s
            used.add(s)
    return out


def encode_row(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """ids int64 [n] and character offsets int64 [n, 2] of [bos] + caption tokens + [eos], untruncated.

    The convention of teachers/language.py: bos falls back to eos when the tokenizer has no bos; an eos is
    required here. bos gets offsets (0, 0) and eos (len(text), len(text)).
    """
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("cross-tokenizer alignment needs tokenizers with an eos token")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray([bos, *enc["input_ids"], tokenizer.eos_token_id], dtype=np.int64)
    offsets = np.asarray([(0, 0), *enc["offset_mapping"], (len(text), len(text))], dtype=np.int64)
    return ids, offsets.reshape(-1, 2)


class Group(NamedTuple):
    """Caption tokens [t_start, t_stop) of the teacher and [s_start, s_stop) of the student that together
    cover characters [start, end) and end at a common boundary."""
    t_start: int
    t_stop: int
    s_start: int
    s_stop: int
    start: int
    end: int

    @property
    def one_to_one(self) -> bool:
        return self.t_stop - self.t_start == 1 and self.s_stop - self.s_start == 1


def _ends(offsets: np.ndarray, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Each token's end (the last one moved to `last`), and the ends that are boundaries: a token whose
    successor starts inside it (e.g. two byte tokens of one character) is not followed by a boundary."""
    ends = offsets[:, 1].copy()
    ends[-1] = last
    closed = np.append(ends[:-1] <= offsets[1:, 0], True)
    return ends, ends[closed]


def align(teacher_offsets, student_offsets, text_len: int) -> list[Group]:
    """Partition the caption tokens of both tokenizations (character offsets [n, 2], no bos/eos) into groups
    ending at common boundaries. The groups cover [0, text_len) in order, each with at least one token per
    side; the last group runs to text_len (so trailing characters a tokenizer trims are inside it)."""
    t_off = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    s_off = np.asarray(student_offsets, dtype=np.int64).reshape(-1, 2)
    if len(t_off) == 0 or len(s_off) == 0:
        return [] if len(t_off) == len(s_off) else [Group(0, len(t_off), 0, len(s_off), 0, text_len)]
    t_ends, t_bounds = _ends(t_off, text_len)
    s_ends, s_bounds = _ends(s_off, text_len)
    common = np.intersect1d(t_bounds, s_bounds)  # sorted; holds text_len
    t_group, s_group = np.searchsorted(common, t_ends), np.searchsorted(common, s_ends)
    t_cut = np.searchsorted(t_group, np.arange(len(common) + 1))
    s_cut = np.searchsorted(s_group, np.arange(len(common) + 1))
    starts = [0, *common[:-1].tolist()]
    return [Group(int(t_cut[g]), int(t_cut[g + 1]), int(s_cut[g]), int(s_cut[g + 1]), starts[g], int(common[g]))
            for g in range(len(common))]


def student_targets(teacher_row: dict, teacher_ids, teacher_offsets, student_ids, student_offsets,
                    id_map: np.ndarray) -> dict:
    """One caption's teacher targets at the student's positions.

    teacher_row: the stored row (token_ids [L], topk_ids [L, k], topk_logprobs [L, k], tail_logprob [L],
    optionally tempered_tail [L, n]); L may be short of the full row when the teacher truncated it.
    teacher_ids / teacher_offsets and student_ids / student_offsets: `encode_row` of the caption with each
    tokenizer (full rows: [bos] + caption + [eos], bos aligned with bos and eos with eos).
    id_map: `vocab_map(teacher_tokenizer, student_tokenizer)`.

    Student position i predicts student token i+1. Let it be the first student token of a group whose first
    teacher token is j+1 (eos forms its own group):
      exact[i]  the group is 1:1 and id_map[teacher token j+1] == student token i+1: teacher position j's
                top-k, remapped through id_map (-1: not a student token), and tail; the sparse KD is exact.
      approx[i] any other group: teacher position j's distribution, for the ULD loss (distill/losses/xtoken.py).
    Student positions inside a group, the last one (eos) and those whose j >= L (truncated) get no target.
    Returns token_ids (the student row), topk_ids int64 [n, k] (-1 where none), topk_logprobs, tail_logprob
    (0 where none), tempered_tail when the row has it, exact and approx bool [n], teacher_position int64 [n]
    (-1 where none).
    """
    t_ids, s_ids = np.asarray(teacher_ids, dtype=np.int64), np.asarray(student_ids, dtype=np.int64)
    t_off, s_off = np.asarray(teacher_offsets).reshape(-1, 2), np.asarray(student_offsets).reshape(-1, 2)
    stored = np.asarray(teacher_row["token_ids"], dtype=np.int64)
    nt, ns, length = len(t_ids), len(s_ids), len(stored)
    if len(t_off) != nt or len(s_off) != ns or min(nt, ns) < 2:
        raise ValueError("teacher and student rows need [bos] + caption + [eos] ids with one offset per id")
    if length > nt or (stored != t_ids[:length]).any():
        raise ValueError("the stored teacher row is not a prefix of the teacher encoding of this caption "
                         "(another tokenizer or caption?)")
    text_len = int(max(t_off[:, 1].max(), s_off[:, 1].max()))
    groups = align(t_off[1:-1], s_off[1:-1], text_len) + [Group(nt - 2, nt - 1, ns - 2, ns - 1, text_len, text_len)]
    source = np.full(ns, -1, dtype=np.int64)
    exact = np.zeros(ns, dtype=bool)
    for g in groups:  # caption token c is row token c + 1, predicted at position c
        source[g.s_start] = g.t_start
        exact[g.s_start] = g.one_to_one and id_map[t_ids[g.t_start + 1]] == s_ids[g.s_start + 1]
    valid = (source >= 0) & (source < length)
    source[~valid] = -1
    exact &= valid
    src = np.where(valid, source, 0)

    topk = np.asarray(teacher_row["topk_ids"], dtype=np.int64)
    if topk.size and (topk.min() < 0 or topk.max() >= len(id_map)):
        raise ValueError(f"teacher top-k ids outside the vocab map [0, {len(id_map)})")
    out = {"token_ids": s_ids, "topk_ids": np.where(valid[:, None], id_map[topk[src]], -1),
           "exact": exact, "approx": valid & ~exact, "teacher_position": source}
    for key in ("topk_logprobs", "tail_logprob", "tempered_tail"):
        if key in teacher_row:
            value = np.asarray(teacher_row[key], dtype=np.float32)[src]
            out[key] = np.where(valid.reshape(-1, *[1] * (value.ndim - 1)), value, np.float32(0))
    return out

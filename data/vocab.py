"""The student's trimmed vocabulary: the language teacher's tokens that the training captions use, plus
its special tokens and one unknown token.

Shards stay in the teacher's token space (collection does not change); `TokenMap.batch` moves a collated
batch into the student's: caption ids through the map (a token the training captions never used becomes
the unknown token), teacher top-k ids through the map with -1 for tokens outside the student vocabulary,
whose mass the sparse KD folds exactly into the tail bucket (distill/losses/language.py). The map itself is
`teacher_token_ids` in the student's config.json: student id s is teacher token `teacher_token_ids[s]`
(-1 for the unknown token), so the exported student decodes through it anywhere.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

UNKNOWN = -1  # teacher id of the student's unknown token


class TokenMap:
    """Teacher token ids <-> student token ids of a trimmed vocabulary."""

    def __init__(self, teacher_token_ids, teacher_vocab_size: int):
        self.teacher_ids = np.asarray(teacher_token_ids, dtype=np.int64)
        known = self.teacher_ids[self.teacher_ids != UNKNOWN]
        if len(np.unique(known)) != len(known) or (known < 0).any() or (known >= teacher_vocab_size).any():
            raise ValueError(f"teacher_token_ids must be distinct teacher ids in [0, {teacher_vocab_size}) or "
                             f"{UNKNOWN} (the unknown token)")
        unknown = np.flatnonzero(self.teacher_ids == UNKNOWN)
        if len(unknown) != 1:
            raise ValueError(f"teacher_token_ids needs exactly one unknown token ({UNKNOWN}), has {len(unknown)}")
        self.unknown = int(unknown[0])
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.to_student = np.full(teacher_vocab_size, -1, dtype=np.int64)
        self.to_student[known] = np.flatnonzero(self.teacher_ids != UNKNOWN)
        self._student = torch.from_numpy(self.to_student)
        self._teacher = torch.from_numpy(self.teacher_ids)

    @classmethod
    def from_config(cls, config) -> TokenMap | None:
        """The map of a student config (None: the student uses the teacher's vocabulary as it is)."""
        ids = getattr(config, "teacher_token_ids", None)
        return None if ids is None else cls(ids, config.teacher_vocab_size)

    def __len__(self) -> int:
        return len(self.teacher_ids)

    def student_ids(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Caption tokens in the student's ids; tokens outside its vocabulary become the unknown token."""
        out = self._student.to(teacher_ids.device)[teacher_ids.long()]
        return out.masked_fill(out < 0, self.unknown)

    def teacher_ids_of(self, student_ids: torch.Tensor) -> torch.Tensor:
        """Student ids back in the teacher's ids (the unknown token gives -1)."""
        return self._teacher.to(student_ids.device)[student_ids.long()]

    def batch(self, batch: dict) -> dict:
        """A collated batch (data.dataset.collate) in the student's token space."""
        out = dict(batch)
        out["input_ids"] = self.student_ids(batch["input_ids"])
        out["labels"] = torch.where(batch["labels"] == -100, -100, self.student_ids(batch["labels"].clamp_min(0)))
        if "lang" in batch:
            lang = dict(batch["lang"])
            lang["topk_ids"] = self._student.to(lang["topk_ids"].device)[lang["topk_ids"].long()]
            lang["teacher_vocab_size"] = self.teacher_vocab_size
            out["lang"] = lang
        return out

    def unknown_fraction(self, batch: dict) -> tuple[int, int]:
        """(caption tokens outside the vocabulary, caption tokens) of a teacher-space batch."""
        ids = batch["input_ids"][batch["attention_mask"].bool()]
        return int((self._student[ids.cpu()] < 0).sum()), int(ids.numel())


def caption_token_ids(dataset) -> list[int]:
    """The sorted teacher token ids of a DistillDataset's captions (its split only)."""
    ids: set[int] = set()
    for shard in sorted({s for s, _ in dataset.index}):
        rows = [r for s, r in dataset.index if s == shard]
        column = dataset._table(dataset.language, shard).column("token_ids").take(rows)
        ids.update(np.unique(pc.list_flatten(column).to_numpy()).tolist())
    return sorted(int(i) for i in ids)


def trimmed_vocab(dataset, specials: list[int | None]) -> list[int]:
    """`teacher_token_ids` of a trimmed vocabulary: the specials, the training captions' tokens, unknown."""
    seen = [i for i in dict.fromkeys([s for s in specials if s is not None] + caption_token_ids(dataset))]
    return seen + [UNKNOWN]

"""A student with its own tokenizer (`student.tokenizer`; docs/losses.md, "Cross-tokenizer students").

Teacher shards stay in the language teacher's token space (collection does not change). `CrossTokenizer`
moves each dataset item into the student's: the caption is re-encoded with the student's tokenizer and
the teacher targets move to the student positions (`student_targets`, data/align.py). `collate` then
carries the `exact` positions (the sparse KD) and the `approx` ones (the ULD loss, distill/losses/xtoken.py).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from data.align import encode_row, student_targets, vocab_map

CAPTIONS = "captions"  # student.tokenizer: a byte-level BPE trained on the training split's captions
STUDENT_TOKENIZER = "student_tokenizer"  # output_dir/<this>: a student tokenizer, saved with every export
MIN_BPE_VOCAB = 261  # the 256 byte tokens, 4 specials and at least one merge


def split_captions(dataset) -> list[str]:
    """The captions of a DistillDataset's split, in its row order (deterministic)."""
    out: list[str] = []
    for shard in sorted({s for s, _ in dataset.index}):
        rows = [r for s, r in dataset.index if s == shard]
        out += dataset._table("samples", shard).column("caption").take(rows).to_pylist()
    return out


def build_tokenizer(spec: str | None, captions: list[str], vocab_size: int):
    """The student's tokenizer: None for the teacher's (spec null); for "captions" a byte-level BPE of
    `vocab_size` tokens trained on `captions` (deterministic: the same captions give the same tokenizer);
    otherwise a local tokenizer folder, loaded without remote code."""
    if spec is None:
        return None
    if spec == CAPTIONS:
        if vocab_size < MIN_BPE_VOCAB:
            raise ValueError(f"student.tokenizer_vocab_size={vocab_size}: a byte-level BPE needs at least "
                             f"{MIN_BPE_VOCAB} tokens (256 bytes, 4 specials, one merge)")
        from data.bpe import make_bpe_tokenizer
        return make_bpe_tokenizer(list(captions), vocab_size)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"student.tokenizer: {spec!r} is neither null, {CAPTIONS!r} nor a tokenizer folder")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def save_tokenizer(tokenizer, folder) -> Path:
    """`tokenizer.save_pretrained(folder)`, replacing the folder whole (written beside it, then renamed)."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


class CrossTokenizer:
    """Moves DistillDataset items from the teacher's tokens into the student tokenizer's (apply before
    `collate`; pad with `pad_id`). The student's vocabulary is `len(student)`."""

    def __init__(self, teacher_tokenizer, student_tokenizer, teacher_vocab_size: int):
        for name, tok in (("language teacher", teacher_tokenizer), ("student", student_tokenizer)):
            if tok.eos_token_id is None:
                raise ValueError(f"student.tokenizer: the {name}'s tokenizer has no eos token, which the "
                                 "alignment of teacher and student rows needs ([bos] + caption + [eos])")
        self.teacher, self.student = teacher_tokenizer, student_tokenizer
        self.teacher_vocab_size = max(int(teacher_vocab_size), len(teacher_tokenizer))
        self.id_map = vocab_map(teacher_tokenizer, student_tokenizer, self.teacher_vocab_size, len(student_tokenizer))
        bos = student_tokenizer.bos_token_id
        # [bos] + caption + [eos] as in collection (eos stands in for a missing bos); pads are the eos too
        self.special_ids = {"bos_token_id": student_tokenizer.eos_token_id if bos is None else bos,
                            "eos_token_id": student_tokenizer.eos_token_id,
                            "pad_token_id": student_tokenizer.eos_token_id}
        self.pad_id = self.special_ids["pad_token_id"]

    def __len__(self) -> int:
        return len(self.student)

    def __call__(self, item: dict) -> dict:
        """The item with the student's `input_ids` and the teacher targets at the student's positions,
        plus `exact` / `approx` masks and `teacher_vocab_size` under `lang`."""
        caption = item["caption"]
        lang = item["lang"]
        row = {"token_ids": item["input_ids"].numpy(),
               **{k: v.numpy() for k, v in lang.items() if isinstance(v, torch.Tensor)}}
        out = student_targets(row, *encode_row(self.teacher, caption), *encode_row(self.student, caption),
                              self.id_map)
        moved = {k: torch.from_numpy(v) for k, v in out.items() if k not in ("token_ids", "teacher_position")}
        moved["teacher_vocab_size"] = self.teacher_vocab_size
        if "tail_temperatures" in lang:
            moved["tail_temperatures"] = lang["tail_temperatures"]
        return {**item, "input_ids": torch.from_numpy(out["token_ids"]), "lang": moved}

    def caption_ids(self, captions: list[str]) -> list[int]:
        """The sorted student token ids of `captions`, bos and eos (an MTP draft vocabulary)."""
        rows = self.student(list(captions), add_special_tokens=False)["input_ids"] if captions else []
        specials = {self.special_ids["bos_token_id"], self.special_ids["eos_token_id"]}
        return sorted({int(i) for r in rows for i in r} | specials)

"""The student's token space, from the config: the language teacher's vocabulary, a trimmed one
(`student.vocab=trimmed`, data/vocab.py) or the student's own tokenizer (`student.tokenizer`,
data/student_tokenizer.py). The recipe builds the student's config and its batches through it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.dataset import collate
from data.student_tokenizer import (
    STUDENT_TOKENIZER,
    CrossTokenizer,
    build_tokenizer,
    save_tokenizer,
    split_captions,
)
from data.vocab import TokenMap, caption_token_ids, trimmed_vocab
from distill.config.load import output_path
from distill.config.schema import Vocab


@dataclass
class StudentVocab:
    vocab_size: int
    pad_id: int  # what `collate` pads captions with (the teacher's eos id, or the student tokenizer's)
    config: dict = field(default_factory=dict)  # CogViTMTPConfig keywords: special ids, maps, draft vocabulary
    token_map: TokenMap | None = None  # a trimmed vocabulary: moves collated batches
    cross: CrossTokenizer | None = None  # the student's own tokenizer: moves items before collating

    def collate(self, items: list[dict]) -> dict:
        """A batch of dataset items in the student's token ids."""
        if self.cross is not None:
            items = [self.cross(it) for it in items]
        batch = collate(items, self.pad_id)
        return self.token_map.batch(batch) if self.token_map is not None else batch


def teacher_tokenizer(target_dir: Path):
    """The language teacher's tokenizer, saved beside its shards by collection."""
    from transformers import AutoTokenizer
    folder = Path(target_dir) / "tokenizer"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the language teacher's tokenizer is missing (a student tokenizer "
                                "needs it to align the targets); re-run `mmtp collect`")
    return AutoTokenizer.from_pretrained(str(folder))


def student_vocab(cfg, dataset, save: bool = True) -> StudentVocab:
    """The student's vocabulary for the training `dataset`; with `student.tokenizer`, the tokenizer is
    built (deterministically) and, with `save`, written to output_dir/student_tokenizer."""
    producer = dataset.targets[dataset.language]["producer"]
    draft = cfg.student.mtp_depth > 0
    if cfg.student.tokenizer is not None:
        captions = split_captions(dataset)
        student = build_tokenizer(cfg.student.tokenizer, captions, cfg.student.tokenizer_vocab_size)
        cross = CrossTokenizer(teacher_tokenizer(dataset.target_dirs[dataset.language]), student,
                               producer["vocab_size"])
        if save:
            save_tokenizer(student, output_path(cfg, STUDENT_TOKENIZER))
        extra = {"draft_vocab": cross.caption_ids(captions)} if draft else {}
        return StudentVocab(len(student), cross.pad_id, {**cross.special_ids, **extra}, cross=cross)
    pad_id = producer.get("eos_id") or 0
    specials = {"bos_token_id": producer.get("bos_id"), "eos_token_id": producer.get("eos_id"),
                "pad_token_id": pad_id}
    if cfg.student.vocab == Vocab.trimmed:
        ids = trimmed_vocab(dataset, [producer.get("bos_id"), producer.get("eos_id"), pad_id])
        token_map = TokenMap(ids, producer["vocab_size"])
        config = {k: None if v is None else int(token_map.student_ids(torch.tensor(v)))  # in the student's ids
                  for k, v in specials.items()}
        config.update(teacher_token_ids=ids, teacher_vocab_size=producer["vocab_size"])
        return StudentVocab(len(token_map), pad_id, config, token_map=token_map)
    extra = {"draft_vocab": caption_token_ids(dataset)} if draft else {}
    return StudentVocab(producer["vocab_size"], pad_id, {**specials, **extra})

"""Processor of the CogViT MTP student: its image processor and its tokenizer (the language teacher's, or the
student's own when it was trained with `student.tokenizer`), together.

`processor(images=..., text=...)` gives what `model.generate` and `model(...)` take: `pixel_values` and
`input_ids` laid out like the training captions, `[bos] + caption tokens` (the tokenizer's eos stands in for a
missing bos, as in collection); without text, each image gets the prompt `[bos]`, from which the student
writes a caption. Texts of different lengths are right-padded with an `attention_mask` (what `forward` takes;
`generate` wants unpadded prompts, so pass those one by one).

A student with a trimmed vocabulary (`teacher_token_ids` in its config) saves the same map here: the
processor encodes the tokenizer's ids into the student's (a token outside the vocabulary becomes the unknown
token) and `decode`/`batch_decode` map the student's ids back before detokenising.
"""

import torch
from transformers import BatchFeature, ProcessorMixin


class CogViTMTPProcessor(ProcessorMixin):
    def __init__(self, image_processor, tokenizer, teacher_token_ids=None, **kwargs):
        self.teacher_token_ids = None if teacher_token_ids is None else list(teacher_token_ids)
        self._to_student = None
        if self.teacher_token_ids is not None:
            self._to_student = {t: s for s, t in enumerate(self.teacher_token_ids) if t >= 0}
            self._unknown = self.teacher_token_ids.index(-1)
        super().__init__(image_processor, tokenizer, **kwargs)

    def _student_ids(self, ids: list[int]) -> list[int]:
        if self._to_student is None:
            return list(ids)
        return [self._to_student.get(t, self._unknown) for t in ids]

    def _teacher_ids(self, ids) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if self.teacher_token_ids is None:
            return ids
        return [self.teacher_token_ids[s] for s in ids if self.teacher_token_ids[s] >= 0]

    def decode(self, token_ids, **kwargs) -> str:
        """Text of the student's token ids (through the trimmed vocabulary's map, if any)."""
        return self.tokenizer.decode(self._teacher_ids(token_ids), **kwargs)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return [self.decode(row, **kwargs) for row in sequences]

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError("CogViTMTPProcessor: the tokenizer has neither a bos nor an eos token")
        return self._student_ids([bos])[0]

    def __call__(self, images=None, text=None, return_tensors: str = "pt", **kwargs) -> BatchFeature:
        if images is None and text is None:
            raise ValueError("CogViTMTPProcessor: give images, text or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors="pt", **kwargs))
        if text is None:
            rows = [[self.bos_token_id]] * data["pixel_values"].shape[0]
        else:
            texts = [text] if isinstance(text, str) else list(text)
            encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
            rows = [[self.bos_token_id] + self._student_ids(ids) for ids in encoded]
            if images is not None and len(rows) != data["pixel_values"].shape[0]:
                raise ValueError(f"CogViTMTPProcessor: {data['pixel_values'].shape[0]} images but {len(rows)} texts")
        width = max(len(r) for r in rows)
        pad = self._student_ids([self.tokenizer.pad_token_id])[0] if self.tokenizer.pad_token_id is not None else 0
        data["input_ids"] = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        if any(len(r) < width for r in rows):
            data["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["CogViTMTPProcessor"]

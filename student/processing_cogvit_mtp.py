"""Processor of the CogViT MTP student: its image processor and the language teacher's tokenizer, together.

`processor(images=..., text=...)` gives what `model.generate` and `model(...)` take: `pixel_values` and
`input_ids` laid out like the training captions, `[bos] + caption tokens` (the tokenizer's eos stands in for a
missing bos, as in collection); without text, each image gets the prompt `[bos]`, from which the student
writes a caption. Texts of different lengths are right-padded with an `attention_mask` (what `forward` takes;
`generate` wants unpadded prompts, so pass those one by one).
"""

import torch
from transformers import BatchFeature, ProcessorMixin


class CogViTMTPProcessor(ProcessorMixin):
    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if bos is None:
            raise ValueError("CogViTMTPProcessor: the tokenizer has neither a bos nor an eos token")
        return bos

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
            rows = [[self.bos_token_id] + ids for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
            if images is not None and len(rows) != data["pixel_values"].shape[0]:
                raise ValueError(f"CogViTMTPProcessor: {data['pixel_values'].shape[0]} images but {len(rows)} texts")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data["input_ids"] = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        if any(len(r) < width for r in rows):
            data["attention_mask"] = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return BatchFeature(data=data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "input_ids", "attention_mask"]


__all__ = ["CogViTMTPProcessor"]

"""The image-aware language teacher (kind "hf_vlm"): any transformers image-text-to-text model
(AutoModelForImageTextToText + AutoProcessor) scores each caption while it sees the caption's image.

Sources: a local HF folder or a hub id (offline it fails with the LM teacher's clear error); no GGUF,
no adapters. The stored row is the causal-LM teacher's (teachers/language.py): token ids
[bos] + caption tokens + [eos] in the VLM tokenizer's ids, cut to `max_tokens`, and per stored position
the same top-k log-probs, tail, token log-prob (and tempered tails).

The teacher's input for a sample is its chat prompt, made by the processor's own chat template and
processor (user turn = [image, `instruction`], then the generation prompt, the image expanded into the
model's image tokens), followed by the row's tokens after bos (caption + eos), exactly as the LM teacher
appends a row to its prompt. Only the caption's positions are stored: stored position 0 is the prompt's
last position (it predicts the caption's first token), position j predicts token j+1 of the row. Image
tokens are never stored. The prompt differs per image, so every batch runs one full forward.
"""
import inspect
import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from data.devices import resolve_device
from data.identity import json_sha256, tokenizer_digest, weights_digest
from data.images import decode_image

from .contract import Modality
from .language import HFCausalLMTeacher, load_pretrained, peek_vocab_size, row_targets, vocab_and_specials
from .registry import resolve_source, teacher_config

log = logging.getLogger(__name__)


class HFVLMTeacher:
    """A `LanguageTeacher` (teachers/contract.py) over any AutoModelForImageTextToText."""
    modality = Modality.language

    def __init__(self, cfg, cache_dir):
        self.cfg = tc = teacher_config(cfg)
        where = f"teacher {tc.name!r} (kind hf_vlm)"
        for key in ("gguf_file", "adapt", "adapters"):
            if getattr(tc, key) is not None:
                raise ValueError(f"{where}: {key} is not supported for an image-text-to-text teacher")
        if tc.prompt_format == "prefix":
            raise ValueError(f"{where}: reads captions in its chat format only; use prompt_format auto or chat")
        self.device = resolve_device(tc.device)  # once, before any weights load
        location, local = resolve_source(tc, Path(cache_dir).expanduser())
        kwargs = dict(revision=tc.revision, trust_remote_code=tc.trust_remote_code)
        self.location = location
        self.processor, self.model = load_pretrained(tc, location, local, kwargs, AutoProcessor,
                                                     AutoModelForImageTextToText)
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = self.processor.tokenizer
        if not getattr(self.processor, "chat_template", None):
            raise ValueError(f"{where}: its processor has no chat template")
        self.vocab_size, self.bos_id, self.eos_id = vocab_and_specials(tc, self.model, self.tokenizer)
        config = self.model.config
        self.image_token_ids = {i for i in (getattr(config, "image_token_id", None),
                                            getattr(config, "image_token_index", None)) if i is not None}
        self.prompt_format = "chat"
        self.prompt_text = self.processor.apply_chat_template(self._chat(None), add_generation_prompt=True)
        self.keep_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._identity = None

    # the caption rows: exactly the LM teacher's ([bos] + tokens + [eos], cut to max_tokens)
    encode = HFCausalLMTeacher.encode
    _encode = HFCausalLMTeacher._encode

    def _chat(self, image) -> list[dict]:
        image = {"type": "image"} if image is None else {"type": "image", "image": image}
        return [{"role": "user", "content": [image, {"type": "text", "text": self.cfg.instruction}]}]

    def identity(self) -> dict:
        if self._identity is None:
            tc, proc = self.cfg, self.processor
            local = Path(self.location).is_dir()
            self._identity = {
                "name": tc.name, "kind": tc.kind, "source": tc.source, "revision": tc.revision,
                "weights_digest": weights_digest(self.location) if local else None,
                "tokenizer_digest": tokenizer_digest(self.tokenizer),
                "vocab_size": self.vocab_size, "top_k": tc.top_k, "dtype": tc.dtype,
                "max_tokens": tc.max_tokens, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "logprob_encoding": tc.logprob_encoding, "tail_temperatures": list(tc.tail_temperatures),
                # the prompt (its text with the image placeholder, before the processor expands it)
                "prompt": {"format": self.prompt_format, "instruction": tc.instruction, "text": self.prompt_text},
                # how an image becomes pixels and image tokens: the processor's settings and its chat template
                "processor_digest": json_sha256([json.loads(proc.to_json_string()), proc.chat_template]),
            }
        return dict(self._identity)

    @classmethod
    def peek_vocab_size(cls, cfg, cache_dir) -> int:
        return peek_vocab_size(cfg, cache_dir)

    def prepare(self, samples: list[dict]) -> dict:
        """Decode and tokenise a batch (no forward): runs in collection's prefetch thread when there is one."""
        token_ids, cut = self._encode([s["caption"] for s in samples])
        images = [decode_image(s["image"]) for s in samples]
        return {"token_ids": token_ids, "cut": cut, "inputs": self.inputs(token_ids, images)}

    def rows_from(self, prepared: dict) -> list[dict]:
        rows = self.targets_from(prepared["token_ids"], *prepared["inputs"])
        for row, was_cut in zip(rows, prepared["cut"], strict=True):
            row["truncated"] = was_cut
        return rows

    def rows(self, samples: list[dict]) -> list[dict]:
        """Target rows of a batch of samples rows: soft targets over each caption, read with its image."""
        return self.rows_from(self.prepare(samples))

    def inputs(self, token_ids: list[list[int]], images: list) -> tuple[dict, list[int]]:
        """The model inputs of a batch, right-padded: each sample's processed prompt (its image's tokens
        expanded) + its row after bos; and each prompt's length."""
        if not token_ids or len(token_ids) != len(images):
            raise ValueError(f"teacher {self.cfg.name!r}: {len(token_ids)} rows for {len(images)} images")
        for i, row in enumerate(token_ids):
            if not row or min(row) < 0 or max(row) >= self.vocab_size:
                raise ValueError(f"teacher {self.cfg.name!r}: row {i} is empty or has a token id outside "
                                 f"[0, {self.vocab_size})")
            if self.image_token_ids & set(row):
                raise ValueError(f"teacher {self.cfg.name!r}: caption {i} holds the model's image token")
        enc = self.processor.apply_chat_template(
            [self._chat(im) for im in images], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs=dict(padding=True))
        ids, mask = enc.pop("input_ids"), enc.pop("attention_mask").bool()
        # per-token inputs beyond the ids (e.g. token_type_ids marking image tokens): caption tokens get 0
        per_token = [k for k, v in enc.items() if torch.is_tensor(v) and v.shape[:2] == ids.shape]
        starts = [int(m.sum()) for m in mask]  # the processor may pad left or right: its mask says where
        width = max(p + len(row) - 1 for p, row in zip(starts, token_ids, strict=True))
        out = {k: torch.zeros(len(ids), width, dtype=(ids if k == "input_ids" else enc[k]).dtype)
               for k in ["input_ids", *per_token]}
        out["attention_mask"] = torch.zeros(len(ids), width, dtype=torch.long)
        for i, (p, row) in enumerate(zip(starts, token_ids, strict=True)):
            out["input_ids"][i, :p] = ids[i][mask[i]]
            out["input_ids"][i, p: p + len(row) - 1] = torch.as_tensor(row[1:])
            out["attention_mask"][i, : p + len(row) - 1] = 1
            for k in per_token:
                out[k][i, :p] = enc[k][i][mask[i]]
        for k, v in enc.items():
            if k not in per_token:
                out[k] = v
        return out, starts

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[list[int]], inputs: dict, starts: list[int]) -> list[torch.Tensor]:
        """The teacher forward: float32 logits [L, V] at each stored row's positions (prompt's last position on)."""
        dtype = self.model.dtype
        inputs = {k: v.to(self.device, dtype=dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        width = inputs["input_ids"].shape[1]
        lo = min(starts) - 1 if self.keep_logits else 0  # the logits before every caption are never computed
        extra = {"logits_to_keep": width - lo} if self.keep_logits else {}
        logits = self.model(**inputs, use_cache=False, **extra).logits
        return [logits[i, p - 1 - lo: p - 1 - lo + len(row)].float()
                for i, (p, row) in enumerate(zip(starts, token_ids, strict=True))]

    @torch.inference_mode()
    def targets_from(self, token_ids: list[list[int]], inputs: dict, starts: list[int]) -> list[dict]:
        return [row_targets(logits, row, self.cfg.top_k, self.cfg.tail_temperatures)
                for logits, row in zip(self.forward_logits(token_ids, inputs, starts), token_ids, strict=True)]

    def soft_targets(self, token_ids: list[list[int]], images: list) -> list[dict]:
        """Per row, the fields of `HFCausalLMTeacher.soft_targets`, each row read with its image (PIL)."""
        return self.targets_from(token_ids, *self.inputs(token_ids, images))

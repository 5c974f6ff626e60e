"""The causal-LM teacher (kind "hf_causal_lm"): teacher-forced top-k log-probs plus a tail bucket.

Sources: a local HF folder, a hub id (needs the hub; offline it fails with a clear error), or a
GGUF file via `gguf_file` (needs `gguf` and `accelerate`). A GGUF model is dequantised once and
cached as a safetensors folder under cache_dir/gguf-<sha256 of the gguf>; later runs load that.

Token ids of a caption are [bos] + caption tokens + [eos], truncated to `max_tokens`. When the
tokenizer has no bos, its eos opens the row instead (GPT-2 style); with neither it is an error.
Position j of the targets holds the teacher's distribution over token j+1 (the last position
predicts what follows the row).

In-format scoring: the teacher reads each caption where its training put such text. For a chat model
(`prompt_format` chat, or auto with a chat template) that is the assistant turn of its own chat
template after the user's `instruction`; for a base model, after bos + `prefix`. The teacher's input
is the prompt + the caption's tokens + eos, and only the caption's positions are stored, so the rows'
meaning is the same in every format: stored position 0 is the prompt's last position. The prompt is
shared by every caption, so it runs once and its key/value cache is reused for every batch.
"""
import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

from data.devices import resolve_device
from data.identity import file_sha256, tokenizer_digest, weights_digest
from data.stop import check_stop

from .adapt import attach_adapters, fold_of
from .contract import Modality
from .graft import check_vision_targets, image_prefix, load_projectors
from .prompt import rows_after_prompt, run_prompt
from .registry import TeacherSourceError, offline_error, resolve_source, teacher_config, torch_dtype

log = logging.getLogger(__name__)
GGUF_INFO = "gguf_source.json"


def _gguf_path(tc, location: str) -> Path:
    path = Path(location) / tc.gguf_file
    if not path.is_file():
        raise TeacherSourceError(f"teacher {tc.name!r}: gguf_file {tc.gguf_file!r} not found in {location}")
    return path


def _gguf_cache_folder(gguf: Path, cache_dir) -> Path:
    return Path(cache_dir) / f"gguf-{file_sha256(gguf)[:16]}"


def _convert_gguf(tc, gguf: Path, folder: Path):
    """Dequantise a GGUF model once and save it (safetensors) with its tokenizer into `folder`."""
    log.info("converting %s to a safetensors folder %s (once)", gguf, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        kwargs = dict(gguf_file=gguf.name, trust_remote_code=tc.trust_remote_code)
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(tmp)
        # dequantize=True: a plain dense float32 model, which save_pretrained accepts
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs)
        model.save_pretrained(tmp)
        info = {"gguf_file": gguf.name, "gguf_sha256": file_sha256(gguf), "source": tc.source}
        (tmp / GGUF_INFO).write_text(json.dumps(info, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # lost a race with a concurrent converter: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _gguf_vocab_size(path: Path) -> int:
    from transformers.integrations.gguf.reader import read_gguf_metadata  # header only: milliseconds

    metadata, _ = read_gguf_metadata(str(path))
    arch = metadata.get("general.architecture")
    vocab = metadata.get(f"{arch}.vocab_size", metadata.get("tokenizer.ggml.tokens"))  # tokens: their count
    if not isinstance(vocab, int):
        raise ValueError(f"{path}: no vocab size in the GGUF metadata")
    return vocab


def peek_vocab_size(cfg, cache_dir) -> int:
    """The teacher's logits width, read from its config (or GGUF header) without loading weights."""
    tc = teacher_config(cfg)
    location, local = resolve_source(tc, Path(cache_dir).expanduser())
    if tc.gguf_file and local:
        return _gguf_vocab_size(_gguf_path(tc, location))
    try:
        config = AutoConfig.from_pretrained(
            location, gguf_file=tc.gguf_file, revision=tc.revision, trust_remote_code=tc.trust_remote_code)
    except OSError as err:
        if local:
            raise
        raise offline_error(tc, err) from err
    return int(config.get_text_config().vocab_size)


def load_pretrained(tc, location: str, local: bool, kwargs: dict, tokenizer_cls, model_cls) -> tuple:
    """(tokenizer or processor, model) of a teacher folder or hub id: safetensors only where a local folder has
    them (never a pickled .bin lying beside them), the offline error for a hub id that cannot be reached."""
    try:
        tokenizer = tokenizer_cls.from_pretrained(location, **kwargs)
        if local and any(Path(location).glob("*.safetensors")):
            kwargs = {**kwargs, "use_safetensors": True}
        return tokenizer, model_cls.from_pretrained(location, dtype=torch_dtype(tc.dtype), **kwargs)
    except OSError as err:
        if local:
            raise
        raise offline_error(tc, err) from err


def vocab_and_specials(tc, model, tok) -> tuple[int, int, int | None]:
    """(vocab size, bos id, eos id) of a language teacher: bos is eos where the tokenizer has no bos; top_k must
    fit the vocabulary."""
    vocab_size = int(model.config.get_text_config().vocab_size)
    if tc.top_k > vocab_size:
        raise ValueError(f"teacher {tc.name!r}: top_k={tc.top_k} exceeds the vocab size {vocab_size}")
    bos_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos_id is None:
        raise ValueError(f"teacher {tc.name!r}: its tokenizer has neither a bos nor an eos token")
    return vocab_size, bos_id, tok.eos_token_id


class HFCausalLMTeacher:
    """A `LanguageTeacher` (teachers/contract.py) over any AutoModelForCausalLM."""
    modality = Modality.language
    reads: tuple[str, ...] = ()  # a grafted teacher: the vision teacher whose stored rows it reads (teachers/graft.py)

    def __init__(self, cfg, cache_dir):
        self.cfg = tc = teacher_config(cfg)
        self.device = resolve_device(tc.device)  # once, before any weights load
        cache_dir = Path(cache_dir).expanduser()
        location, local = resolve_source(tc, cache_dir)
        kwargs = dict(revision=tc.revision, trust_remote_code=tc.trust_remote_code)
        self.gguf_digest = None
        if tc.gguf_file and local:
            gguf = _gguf_path(tc, location)
            folder = _gguf_cache_folder(gguf, cache_dir)
            if not folder.is_dir():
                _convert_gguf(tc, gguf, folder)
            self.gguf_digest = json.loads((folder / GGUF_INFO).read_text())["gguf_sha256"]
            location, kwargs = str(folder), dict(trust_remote_code=tc.trust_remote_code)
        elif tc.gguf_file:
            kwargs["gguf_file"] = tc.gguf_file
        self.location = location
        self.tokenizer, self.model = load_pretrained(tc, location, local, kwargs, AutoTokenizer, AutoModelForCausalLM)
        self.adapters = None  # adapters.json of the fitted correction adapters (teachers/adapt.py), when given
        self.projectors = {}  # a graft's projectors by fold
        if tc.adapters:
            self.model, self.adapters = attach_adapters(self.model, Path(tc.adapters).expanduser())
            if self.adapters.get("graft") is not None:  # teachers/graft.py
                self.projectors = load_projectors(Path(tc.adapters).expanduser(), self.adapters, self.device)
                self.reads = (self.adapters["graft"]["vision"],)
        self.model.to(self.device).eval().requires_grad_(False)
        self.vocab_size, self.bos_id, self.eos_id = vocab_and_specials(tc, self.model, self.tokenizer)
        self.prompt_format, self.prompt_ids = prompt_ids(tc, self.tokenizer, self.bos_id)
        self._prompt_state = {}  # adapter name -> (key/value cache, last logits) of the prompt
        self._identity = None

    def identity(self) -> dict:
        if self._identity is None:
            tc = self.cfg
            local = Path(self.location).is_dir()
            self._identity = {
                "name": tc.name, "kind": tc.kind, "source": tc.source, "gguf_file": tc.gguf_file,
                "revision": tc.revision,
                "weights_digest": self.gguf_digest or (weights_digest(self.location) if local else None),
                "tokenizer_digest": tokenizer_digest(self.tokenizer),
                "vocab_size": self.vocab_size, "top_k": tc.top_k, "dtype": tc.dtype,
                "max_tokens": tc.max_tokens, "bos_id": self.bos_id, "eos_id": self.eos_id,
                "logprob_encoding": tc.logprob_encoding, "tail_temperatures": list(tc.tail_temperatures),
                # the prompt is part of what the teacher is: a new prompt gives other targets (re-collects)
                "prompt": {"format": self.prompt_format, "instruction": tc.instruction, "prefix": tc.prefix,
                           "ids": list(self.prompt_ids)},
            }
            if self.adapters is not None:  # corrected: which adapters scored the rows, by fold
                self._identity["adapt"] = {
                    "folds": self.adapters["folds"], "config": self.adapters["adapt"],
                    "data_digest": self.adapters["data_digest"],
                    "adapters": [{k: a[k] for k in ("fold", "digest", "steps", "val_perplexity_before",
                                                    "val_perplexity_after", "projector_digest") if k in a}
                                 for a in self.adapters["adapters"]]}
                if self.reads:  # grafted: the vision teacher whose features the projectors read
                    self._identity["adapt"]["graft"] = self.adapters["graft"]
        return dict(self._identity)

    def check_reads(self, folders: dict) -> None:
        """Refuse the target folders of the teachers in `reads` (a graft's vision teacher) when they are missing or
        come from another teacher than the graft was fitted on (teachers.graft.GraftMismatchError)."""
        for name in self.reads:
            check_vision_targets(self.adapters["graft"], folders[name])

    @classmethod
    def peek_vocab_size(cls, cfg, cache_dir) -> int:
        return peek_vocab_size(cfg, cache_dir)

    def rows(self, samples: list[dict]) -> list[dict]:
        """Target rows of a batch of samples rows: soft targets over each caption (teachers/contract.py)."""
        token_ids, cut = self._encode([s["caption"] for s in samples])
        if self.adapters is None:
            rows = self.soft_targets(token_ids)
        else:  # cross-fitted: a row of fold k is scored by adapter k, which never trained on it
            folds = [fold_of(s["id"], self.adapters["folds"]) for s in samples]
            rows = [None] * len(samples)
            for k in sorted(set(folds)):
                check_stop()  # a stop request is honoured between the folds' forwards too (teachers/collect.py)
                picked = [i for i, f in enumerate(folds) if f == k]
                image = (image_prefix(self.projectors[k], [samples[i] for i in picked], self.reads[0], self.device)
                         if self.reads else None)
                out = self.soft_targets([token_ids[i] for i in picked], adapter=k, prefix=image)
                for i, row in zip(picked, out, strict=True):
                    rows[i] = row
        for row, was_cut in zip(rows, cut, strict=True):
            row["truncated"] = was_cut
        return rows

    def encode(self, captions: list[str]) -> tuple[list[list[int]], int]:
        """[bos] + tokens + [eos] per caption, cut to max_tokens; also the number of rows cut."""
        rows, cut = self._encode(captions)
        return rows, sum(cut)

    def _encode(self, captions: list[str]) -> tuple[list[list[int]], list[bool]]:
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"teacher {self.cfg.name!r}: caption {i} is {type(caption).__name__}, not str")
        encoded = self.tokenizer(list(captions), add_special_tokens=False)["input_ids"] if captions else []
        rows, cut = [], []
        for ids in encoded:
            row = [self.bos_id] + list(ids) + ([self.eos_id] if self.eos_id is not None else [])
            cut.append(len(row) > self.cfg.max_tokens)
            rows.append(row[: self.cfg.max_tokens])
        return rows, cut

    def _batch(self, token_ids: list[list[int]]):
        if not token_ids:
            raise ValueError(f"teacher {self.cfg.name!r}: empty batch")
        for i, row in enumerate(token_ids):
            if len(row) == 0:
                raise ValueError(f"teacher {self.cfg.name!r}: row {i} has no tokens")
            if min(row) < 0 or max(row) >= self.vocab_size:
                raise ValueError(f"teacher {self.cfg.name!r}: row {i} has a token id outside [0, {self.vocab_size})")
        width = max(len(row) for row in token_ids)
        input_ids = torch.zeros(len(token_ids), width, dtype=torch.long)
        mask = torch.zeros(len(token_ids), width, dtype=torch.long)
        for i, row in enumerate(token_ids):  # right padding: real tokens never see the pads
            input_ids[i, : len(row)] = torch.as_tensor(row)
            mask[i, : len(row)] = 1
        return input_ids.to(self.device), mask.to(self.device)

    def scored_inputs(self, token_ids: list[list[int]]) -> list[list[int]]:
        """The teacher's whole input for each stored row: the prompt + the row after its bos."""
        return [list(self.prompt_ids) + list(row[1:]) for row in token_ids]

    def _prompt(self, key=None):
        """The prompt's key/value cache and its last position's logits (the first caption token's distribution)."""
        if key not in self._prompt_state:
            self._prompt_state[key] = run_prompt(self.model, self.prompt_ids, self.device)
        return self._prompt_state[key]

    @torch.inference_mode()
    def forward_logits(self, token_ids: list[list[int]], adapter=None, prefix=None) -> torch.Tensor:
        """The teacher forward: float32 logits [B, L, V] at the stored rows' positions, right-padded to the
        longest row. The prompt's cache is copied for the batch; the rows run after it (after `prefix` [B, T, H],
        a graft's image tokens, when given)."""
        input_ids, mask = self._batch(token_ids)
        if adapter is not None:
            self.model.set_adapter(f"fold-{adapter}")
        cache, first = self._prompt(adapter)
        return rows_after_prompt(self.model, copy.deepcopy(cache), first, input_ids, mask, prefix)

    @torch.inference_mode()
    def soft_targets(self, token_ids: list[list[int]], adapter=None, prefix=None) -> list[dict]:
        """Per row: token_ids int32 [L], topk_ids int32 [L,k], topk_logprobs float32 [L,k] (descending,
        log-softmax at T=1), tail_logprob float32 [L] = log of the mass outside the top-k (-inf when
        k == vocab) and token_logprob float32 [L] = the log-prob of the actual next token (NaN at the
        last position, which has none); with `tail_temperatures`, also tempered_tail float32 [L, n_τ] =
        log(U_τ / A_τ), U_τ = Σ_{j∉K} e^{l_j/τ} and A_τ = Σ_{i∈K} e^{l_i/τ} (docs/losses.md)."""
        all_logits = self.forward_logits(token_ids, adapter, prefix)
        # row by row: the masked copy in row_targets is one row's size
        return [row_targets(all_logits[i, : len(row)], row, self.cfg.top_k, self.cfg.tail_temperatures)
                for i, row in enumerate(token_ids)]


def row_targets(logits: torch.Tensor, row: list[int], top_k: int, temps=()) -> dict:
    """One stored row's targets (the fields of `HFCausalLMTeacher.soft_targets`) from its logits [L, V]:
    position j is the teacher's distribution over token j+1 of `row`."""
    log_z = torch.logsumexp(logits, dim=-1)
    top_logits, top_ids = torch.topk(logits, top_k, dim=-1, sorted=True)
    # logsumexp outside the top-k, not log(1 - sum p_topk): stable when the top-k holds ~all mass
    rest = logits.scatter(-1, top_ids, float("-inf"))
    following = torch.as_tensor(row[1:], device=logits.device).unsqueeze(-1)
    token_logprob = torch.full((len(row),), float("nan"), device=logits.device)
    token_logprob[:-1] = logits[:-1].gather(-1, following).squeeze(-1) - log_z[:-1]
    out = {
        "token_ids": np.asarray(row, dtype=np.int32),
        "topk_ids": top_ids.int().cpu().numpy(),
        "topk_logprobs": (top_logits - log_z.unsqueeze(-1)).cpu().numpy(),
        "tail_logprob": (torch.logsumexp(rest, dim=-1) - log_z).cpu().numpy(),
        "token_logprob": token_logprob.cpu().numpy(),
    }
    if temps:
        tempered = [torch.logsumexp(rest / t, -1) - torch.logsumexp(top_logits / t, -1) for t in temps]
        out["tempered_tail"] = torch.stack(tempered, -1).cpu().numpy()
    return out


def prompt_ids(tc, tokenizer, bos_id: int) -> tuple[str, list[int]]:
    """(the format used, the token ids before every caption) for the teacher config `tc`."""
    fmt = tc.prompt_format
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "auto":
        fmt = "chat" if has_template else "prefix"
    if fmt == "chat":
        if not has_template:
            raise ValueError(f"teacher {tc.name!r}: prompt_format=chat but its tokenizer has no chat template; "
                             "use prompt_format=prefix (with a `prefix` text) for a base model")
        text = tokenizer.apply_chat_template([{"role": "user", "content": tc.instruction}],
                                             add_generation_prompt=True, tokenize=False)
        return fmt, list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prefix = tokenizer(tc.prefix, add_special_tokens=False)["input_ids"] if tc.prefix else []
    return fmt, [bos_id] + list(prefix)

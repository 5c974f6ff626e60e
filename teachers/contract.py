"""The teacher contract: what collection asks of a teacher, by modality (docs/teachers.md).

A teacher class is built as `cls(cfg: TeacherConfig, cache_dir: Path)` and declares its `modality`;
collection reads that attribute (never guesses from methods or keys), records it in the target
manifest, and hands each batch of samples rows to the teacher's `rows`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

from data.targets import Modality


@runtime_checkable
class LanguageTeacher(Protocol):
    """A frozen causal LM. `identity()` holds at least name, kind, `vocab_size` and `top_k`."""
    modality: ClassVar[Modality]  # Modality.language
    tokenizer: Any  # saved beside the shards: the student and evaluation use it

    @classmethod
    def peek_vocab_size(cls, cfg: Any, cache_dir: Any) -> int:
        """The logits width from the teacher's config alone (no weights), checked before any compute."""

    def identity(self) -> dict: ...

    def rows(self, samples: list[dict]) -> list[dict]:
        """Samples rows (`caption`, `image` PNG bytes, ...) -> one target row each: `token_ids` [L],
        `topk_ids` [L, k], `topk_logprobs` [L, k], `tail_logprob` [L], `truncated` (bool)."""


@runtime_checkable
class VisionTeacher(Protocol):
    """A frozen vision encoder. `identity()` holds at least name, kind, `summary_dim`, `feature_dim`,
    `num_patches` and `grid`."""
    modality: ClassVar[Modality]  # Modality.vision

    def identity(self) -> dict: ...

    def rows(self, samples: list[dict]) -> list[dict]:
        """Samples rows -> one target row each: `summary` [summary_dim], `features` [num_patches, feature_dim]."""


PROTOCOLS = {Modality.language: LanguageTeacher, Modality.vision: VisionTeacher}


def declared_modality(cls: type) -> Modality:
    """The modality a teacher class declares; TypeError naming the fix when it declares none."""
    value = getattr(cls, "modality", None)
    try:
        return Modality(value)
    except ValueError:
        raise TypeError(f"teacher class {cls.__module__}.{cls.__qualname__} must declare `modality` = one of "
                        f"{[m.value for m in Modality]} (docs/teachers.md), got {value!r}") from None


def check_teacher(teacher: Any) -> Modality:
    """The teacher's declared modality, after checking it implements that modality's protocol."""
    modality = declared_modality(type(teacher))
    if not isinstance(teacher, PROTOCOLS[modality]):
        raise TypeError(f"teacher {type(teacher).__qualname__} declares modality {modality.value!r} but does not "
                        f"implement {PROTOCOLS[modality].__name__} (docs/teachers.md)")
    return modality


def reads(teacher: Any) -> tuple[str, ...]:
    """The names of the teachers whose stored target rows `teacher` reads (its optional `reads`: a grafted language
    teacher's vision teacher, teachers/graft.py); () for any other teacher. Such a teacher also has
    `check_reads(folders)`, which refuses their target folders when it cannot read them."""
    value = getattr(teacher, "reads", ())
    if not isinstance(value, tuple | list) or not all(isinstance(n, str) for n in value):
        raise TypeError(f"teacher class {type(teacher).__qualname__}: `reads` must be a tuple of teacher names, "
                        f"got {value!r}")
    return tuple(value)

"""A teacher's configuration and the table of teacher kinds' names: the `teachers:` entries of the run config.

Both the teachers (which run a config) and distill's config schema (which loads and checks it) read these,
so they live in the layer both may import. The kinds themselves, their classes, stay in teachers/: a built-in
kind is named here with the dotted path of its class, imported only when a teacher is built
(teachers.registry.teacher_class), and `check_kind` imports a user's dotted path only to check it names a class.
"""
import dataclasses
import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from data.targets import LogprobEncoding

DEFAULT_INSTRUCTION = "Write a one-sentence caption for a simple picture."


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


DTYPES = tuple(d.value for d in Dtype)


class PromptFormat(str, Enum):
    """Where a language teacher reads a caption (docs/teachers.md, "In-format scoring")."""
    auto = "auto"  # chat when the tokenizer has a chat template, else prefix
    chat = "chat"  # the assistant turn of the tokenizer's own chat template, after `instruction`
    prefix = "prefix"  # after bos + the `prefix` text (a base model); an empty prefix: the caption as a bare document


TEACHER_KINDS: dict[str, type] = {}  # names registered at run time (register_teacher)
# The kinds shipped here, as dotted paths imported on first use, so `import teachers.registry` stays light.
BUILTIN_KINDS = {
    "hf_causal_lm": "teachers.language:HFCausalLMTeacher",
    "hf_vlm": "teachers.vlm:HFVLMTeacher",
    "hf_vision": "teachers.vision:HFVisionTeacher",
    "efficientnet_lite0": "teachers.efficientnet:EfficientNetLite0Teacher",
}


@dataclass
class AdaptConfig:
    """Teacher correction (teachers/adapt.py, docs/teachers.md): LoRA adapters fitted on the train captions,
    cross-fitted over folds, before the teacher is collected from."""
    # K >= 2: a train row is scored by the adapter fitted without its fold
    folds: int = field(default=2, metadata={"range": ">= 2"})
    rank: int = field(default=8, metadata={"range": ">= 1"})  # LoRA rank
    alpha: float = field(default=16.0, metadata={"range": "> 0"})  # LoRA scale numerator (scale = alpha / rank)
    dropout: float = field(default=0.0, metadata={"range": "[0, 1)"})  # LoRA dropout
    # the linear modules that get adapters (every attention and MLP projection of a Llama-style block)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    # LoRA on the top N decoder layers only (null: every layer)
    layers: int | None = field(default=4, metadata={"range": ">= 1"})
    lr: float = field(default=2.0e-3, metadata={"range": "> 0"})  # AdamW learning rate (constant)
    batch_size: int = field(default=8, metadata={"range": ">= 1"})  # train captions per step
    max_steps: int = field(default=30, metadata={"range": ">= 1"})  # per fold
    eval_every: int = field(default=10, metadata={"range": ">= 1"})  # steps between val evaluations (early stopping)
    # evaluations without a better val perplexity before a fold stops
    patience: int = field(default=2, metadata={"range": ">= 1"})
    # val rows (the first, in shard order) of the early-stopping perplexity
    val_rows: int = field(default=64, metadata={"range": ">= 1"})
    seed: int = field(default=0, metadata={"range": ">= 0"})  # adapter init and batch order (fold k uses seed + k)
    # grafted teacher: the name of a vision teacher in teachers.vision whose stored features a projector turns
    # into image tokens before the caption (LLaVA's recipe; docs/teachers.md); null: text-only correction
    vision: str | None = None
    # grafted teacher: image tokens the projector makes from the vision teacher's features (its patch groups)
    image_tokens: int = field(default=4, metadata={"range": ">= 1"})


ADAPT_FIELDS = tuple(f.name for f in dataclasses.fields(AdaptConfig))
GRAFT_FIELDS = ("vision", "image_tokens")  # a text-only correction (vision: null) leaves them out of its cache key


def adapt_settings(adapt: AdaptConfig) -> dict:
    """The settings that make a correction (its cache key, adapters.json): without the graft's keys when it has no
    vision teacher, so a text-only correction keeps the key and the record it had before grafting existed."""
    out = dataclasses.asdict(adapt)
    return out if adapt.vision is not None else {k: v for k, v in out.items() if k not in GRAFT_FIELDS}


@dataclass
class TeacherConfig:
    """One teacher; also the `teachers:` entries of the run config schema (distill/config/schema.py)."""
    name: str  # unique, used as a key everywhere
    kind: str  # hf_causal_lm | hf_vlm | hf_vision | efficientnet_lite0 | package.module:Class (docs/teachers.md)
    source: str = ""  # local folder | hub id | "pkg:<python_package>" | "tiny-random:<arch>"
    gguf_file: str | None = None  # GGUF file inside source; converted to safetensors once, in cache_dir
    # language: log-probs kept per token (plus the tail mass)
    top_k: int = field(default=64, metadata={"range": ">= 1"})
    image_size: int = field(default=224, metadata={"range": ">= 1"})  # vision input resolution
    dtype: Dtype = Dtype.float32  # teacher forward dtype
    device: str = "auto"  # auto | cpu | cuda | cuda:N; auto: cuda when available, else cpu (at load time)
    trust_remote_code: bool = False  # run code shipped with a hub model; logged as a warning when set
    revision: str | None = None  # hub revision (branch, tag or commit) to pin
    # language: captions are truncated to this many tokens (BOS included)
    max_tokens: int = field(default=64, metadata={"range": ">= 2"})
    # language: temperatures whose tempered tail is stored, making the KD exact at them (docs/losses.md)
    tail_temperatures: list[float] = field(default_factory=list)
    logprob_encoding: LogprobEncoding = LogprobEncoding.q8_sorted  # language: top-k storage (docs/collection.md)
    prompt_format: PromptFormat = PromptFormat.auto  # language: auto | chat | prefix (docs/teachers.md)
    instruction: str = DEFAULT_INSTRUCTION  # language, chat format: the user turn before the caption
    prefix: str = ""  # language, prefix format: text between bos and the caption (end it with a space or newline)
    # language: correct the teacher on the train captions before collecting (null: off; {} : the defaults)
    adapt: AdaptConfig | None = None
    adapters: str | None = None  # language: a folder of fitted adapters (set by the adapt stage, or given)
    # The weights digest a run expects; training refuses shards made by other weights.
    weights_digest: str | None = None
    # Settings of a teacher kind beyond these keys, read by its class (docs/teachers.md).
    options: dict[str, Any] = field(default_factory=dict)


FIELDS = tuple(f.name for f in dataclasses.fields(TeacherConfig))


def known_kinds() -> list[str]:
    return sorted(set(TEACHER_KINDS) | set(BUILTIN_KINDS))


def check_kind(kind: str) -> None:
    """A built-in or registered name passes as is (no import); a dotted path must import to a class."""
    if kind not in TEACHER_KINDS and kind not in BUILTIN_KINDS:
        kind_class(kind)


def kind_class(kind: str) -> type:
    """The class of a kind: a registered name, a built-in name or a dotted path `package.module:Class` (its
    teacher contract is checked by teachers.registry.teacher_class)."""
    if kind in TEACHER_KINDS:
        return TEACHER_KINDS[kind]
    path = BUILTIN_KINDS.get(kind, kind)
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {known_kinds()} or a dotted path "
                         "'package.module:Class'")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"teacher kind {kind!r}: cannot import module {module!r} ({err})") from None
    except AttributeError:
        raise ValueError(f"teacher kind {kind!r}: module {module!r} has no attribute {attr!r}") from None
    if not isinstance(cls, type):
        raise ValueError(f"teacher kind {kind!r}: {path} is a {type(cls).__name__}, not a class")
    return cls

"""The typed schema of a run's configuration: the dataclasses that configs/*.yaml merge onto, and the enums
of every choice (distill/config/load.py loads and checks them; docs/config.md is generated from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from data.images import RESAMPLE
from data.sources import SOURCES
from data.teacher_config import TeacherConfig


def ranged(default, spec: str):
    """A field with a value range: ">= 1", "> 0", "[0, 1)" ... (checked at config load, listed in docs/config.md)."""
    return field(default=default, metadata={"range": spec})


class Runner(str, Enum):
    local = "local"
    dask = "dask"


# Every field that names a choice is an enum (or is checked in `_check`). Where the registry lives in a
# module that imports torch, the names are listed here and tests/test_config.py checks them against it
# (distill.losses.language.DIVERGENCES, distill.losses.balance.BALANCERS, data.standardize.MODES).
SourceKind = Enum("SourceKind", {kind: kind for kind in SOURCES}, type=str)  # data.sources.SOURCES
Resample = Enum("Resample", {name: name for name in RESAMPLE}, type=str)  # data.images.RESAMPLE


class Compression(str, Enum):
    zstd = "zstd"
    lz4 = "lz4"
    none = "none"


class KDKind(str, Enum):
    forward_kl = "forward_kl"  # KL(teacher || student)
    reverse_kl = "reverse_kl"  # KL(student || teacher)
    jsd = "jsd"


class KDGate(str, Enum):
    none = "none"  # the KD at every position
    entropy = "entropy"  # the KD only where the teacher's entropy is <= loss.kd_gate_nats (selective KD)


class Standardize(str, Enum):
    phis = "phis"
    zscore = "zscore"


@dataclass
class TrackingConfig:
    """Where runs are logged."""
    # MLflow URI. null: $MLFLOW_TRACKING_URI if set, else a sqlite store in the project folder.
    uri: str | None = None
    experiment: str = "mmtp-distill"  # MLflow experiment name
    # name of a pipeline's parent run (a stage run on its own: <name>-<stage>); null: <output folder>-<kd|ce>-<id>
    run_name: str | None = None
    registered_model: str | None = None  # Model Registry name of the evaluated student; null: the experiment name
    # A new version gets the alias `champion` when it beats the baseline on this metric (`candidate` always).
    champion_metric: str = "eval/agreement/main"


@dataclass
class SourceConfig:
    """One raw data source. Unset (null) keys take the adapter's default; see data/sources.py."""
    kind: SourceKind = SourceKind.digits  # the adapter (data/sources.py)
    n: int | None = ranged(None, ">= 1")  # scenes: how many to draw
    limit: int | None = ranged(None, ">= 1")  # keep the first `limit` samples
    seed: int | None = ranged(None, ">= 0")
    image_size: int | None = ranged(None, ">= 1")  # default: data.image_size
    resample: Resample | None = None  # digits: the resize filter
    max_noise: int | None = ranged(None, ">= 0")  # scenes: background noise amplitude
    path: str | None = None  # hf_disk: a save_to_disk folder
    data_files: str | None = None  # parquet: file or glob
    data_dir: str | None = None  # imagefolder root
    root: str | None = None  # fashion_mnist data folder
    split: str | None = None
    name: str | None = None  # id prefix for HF sources
    image_column: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    caption_template: str | None = None  # e.g. "a photo of a {label_name}."


@dataclass
class DataConfig:
    """Raw data: the sources, and the rules that turn them into samples shards."""
    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    image_size: int = ranged(56, ">= 1")  # stored PNG side in pixels
    shard_rows: int = ranged(256, ">= 1")  # rows per shard; a shard is the unit of collection work
    val_fraction: float = ranged(0.1, "[0, 1)")  # splits are assigned by a hash of the sample id, so they never move
    test_fraction: float = ranged(0.1, "[0, 1)")
    max_caption_chars: int = ranged(512, ">= 1")  # longer captions are cut at a word boundary and counted
    max_bad_fraction: float = ranged(0.01, "[0, 1]")  # abort when more rows than this are skipped as bad


@dataclass
class TeachersConfig:
    """The frozen teachers: at most one causal LM, any number of vision models."""
    language: TeacherConfig | None = None  # null: no language targets
    vision: list[TeacherConfig] = field(default_factory=list)


@dataclass
class CollectConfig:
    """The collection stage (`mmtp collect`, flow collect-soft-targets)."""
    runner: Runner = Runner.local  # local: Prefect's thread pool; dask: a Dask cluster (docs/scaling.md)
    dask_address: str | None = None  # an existing cluster; null starts a LocalCluster
    dask_workers: int = ranged(2, ">= 1")  # LocalCluster size
    batch_size: int = ranged(32, ">= 1")  # teacher forward batch
    retries: int = ranged(1, ">= 0")  # Prefect retries of a failed shard task
    compression: Compression = Compression.zstd  # Arrow IPC buffer compression of target shards
    # decode and resize the next image batch in a thread during the teacher's forward; null: only when a core is
    # spare or the teacher is on a GPU (on a CPU the forward fills, the thread contends: docs/collection.md)
    prefetch: bool | None = None
    progress: bool = True  # tqdm bars


class Vocab(str, Enum):
    teacher = "teacher"  # the language teacher's vocabulary as it is
    trimmed = "trimmed"  # the teacher tokens of the training captions + specials + unknown (data/vocab.py)


@dataclass
class StudentConfig:
    """The CogViT MMTP student (docs/student.md)."""
    preset: str = "tiny"  # configs/student/<preset>.yaml
    # null: the language teacher's; otherwise must equal it (student.vocab=teacher)
    vocab_size: int | None = ranged(None, ">= 1")
    vocab: Vocab = Vocab.teacher  # teacher | trimmed (docs/student.md, "Vocabulary and tokenizer")
    # null: the language teacher's | captions: a byte-level BPE trained on the training captions | a local tokenizer
    # folder; the teacher targets move to its tokens (docs/student.md, "Vocabulary and tokenizer")
    tokenizer: str | None = None
    tokenizer_vocab_size: int = ranged(1024, ">= 261")  # student.tokenizer=captions: the BPE's vocabulary size (>= 261)
    # multi-token-prediction modules: the student also predicts tokens t+2 .. t+1+depth
    mtp_depth: int = ranged(1, ">= 0")
    image_size: int = ranged(56, ">= 1")  # the student's input side in pixels (a multiple of patch_size * 2)
    # masked-image distillation: fraction of patches replaced by the mask token
    mask_ratio: float = ranged(0.0, "[0, 1)")
    contrastive_dim: int = ranged(128, ">= 1")  # image-text embedding width, when a stage has the contrastive term
    overrides: dict[str, Any] = field(default_factory=dict)  # extra CogViTMTPConfig keywords


class Balance(str, Enum):
    static = "static"
    ema = "ema"
    uncertainty = "uncertainty"
    gradnorm = "gradnorm"


@dataclass
class LossConfig:
    """The dual-teacher objective and its balancing (docs/losses.md)."""
    kd_kind: KDKind = KDKind.forward_kl  # forward_kl = KL(teacher||student) | reverse_kl | jsd
    # the KD on rows the student generated (on-policy rows, data/mix.py); null: kd_kind
    generated_kd_kind: KDKind | None = None
    # null: one KD mean over every row; a number w: the offline rows' KD mean + w x the generated rows' mean, so
    # generated rows add a term instead of diluting the offline one
    generated_kd_weight: float | None = ranged(None, ">= 0")
    # softens teacher and student alike (the teacher tail at T != 1: docs/losses.md)
    temperature: float = ranged(1.0, "> 0")
    ce_weight: float = ranged(0.5, "[0, 1]")  # language term = ce_weight * CE + (1 - ce_weight) * KD, per depth
    # of the ground-truth CE (main head and MTP depths), in [0, 1); 0: plain CE
    label_smoothing: float = ranged(0.0, "[0, 1)")
    # selective KD: none | entropy (each position's KD kept only where the teacher's entropy is <= kd_gate_nats)
    kd_gate: KDGate = KDGate.none
    # kd_gate=entropy: the threshold, in nats, on the teacher's top-k + tail entropy
    kd_gate_nats: float = ranged(2.0, ">= 0")
    # student.tokenizer: weight of ULD (unaligned tokens) in the KD (docs/losses.md)
    uld_weight: float = ranged(1.0, ">= 0")
    mtp_weight: float = ranged(0.5, ">= 0")  # weight of each MTP depth's term relative to the main head
    # > 0: the language loss from the heads' hidden states, this many positions' full-vocabulary logits at a
    # time (distill/losses/chunked.py; docs/losses.md, "Chunked head"; configs/default.yaml: 32); 0: all dense at once
    chunk_size: int = ranged(0, ">= 0")
    # the drafter term: the captions' first 1..N tokens prompt the student's greedy captions it learns from
    drafter_prompt_tokens: int = ranged(3, ">= 1")
    language: bool = True  # false: no language term at all (vision-only)
    vision: bool = True  # false: ignore the vision teachers (a CE-only baseline sets this and ce_weight=1)
    contrastive: bool = True  # false: drop the contrastive term from every stage (the CE-only baseline)
    standardize: Standardize = Standardize.phis  # phis | zscore: how teacher features are standardised
    # Weight of a masked patch relative to a visible one in the vision loss (masked-image distillation).
    masked_patch_weight: float = ranged(3.0, ">= 0")
    balance: Balance = Balance.gradnorm  # how the vision and language terms are weighted against each other
    gradnorm_alpha: float = ranged(0.0, ">= 0")  # gradnorm: 0 equalises the terms' gradient norms on the vision tower
    gradnorm_lr: float = ranged(0.2, "(0, 1]")  # gradnorm: step of the log-weights per optimizer step, in (0, 1]
    static_weights: dict[str, float] = field(default_factory=dict)  # static: weight per term (default 1)


class Term(str, Enum):
    """A loss term a training stage can switch on."""
    language = "language"  # CE + sparse KD on the main head and every MTP depth (clean image)
    vision = "vision"  # one term per vision teacher: masked-image feature distillation
    contrastive = "contrastive"  # SigLIP sigmoid loss: image summary token vs pooled caption embedding
    drafter = "drafter"  # MTP modules learn the frozen main head's greedy tokens (faster speculative decoding)


class Part(str, Enum):
    """A parameter group of the student that a training stage can train (the rest is frozen)."""
    all = "all"
    vision = "vision"  # the ViT tower (patch embedding, blocks, mask and summary tokens)
    heads = "heads"  # the teachers' adaptor heads
    merger = "merger"  # the 2x2 patch merger into the LM width
    decoder = "decoder"  # the decoder LM: embedding (tied head), blocks, final norm, <|image|> token
    mtp = "mtp"  # the MTP modules
    contrastive = "contrastive"  # the contrastive projections, scale and bias


@dataclass
class StageConfig:
    """One stage of the training recipe (docs/training.md). Stages run in list order, each with its own
    optimizer, LR schedule, checkpoints and MLflow child run; a resume continues the unfinished stage."""
    name: str = "joint"  # unique in the recipe: names the MLflow child run and the stage's export folder
    steps: int = ranged(100, ">= 1")  # optimizer steps of this stage
    # the loss terms of this stage, less those loss.language/vision/contrastive switch off
    losses: list[Term] = field(default_factory=lambda: [Term.language, Term.vision])
    # the parameter groups trained; the rest is frozen, and so is any part that no active term reaches
    trainable: list[Part] = field(default_factory=lambda: [Part.all])
    lr: float | None = ranged(None, "> 0")  # null: train.lr
    micro_batch_size: int | None = ranged(None, ">= 1")  # null: train.micro_batch_size
    warmup_steps: int | None = ranged(None, ">= 0")  # null: train.warmup_steps


class Precision(str, Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class TrainConfig:
    """The DeepSpeed trainer (`mmtp train`, flow distill-student; docs/training.md)."""
    zero_stage: int = ranged(2, "[0, 3]")  # DeepSpeed ZeRO stage 0-3
    nproc: int = ranged(1, ">= 1")  # >1 launches that many processes with torchrun (gloo on CPU, nccl on GPU)
    hostfile: str | None = None  # multi-node: passed to the deepspeed launcher
    resume: bool = False  # continue from the latest complete checkpoint in output_dir/checkpoints
    precision: Precision = Precision.auto  # bf16: DeepSpeed bf16 with fp32 master weights
    # Steps of the one `joint` stage when `train.stages` is empty (null: 100); with stages, a cap on the
    # recipe's total steps (the stage that reaches it is cut short, later ones dropped).
    max_steps: int | None = ranged(None, ">= 1")
    # The recipe: a list of stages; empty = one stage `joint` of max_steps with the language and vision terms.
    stages: list[StageConfig] = field(default_factory=list)
    micro_batch_size: int = ranged(8, ">= 1")  # per process
    grad_accum: int = ranged(1, ">= 1")
    lr: float = ranged(1e-3, "> 0")
    weight_decay: float = ranged(0.01, ">= 0")
    warmup_steps: int = ranged(10, ">= 0")  # linear warm-up, then cosine decay
    min_lr_ratio: float = ranged(0.1, "[0, 1]")  # cosine decays to lr * min_lr_ratio
    grad_clip: float = ranged(1.0, ">= 0")  # global gradient-norm clip
    log_every: int = ranged(1, ">= 1")  # steps between MLflow metric logs
    checkpoint_every: int = ranged(50, ">= 1")  # steps; the last step is always checkpointed
    keep_checkpoints: int = ranged(2, ">= 1")  # older scheduled ones are deleted (a stop's extra one goes at the next)
    offload_optimizer: bool = False  # ZeRO optimizer state on the CPU (stage >= 1)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass
    max_bad_steps: int = ranged(5, ">= 1")  # abort after this many consecutive non-finite losses
    progress: bool = True  # tqdm bar
    init_from: str | None = None  # a student folder the first stage starts from (null: a fresh student)
    # Other shard folders (each with samples/ and targets/<language teacher>/, e.g. on-policy generations) mixed
    # into every training window at `mix_fraction` of its rows; needs loss.vision=false (docs/onpolicy.md).
    mix_shards: list[str] = field(default_factory=list)
    mix_fraction: float = ranged(0.5, "[0, 1)")


@dataclass
class EvalConfig:
    """The evaluation stage (`mmtp evaluate`, flow evaluate-student; docs/evaluation.md)."""
    student: str | None = None  # a student folder or an MLflow run id; null: output_dir/student
    baseline: str | None = None  # the same, for the run to compare with (e.g. the CE-only baseline)
    # auto (cuda when available) | cpu | cuda | cuda:N; cuda: bf16 autocast for a bf16-trained student
    device: str = "auto"
    batch_size: int = ranged(32, ">= 1")  # evaluation forward batch
    probe: bool = True  # linear probes (encode the train split once more)
    mtp_prompts: int = ranged(16, ">= 0")  # test captions used for the speculative-decoding figures (0: none)
    mtp_prompt_tokens: int = ranged(3, ">= 1")  # caption tokens given as the prompt; the rest is generated
    mtp_new_tokens: int = ranged(24, ">= 1")


@dataclass
class OnPolicyConfig:
    """On-policy distillation rounds (`mmtp onpolicy`, flow onpolicy-distill; docs/onpolicy.md). Round r: the
    student continues caption prefixes of train rows, the language teacher scores the continuations, and training
    resumes on a mix of those and the offline shards."""
    rounds: int = ranged(2, ">= 1")
    prompts: int = ranged(256, ">= 1")  # train rows whose caption prefix the student continues, per round
    prompt_tokens: int = ranged(2, ">= 1")  # caption tokens of the prompt ([bos] + the first word's token)
    max_new_tokens: int = ranged(24, ">= 1")
    temperature: float = ranged(1.0, "> 0")  # sampling temperature of the student's continuations
    # lambda: the on-policy share of every training window (0: offline shards only, no teacher)
    mix: float = ranged(0.5, "[0, 1)")
    steps: int = ranged(40, ">= 1")  # optimizer steps per round
    lr: float | None = ranged(None, "> 0")  # null: train.lr
    # The divergence on the student's samples (GKD: JSD or reverse KL). Near agreement JSD is about KL/4,
    # so next to loss.ce_weight it is outweighed by CE (measured: docs/onpolicy.md)
    kd_kind: KDKind = KDKind.jsd
    # The divergence on the rounds' offline rows; null: kd_kind (every row alike)
    offline_kd_kind: KDKind | None = None
    # null: one KD mean over the window's rows (the continuations' share of it is `mix`); a number w: the offline
    # rows' KD mean + w x the continuations' KD mean (loss.generated_kd_weight)
    kd_weight: float | None = ranged(None, ">= 0")
    # null: loss.ce_weight. CE covers the offline rows alone: on-policy rows are the student's own tokens
    ce_weight: float | None = ranged(None, "[0, 1]")
    # the parts the rounds train; the vision tower and its adaptor heads stay frozen (the rounds have no vision term)
    trainable: list[Part] = field(default_factory=lambda: [Part.merger, Part.decoder, Part.mtp])
    # test prompts for eval/onpolicy_kl, the teacher's KL on the student's generations
    eval_prompts: int = ranged(64, ">= 0")


@dataclass
class Config:
    output_dir: str = "outputs/run"  # root of every output of a run
    # Where samples/ and targets/ live; null: output_dir. Lets runs share shards (e.g. a baseline).
    shards_dir: str | None = None
    seed: int = ranged(0, ">= 0")  # model init, data order and masking
    # Converted teacher weights and tiny random teachers; shared by runs, outside the repo.
    cache_dir: str = "~/.cache/mmtp-distill"
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)

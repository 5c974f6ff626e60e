"""Configuration of the CogViT-style multimodal multi-token-prediction (MMTP) student."""

from dataclasses import field
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "student"

DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@strict
class CogViTMTPConfig(PreTrainedConfig):
    r"""
    Configuration of [`CogViTMTPForDistillation`]: a CogViT vision tower, a 2x2 patch merger, a Llama-style
    decoder and `mtp_depth` DeepSeek-V3-style multi-token-prediction modules, plus one adaptor head per
    vision teacher. The plain names (`hidden_size`, `num_hidden_layers`, ...) describe the decoder LM, as in
    transformers' text models; the vision tower's names start with `vision_`.

    Args:
        num_channels (`int`, defaults to 3): channels of `pixel_values`.
        patch_size (`int`, defaults to 14): side of the square conv patch embedding (kernel = stride).
        vision_hidden_size (`int`, defaults to 192): width of the vision tower.
        vision_num_hidden_layers (`int`, defaults to 4): transformer blocks in the vision tower.
        vision_num_attention_heads (`int`, defaults to 3): heads in the vision tower; the head dim must be
            divisible by 4 (half of it is rotated by the row, half by the column).
        vision_intermediate_size (`int`, defaults to 512): SwiGLU width in the vision tower.
        vision_rope_theta (`float`, defaults to 10000.0): base of the 2D rotary embedding over (row, col).
        spatial_merge_size (`int`, defaults to 2): the merger concatenates `s x s` neighbouring patches into one
            LM token. The patch grid must be divisible by it (no padding): image sides must be multiples of
            `patch_size * spatial_merge_size`.
        mask_ratio (`float`, defaults to 0.0): fraction of patches replaced by the learned mask token in
            training mode (masked-image distillation). 0 disables random masking; an explicit `image_mask`
            passed to `forward` is always applied.
        vocab_size (`int`, defaults to 49152): vocabulary of the decoder: the language teacher's, or a trimmed
            one (`teacher_token_ids`).
        teacher_token_ids (`list[int]`, *optional*): a trimmed vocabulary: student token s is the teacher's
            token `teacher_token_ids[s]` (-1: the unknown token). Its processor encodes and decodes through it.
            `None` = the student uses the teacher's vocabulary as it is.
        teacher_vocab_size (`int`, *optional*): the teacher's vocabulary size, with `teacher_token_ids`.
        hidden_size (`int`, defaults to 256): width of the decoder LM (and of the MTP modules).
        num_hidden_layers (`int`, defaults to 4): decoder blocks.
        num_attention_heads (`int`, defaults to 4): decoder query heads.
        num_key_value_heads (`int`, *optional*): decoder key/value heads (GQA); `None` means
            `num_attention_heads`.
        intermediate_size (`int`, defaults to 688): SwiGLU width in the decoder and MTP blocks.
        max_position_embeddings (`int`, defaults to 2048): longest sequence (image tokens + text) accepted.
            RoPE has no table; this is only a checked limit.
        rope_theta (`float`, defaults to 10000.0): base of the decoder's 1D RoPE.
        rms_norm_eps (`float`, defaults to 1e-5): epsilon of every RMSNorm (tower, decoder, MTP, QK-norm).
        initializer_range (`float`, defaults to 0.02): std of the normal weight init.
        tie_word_embeddings (`bool`, defaults to `True`): share the input embedding and the output head.
        image_attention (`str`, defaults to `"bidirectional"`): how the merged image tokens, which come first
            in the sequence, attend among themselves in the decoder: `"bidirectional"` (prefix-LM) or
            `"causal"`. Text tokens are always causal (they see all image tokens and earlier text tokens).
            MTP blocks are always causal (their token inputs are shifted ahead, so a bidirectional image
            prefix would leak caption targets).
        pad_token_id (`int`, *optional*): padding id of the tokenizer (padding is also given by
            `attention_mask`).
        bos_token_id (`int`, *optional*): begin-of-sequence id of the tokenizer.
        eos_token_id (`int`, *optional*): default stop token of `greedy_generate`.
        mtp_depth (`int`, defaults to 1): number D of sequential MTP modules; depth k (1-based) at position i
            predicts the token at i+1+k.
        mtp_loss_weight (`float`, defaults to 0.3): lambda in `loss = lm_loss + lambda * mean(mtp_losses)`.
        draft_vocab (`list[int]`, *optional*): token ids the MTP drafts of speculative decoding choose from
            (e.g. the tokens of the training captions): a draft costs a slice of the output head instead of
            the whole head. Verification always uses the full head, so the output equals greedy decoding.
            `None` = the full vocab.
        draft_top_k (`int`, defaults to 1): candidates per MTP depth in speculative decoding: the top-1 drafts
            form a chain and the next `draft_top_k - 1` of each depth are its siblings, verified in the same
            forward with a tree attention mask. 1 = a chain of drafts only.
        teachers (`dict`, defaults to `{}`): `{teacher_name: {"summary_dim": int, "feature_dim": int,
            "grid": [h, w]}}`; one adaptor head per entry.
        contrastive_dim (`int`, defaults to 0): width of the image-text embedding space of the SigLIP-style
            contrastive head (the `image` summary token and the pooled caption); 0 = no contrastive head.
        adaptor_hidden_size (`int`, *optional*): hidden width of the adaptor MLPs; `None` means
            `vision_hidden_size`.
        decoder_init_path (`str`, *optional*): folder of a Llama-family causal LM (config.json + safetensors)
            that `build_student` loads into the decoder. Its dims must match this config.
        use_lora (`bool`, defaults to `False`): inject PEFT LoRA into the decoder's projections and freeze the
            rest of the decoder (embedding, norms, base weights, output head).
        lora_r (`int`, defaults to 8): LoRA rank.
        lora_alpha (`int`, defaults to 16): LoRA alpha (scale = alpha / r).
        lora_dropout (`float`, defaults to 0.0): dropout on the LoRA branch.
        lora_target_modules (`list[str]`, defaults to all attention and MLP projections): decoder module names
            that get LoRA.
    """

    model_type = "cogvit_mtp"

    # vision tower
    num_channels: int = 3
    patch_size: int = 14
    vision_hidden_size: int = 192
    vision_num_hidden_layers: int = 4
    vision_num_attention_heads: int = 3
    vision_intermediate_size: int = 512
    vision_rope_theta: int | float = 10000.0
    spatial_merge_size: int = 2
    mask_ratio: int | float = 0.0
    # decoder LM
    vocab_size: int = 49152
    teacher_token_ids: list | None = None
    teacher_vocab_size: int | None = None
    hidden_size: int = 256
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    intermediate_size: int = 688
    max_position_embeddings: int = 2048
    rope_theta: int | float = 10000.0
    rms_norm_eps: int | float = 1e-5
    initializer_range: int | float = 0.02
    tie_word_embeddings: bool = True
    image_attention: str = "bidirectional"
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # multi-token prediction
    mtp_depth: int = 1
    mtp_loss_weight: int | float = 0.3
    draft_vocab: list | None = None
    draft_top_k: int = 1
    # vision teachers
    teachers: dict = field(default_factory=dict)
    adaptor_hidden_size: int | None = None
    contrastive_dim: int = 0
    # pretrained decoder and LoRA
    decoder_init_path: str | None = None
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: int | float = 0.0
    lora_target_modules: list | tuple = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.adaptor_hidden_size is None:
            self.adaptor_hidden_size = self.vision_hidden_size
        self.teachers = {str(k): _check_teacher(k, v) for k, v in dict(self.teachers or {}).items()}
        self.lora_target_modules = list(self.lora_target_modules)
        super().__post_init__(**kwargs)
        self._check()

    def _check(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"CogViTMTPConfig: {msg}")

        need(self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_attention_heads={self.num_attention_heads} is not divisible by "
             f"num_key_value_heads={self.num_key_value_heads}")
        need((self.hidden_size // self.num_attention_heads) % 2 == 0, "decoder head dim must be even for RoPE")
        need(self.vision_hidden_size % self.vision_num_attention_heads == 0,
             f"vision_hidden_size={self.vision_hidden_size} is not divisible by "
             f"vision_num_attention_heads={self.vision_num_attention_heads}")
        need((self.vision_hidden_size // self.vision_num_attention_heads) % 4 == 0,
             f"vision head dim {self.vision_hidden_size // self.vision_num_attention_heads} must be divisible "
             "by 4 for 2D RoPE")
        need(self.patch_size >= 1, f"patch_size={self.patch_size} must be >= 1")
        need(self.spatial_merge_size >= 1, f"spatial_merge_size={self.spatial_merge_size} must be >= 1")
        need(0.0 <= self.mask_ratio < 1.0, f"mask_ratio={self.mask_ratio} must be in [0, 1)")
        need(self.mtp_depth >= 0, f"mtp_depth={self.mtp_depth} must be >= 0")
        need(self.image_attention in ("bidirectional", "causal"),
             f"image_attention={self.image_attention!r} must be 'bidirectional' or 'causal'")
        need(self.contrastive_dim >= 0, f"contrastive_dim={self.contrastive_dim} must be >= 0")
        need(self.vocab_size >= 1, f"vocab_size={self.vocab_size} must be >= 1")
        need(self.teacher_token_ids is None or (
            len(self.teacher_token_ids) == self.vocab_size and self.teacher_vocab_size is not None
            and all(-1 <= t < self.teacher_vocab_size for t in self.teacher_token_ids)),
            f"teacher_token_ids must hold vocab_size={self.vocab_size} teacher ids in [-1, teacher_vocab_size="
            f"{self.teacher_vocab_size})")
        need(self.draft_vocab is None or (len(self.draft_vocab) > 0 and all(
            isinstance(t, int) and 0 <= t < self.vocab_size for t in self.draft_vocab)),
            f"draft_vocab must be a non-empty list of token ids in [0, vocab_size={self.vocab_size})")
        need(self.draft_top_k >= 1, f"draft_top_k={self.draft_top_k} must be >= 1")

    def num_image_tokens(self, height: int, width: int) -> int:
        """Merged image tokens that an image of `height x width` pixels becomes."""
        side = self.patch_size * self.spatial_merge_size
        return (height // side) * (width // side)


def _check_teacher(name, spec) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"CogViTMTPConfig.teachers[{name!r}] must be a dict, got {type(spec).__name__}")
    missing = {"summary_dim", "feature_dim", "grid"} - set(spec)
    if missing:
        raise ValueError(f"CogViTMTPConfig.teachers[{name!r}] lacks {sorted(missing)}")
    grid = list(spec["grid"])
    if len(grid) != 2 or not all(int(g) == g and g >= 1 for g in grid):
        raise ValueError(f"CogViTMTPConfig.teachers[{name!r}]['grid'] must be [h, w] positive ints, got {grid}")
    for key in ("summary_dim", "feature_dim"):
        if int(spec[key]) != spec[key] or spec[key] < 1:
            raise ValueError(f"CogViTMTPConfig.teachers[{name!r}][{key!r}] must be a positive int, got {spec[key]}")
    return {"summary_dim": int(spec["summary_dim"]), "feature_dim": int(spec["feature_dim"]),
            "grid": [int(g) for g in grid]}


def load_preset(name: str, **overrides) -> CogViTMTPConfig:
    """Read `configs/student/<name>.yaml` (CogViTMTPConfig kwargs) and apply `overrides` on top."""
    import yaml

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown student preset {name!r}: no file {path} (known: {known})")
    kwargs = yaml.safe_load(path.read_text()) or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"student preset {path} must hold a mapping of CogViTMTPConfig kwargs")
    known_fields = set(CogViTMTPConfig.__dataclass_fields__)
    unknown = sorted(k for k in {**kwargs, **overrides} if k not in known_fields)
    if unknown:
        raise ValueError(f"unknown CogViTMTPConfig key(s) {unknown} (preset {path})")
    kwargs.update(overrides)
    return CogViTMTPConfig(**kwargs)

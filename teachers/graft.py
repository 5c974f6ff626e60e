"""The grafted teacher: the language teacher plus a projector over a vision teacher's stored features, plus LoRA
(LLaVA's recipe, for runs with no VLM on disk; docs/teachers.md, "Grafted teacher").

The projector (LLaVA-1.5's two-layer MLP with GELU) reads one vision teacher's rows from its target shards (no
second vision forward): its patch features pooled over the patch grid into `image_tokens` groups, each joined
with the summary vector, standardised with the statistics the vision manifest stores, and mapped to
`image_tokens` embeddings of the LM's width. They run between the teacher's cached prompt and the caption, so
the prompt is still shared by every row and the stored positions are still the caption's and its end.

It is fitted as the text-only correction is (teachers/adapt.py): train rows only, K cross-fitted folds, each
fold's LoRA and projector trained together and early-stopped on the val split's exact perplexity, cached under
cache_dir/adapters/<key> with the vision teacher's identity in the key. A fold's folder holds the peft adapter
and `projector.safetensors`; adapters.json records both sha256 and `graft` (the vision teacher's name, weights
digest and identity digest, the projector's shape).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from data.identity import file_sha256
from data.shards import MANIFEST, ShardError, digest, load_manifest, read_shard
from data.targets import decode_vision

from .adapt import (
    ADAPTER_FILE,
    INFO,
    TextFit,
    adapters_key,
    cached_fit,
    caption_token_nll,
    check_digest,
    check_rows,
    fold_of,
    lora_model,
    measure,
    read_rows,
    record,
    train_fold,
    val_rows,
)

PROJECTOR_FILE = "projector.safetensors"


class GraftMismatchError(ShardError):
    """The vision teacher's shards are not those the graft was fitted on."""


def token_grid(tokens: int) -> tuple[int, int]:
    """(rows, columns) of the image tokens over the patch grid: the most nearly square factorisation."""
    rows = max(r for r in range(1, math.isqrt(tokens) + 1) if tokens % r == 0)
    return rows, tokens // rows


def pool_patches(features: torch.Tensor, grid, tokens: int) -> torch.Tensor:
    """Patch features [B, P, D] (raster order over `grid`) averaged into `tokens` spatial groups [B, tokens, D]."""
    b, p, d = features.shape
    h, w = grid
    x = features.float()
    if h * w != p:  # not a grid: contiguous groups in stored order
        return nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), tokens).transpose(1, 2)
    x = x.transpose(1, 2).reshape(b, d, h, w)
    return nn.functional.adaptive_avg_pool2d(x, token_grid(tokens)).flatten(2).transpose(1, 2)


class Projector(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear, from one image token's input (a pooled patch group joined
    with the summary, each z-scored with the vision teacher's feature statistics) to the LM's hidden size."""

    def __init__(self, summary_dim: int, feature_dim: int, grid, image_tokens: int, hidden: int):
        super().__init__()
        self.shape = {"summary_dim": summary_dim, "feature_dim": feature_dim, "grid": list(grid),
                      "image_tokens": image_tokens, "hidden": hidden}
        for part, dim in (("summary", summary_dim), ("features", feature_dim)):
            self.register_buffer(f"{part}_mean", torch.zeros(dim))
            self.register_buffer(f"{part}_std", torch.ones(dim))
        self.fc1 = nn.Linear(feature_dim + summary_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, hidden)

    @classmethod
    def for_vision(cls, manifest: dict, image_tokens: int, hidden: int) -> Projector:
        """A projector on the rows of the vision teacher whose target manifest is `manifest`, standardising with
        the statistics its collection stored."""
        ident, stats = manifest["producer"], manifest["feature_stats"]
        proj = cls(ident["summary_dim"], ident["feature_dim"], manifest["grid"], image_tokens, hidden)
        for part in ("summary", "features"):
            getattr(proj, f"{part}_mean").copy_(torch.tensor(stats[f"{part}_mean"]))
            getattr(proj, f"{part}_std").copy_(torch.tensor(stats[f"{part}_std"]).clamp_min(1e-6))
        return proj

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return pool_patches(features, self.shape["grid"], self.shape["image_tokens"])

    def forward(self, summary: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """summary [B, Ds], pooled patch groups [B, T, Df] -> image token embeddings [B, T, hidden]."""
        s = (summary.float() - self.summary_mean) / self.summary_std
        f = (pooled.float() - self.features_mean) / self.features_std
        x = torch.cat([f, s[:, None].expand(-1, f.shape[1], -1)], -1)
        return self.fc2(self.act(self.fc1(x)))


class GraftFit(TextFit):
    """One fold of a graft: LoRA and the projector. Items: (token row, summary [Ds], pooled features [T, Df])."""

    def __init__(self, teacher, model, projector: Projector):
        super().__init__(teacher, model)
        self.projector = projector

    def modules(self) -> list[nn.Module]:
        return [self.model, self.projector]

    def token_nll(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        summary = torch.stack([i[1] for i in items]).to(self.teacher.device)
        pooled = torch.stack([i[2] for i in items]).to(self.teacher.device)
        return caption_token_nll(self.model, self.teacher, [i[0] for i in items], self.projector(summary, pooled))

    def state(self) -> dict[str, torch.Tensor]:
        own = {f"projector.{k}": v.detach().clone() for k, v in self.projector.state_dict().items()}
        return {**super().state(), **own}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        super().load({k: v for k, v in state.items() if not k.startswith("projector.")})
        self.projector.load_state_dict({k.removeprefix("projector."): v for k, v in state.items()
                                        if k.startswith("projector.")})


def vision_manifest(folder: str | Path, name: str) -> dict:
    """The finished target manifest of vision teacher `name`; ShardError naming the fix when there is none."""
    try:
        manifest = load_manifest(folder)
    except ShardError as err:
        raise ShardError(f"{Path(folder) / MANIFEST}: the grafted teacher reads vision teacher {name!r}'s stored "
                         f"features, and its target shards are missing or unfinished ({err}); `mmtp collect` "
                         "collects the vision teachers first") from None
    if manifest.get("modality") != "vision":
        raise ShardError(f"{Path(folder) / MANIFEST}: teacher {name!r} did not write vision rows")
    return manifest


def vision_record(manifest: dict, name: str) -> dict:
    """What a graft records of the vision teacher it reads: name, weights digest, and the digest of its whole
    identity (image size, dtype, ...: everything that changes its features)."""
    return {"vision": name, "vision_weights_digest": manifest["producer"].get("weights_digest"),
            "vision_identity_digest": digest(manifest["producer"])}


def check_vision_targets(graft: dict, folder: str | Path) -> dict:
    """The vision teacher's manifest, when its shards come from the teacher the graft was fitted on; else
    GraftMismatchError naming both digests."""
    manifest = vision_manifest(folder, graft["vision"])
    got = vision_record(manifest, graft["vision"])
    for key in ("vision_weights_digest", "vision_identity_digest"):
        if got[key] != graft[key]:
            raise GraftMismatchError(
                f"{Path(folder) / MANIFEST}: vision teacher {graft['vision']!r} has {key.removeprefix('vision_')} "
                f"{str(got[key])[:12]}, but the grafted teacher was fitted on {str(graft[key])[:12]}; fit the graft "
                "again (`mmtp adapt`, or drop teachers.language.adapters) or collect the vision teacher it was "
                "fitted on")
    return manifest


def read_graft_rows(samples_dir, vision_dir, splits: set[str], manifest: dict, tokens: int) -> dict[str, list]:
    """read_rows of `splits`, each with the vision teacher's stored `summary` and its patch features pooled into
    `tokens` groups (`pooled`), read from the target shard that mirrors the row's samples shard."""
    rows = read_rows(samples_dir, splits)
    by_id = {r["id"]: r for part in rows.values() for r in part}
    for entry in manifest["shards"]:
        table = read_shard(Path(vision_dir) / entry["file"])
        summary, features = decode_vision(table)
        pooled = pool_patches(torch.from_numpy(features.astype(np.float32)), manifest["grid"], tokens)
        for i, sample_id in enumerate(table.column("id").to_pylist()):
            if sample_id in by_id:
                by_id[sample_id].update(summary=torch.from_numpy(summary[i].astype(np.float32)), pooled=pooled[i])
    missing = [i for i, r in by_id.items() if "pooled" not in r]
    if missing:
        raise ShardError(f"{vision_dir}: no stored features for {len(missing)} samples rows (e.g. {missing[0]!r}); "
                         "re-run `mmtp collect`")
    return rows


def items(teacher, rows: list[dict]) -> list[tuple]:
    """GraftFit items of samples rows read by read_graft_rows."""
    tokens = teacher.encode([r["caption"] for r in rows])[0]
    return [(t, r["summary"], r["pooled"]) for t, r in zip(tokens, rows, strict=True)]


def fit_graft_fold(teacher, train: list, val: list, adapt, fold: int, manifest: dict, progress: bool = True,
                   positions=None) -> tuple:
    """Fold `fold`'s LoRA and projector, trained together on `train`, early-stopped on `val`; (peft model, projector,
    figures). `before` is the teacher as it is (no image, no adapter), `start` the graft before its first step."""
    model = lora_model(teacher, adapt, fold)
    hidden = model.config.get_text_config().hidden_size
    projector = Projector.for_vision(manifest, adapt.image_tokens, hidden).to(teacher.device)
    model.eval()
    base = measure(TextFit(teacher, model), [i[0] for i in val], adapt.batch_size, positions)  # LoRA B starts at 0
    figures = train_fold(GraftFit(teacher, model, projector), train, val, adapt, fold, progress, positions)
    figures = {k.replace("_before", "_start"): v for k, v in figures.items()}
    figures.update({f"val_{k}_before": v for k, v in base.items()})
    return model, projector.eval(), figures


def graft_teacher(teacher, samples_dir, vision_dir, adapt, cache_dir, progress: bool = True) -> dict:
    """Fit (or find in the cache) the K cross-fitted grafts of `teacher` on the samples' train split, reading vision
    teacher `adapt.vision`'s finished shards in `vision_dir`. Returns adapters.json's content plus `folder` and
    `cached` (True when nothing was fitted)."""
    manifest = vision_manifest(vision_dir, adapt.vision)
    vision = vision_record(manifest, adapt.vision)
    rows = read_graft_rows(samples_dir, vision_dir, {"train", "val"}, manifest, adapt.image_tokens)
    data_digest = check_rows(rows, samples_dir)
    folder = Path(cache_dir).expanduser() / "adapters" / adapters_key(teacher, data_digest, adapt, vision)

    def fit(tmp: Path) -> dict:
        picked, _, positions = val_rows(teacher, rows["val"], adapt)
        val, folds = items(teacher, picked), []
        for k in range(adapt.folds):
            train = items(teacher, [r for r in rows["train"] if fold_of(r["id"], adapt.folds) != k])
            model, projector, figures = fit_graft_fold(teacher, train, val, adapt, k, manifest, progress, positions)
            out = tmp / f"fold-{k}"
            model.save_pretrained(out)
            save_file({name: t.contiguous() for name, t in projector.state_dict().items()}, out / PROJECTOR_FILE)
            figures.update(path=out.name, digest=file_sha256(out / ADAPTER_FILE),
                           projector_digest=file_sha256(out / PROJECTOR_FILE))
            folds.append(figures)
        return {**record(teacher, adapt, data_digest, rows, folds), "graft": {**vision, "projector": projector.shape}}

    return cached_fit(folder, fit)


def graft_vision(folder: str | Path) -> str | None:
    """The vision teacher a fitted adapters folder reads (its recorded graft), or None for a text-only correction or
    a folder without adapters.json (refused when the teacher loads)."""
    path = Path(folder).expanduser() / INFO
    graft = json.loads(path.read_text()).get("graft") if path.is_file() else None
    return graft["vision"] if graft else None


def load_projectors(folder: str | Path, info: dict, device) -> dict[int, Projector]:
    """Each fold's projector of a grafted adapters folder, checked against its sha256 in adapters.json and loaded
    with safetensors (never pickle)."""
    out = {}
    for a in info["adapters"]:
        path = Path(folder) / a["path"] / PROJECTOR_FILE
        check_digest(path, a["projector_digest"], "projector")
        shape = info["graft"]["projector"]
        proj = Projector(shape["summary_dim"], shape["feature_dim"], shape["grid"], shape["image_tokens"],
                         shape["hidden"])
        proj.load_state_dict(load_file(str(path)))
        out[a["fold"]] = proj.to(device).eval().requires_grad_(False)
    return out


def image_prefix(projector: Projector, samples: list[dict], vision: str, device) -> torch.Tensor:
    """The image token embeddings [B, T, H] of samples rows that carry vision teacher `vision`'s stored row under
    `vision` (teachers/collect.py hands them over from its target shard)."""
    try:
        stored = [s["vision"][vision] for s in samples]
    except (KeyError, TypeError):
        raise ValueError(f"a grafted teacher reads vision teacher {vision!r}'s stored features: each samples row "
                         f"needs them under vision.{vision} (collection hands them over from its target "
                         "shards)") from None
    summary = torch.as_tensor(np.stack([r["summary"] for r in stored]), dtype=torch.float32, device=device)
    features = torch.as_tensor(np.stack([r["features"] for r in stored]), dtype=torch.float32, device=device)
    return projector(summary, projector.pool(features))

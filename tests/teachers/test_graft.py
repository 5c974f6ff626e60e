"""The grafted teacher (teachers/graft.py): the tiny Llama plus a projector over a vision teacher's stored features
plus LoRA, fitted on a tiny data set whose captions name the picture's colour ("a red picture."), so that only the
image tells the colour word; and, slow, the real Prefect pipeline with a grafted language teacher."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import teachers.graft as graft_mod
from data.images import decode_image
from data.quality import GroundedSplit, grounded_positions
from data.samples import build_samples
from data.shards import MANIFEST, ShardError, digest, load_manifest, read_shard
from data.targets import decode_vision
from distill.config import ConfigError, load_config
from flows.cli import main
from teachers.adapt import adapt_teacher, adapters_key, fold_of, read_rows
from teachers.collect import collect_shard, finalize_targets
from teachers.contract import Modality
from teachers.graft import GraftMismatchError, Projector, graft_teacher, pool_patches, token_grid, vision_record
from teachers.language import HFCausalLMTeacher
from teachers.registry import AdaptConfig

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
# lm_head too: the tiny random Llama's head alone cannot make any distribution sharp
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
SETTINGS = AdaptConfig(folds=2, rank=8, layers=None, lr=1e-2, batch_size=8, max_steps=200, eval_every=20, patience=5,
                       val_rows=32, target_modules=MODULES, vision="cells", image_tokens=4)


class Cells:
    """A vision teacher: the mean RGB (summary) and each 8×8 cell's mean and std RGB (patch features, a 3×3 grid)."""
    modality = Modality.vision

    def __init__(self, cfg=None, cache_dir=None, digest_="cells-v1"):
        self.digest = digest_

    def identity(self) -> dict:
        return {"name": "cells", "kind": "tests:Cells", "weights_digest": self.digest, "summary_dim": 3,
                "feature_dim": 6, "num_patches": 9, "grid": [3, 3]}

    def rows(self, samples: list[dict]) -> list[dict]:
        out = []
        for s in samples:
            x = np.asarray(decode_image(s["image"]).resize((24, 24)), dtype=np.float32) / 255
            cells = [x[i:i + 8, j:j + 8].reshape(-1, 3) for i in (0, 8, 16) for j in (0, 8, 16)]
            out.append({"summary": x.mean((0, 1)),
                        "features": np.stack([np.concatenate([c.mean(0), c.std(0)]) for c in cells])})
        return out


def collect_vision(teacher, samples: dict, root: Path, out: Path) -> Path:
    entries = [collect_shard(teacher, root / "samples" / s["file"], out, producer_digest=teacher.digest,
                             progress=False) for s in samples["shards"]]
    finalize_targets(teacher, out, samples, entries, config_digest=teacher.digest, collect_options={})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """120 noisy single-colour pictures captioned "a <colour> picture.", and the Cells teacher's target shards."""
    root = tmp_path_factory.mktemp("graft")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (root / "colours" / name).mkdir(parents=True)
        for i in range(30):
            pixels = np.clip(np.array(rgb)[None, None] + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "colours" / name / f"{i:03d}.png")
    data = {"sources": [{"kind": "imagefolder", "data_dir": str(root / "colours"),
                         "caption_template": "a {label_name} picture."}], "image_size": 16, "shard_rows": 64,
            "val_fraction": 0.2, "test_fraction": 0.1, "max_caption_chars": 512, "max_bad_fraction": 0.01}
    samples = build_samples(data, root / "samples", seed=0, progress=False)
    collect_vision(Cells(), samples, root, root / "targets" / "cells")
    return root, samples


def lm_config(llama_dir, **overrides):
    return dict(dict(name="lm", kind="hf_causal_lm", source=str(llama_dir), top_k=8), **overrides)


@pytest.fixture(scope="module")
def grafted(llama_dir, cache_dir, data, tmp_path_factory):
    """The fitted graft, with the train items each fold was fitted on."""
    root, _ = data
    teacher = HFCausalLMTeacher(lm_config(llama_dir), cache_dir)
    fits, fit = [], graft_mod.fit_graft_fold

    def spy(teacher_, train, *rest):
        fits.append([tuple(item[0]) for item in train])
        return fit(teacher_, train, *rest)

    graft_mod.fit_graft_fold = spy
    try:
        cache = tmp_path_factory.mktemp("cache")
        info = graft_teacher(teacher, root / "samples", root / "targets" / "cells", SETTINGS, cache, progress=False)
    finally:
        graft_mod.fit_graft_fold = fit
    return teacher, info, fits, cache


def stored_vision(root: Path) -> dict[str, dict]:
    out = {}
    for entry in load_manifest(root / "targets" / "cells")["shards"]:
        table = read_shard(root / "targets" / "cells" / entry["file"])
        summary, features = decode_vision(table)
        for i, sample_id in enumerate(table.column("id").to_pylist()):
            out[sample_id] = {"summary": summary[i], "features": features[i]}
    return out


def samples_with_vision(root: Path, split: str, shift: int = 0) -> list[dict]:
    """The split's rows as collection hands them to a grafted teacher; `shift` gives each row another row's features."""
    rows, vision = read_rows(root / "samples", {split})[split], stored_vision(root)
    return [{"id": r["id"], "caption": r["caption"], "grounded": r["grounded"],
             "vision": {"cells": vision[rows[(i + shift) % len(rows)]["id"]]}} for i, r in enumerate(rows)]


def grounded_perplexity(teacher, samples: list[dict]) -> float:
    split = GroundedSplit()
    for s, row in zip(samples, teacher.rows(samples), strict=True):
        split.add(-row["token_logprob"][:-1].astype(np.float64),
                  grounded_positions(row["token_ids"].tolist(), s["grounded"], teacher.tokenizer))
    return split.metrics("ppl")["ppl_grounded"]


def test_an_unknown_or_missing_vision_teacher_is_refused_at_config_load(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"'teachers.language.adapt.vision' \(lm\): 'vitt' .*\['vit', 'clip'\]"):
        load_config(TINY, ["teachers.language.adapt={vision: vitt}"])
    with pytest.raises(ConfigError, match="'lm' is not a vision teacher"):  # itself: the one possible cycle
        load_config(TINY, ["teachers.language.adapt={vision: lm}"])
    with pytest.raises(ConfigError, match="'vit' is not a vision teacher"):
        load_config(TINY, ["teachers.language.adapt={vision: vit}", "teachers.vision=[]"])
    assert load_config(TINY, ["teachers.language.adapt={vision: clip}"]).teachers.language.adapt.image_tokens == 4
    code = main(["adapt", "--config", str(TINY), f"output_dir={tmp_path}", "teachers.language.adapt={vision: vitt}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "teachers.language.adapt.vision" in err[0]


def test_the_projector_pools_patch_groups_and_makes_image_tokens_of_the_lm_width():
    assert [token_grid(t) for t in (1, 2, 4, 5, 6, 9)] == [(1, 1), (1, 2), (2, 2), (1, 5), (2, 3), (3, 3)]
    features = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4×4 grid, raster order
    pooled = pool_patches(features, [4, 4], 4)
    grid = features.reshape(2, 4, 4, 3)
    assert pooled.shape == (2, 4, 3)
    torch.testing.assert_close(pooled[:, 0], grid[:, :2, :2].mean((1, 2)))  # top left
    torch.testing.assert_close(pooled[:, 3], grid[:, 2:, 2:].mean((1, 2)))  # bottom right
    proj = Projector(summary_dim=5, feature_dim=3, grid=[4, 4], image_tokens=4, hidden=32)
    out = proj(torch.randn(2, 5), proj.pool(features))
    assert out.shape == (2, 4, 32)
    assert [type(m).__name__ for m in (proj.fc1, proj.act, proj.fc2)] == ["Linear", "GELU", "Linear"]
    assert pool_patches(torch.randn(1, 7, 3), [2, 3], 2).shape == (1, 2, 3)  # not a grid: contiguous groups


def test_only_a_teacher_that_names_the_rows_it_reads_gets_them():
    from teachers.contract import reads

    class Plain:
        def inputs(self):  # a method of another meaning (hf_vlm has one) is not a declaration
            return None

    class Grafted:
        reads = ("vit",)

    class Bad:
        def reads(self):
            return ("vit",)

    assert reads(Plain()) == () and reads(Cells()) == () and reads(Grafted()) == ("vit",)
    with pytest.raises(TypeError, match="`reads` must be a tuple of teacher names"):
        reads(Bad())


def test_the_graft_lowers_val_perplexity_by_reading_the_image(grafted, llama_dir, cache_dir, data, tmp_path):
    teacher, info, _, _ = grafted
    root, _ = data
    for a in info["adapters"]:  # the teacher as it is (no image, no adapter) against the fitted graft
        assert a["val_perplexity_after"] < a["val_perplexity_before"] / 10
        assert a["val_perplexity_grounded_after"] < a["val_perplexity_grounded_before"] / 10
    # The image, not the colours' frequencies: a text-only correction with the same settings knows only how often
    # each colour comes, and the graft scoring each row with another row's picture is worse than with its own.
    text = adapt_teacher(teacher, root / "samples", AdaptConfig(**{**vars(SETTINGS), "vision": None}), tmp_path,
                         progress=False)
    for g, t in zip(info["adapters"], text["adapters"], strict=True):
        assert g["val_perplexity_grounded_after"] < t["val_perplexity_grounded_after"] / 2
    scorer = HFCausalLMTeacher(lm_config(llama_dir, adapters=info["folder"]), cache_dir)
    own, other = grounded_perplexity(scorer, samples_with_vision(root, "test")), \
        grounded_perplexity(scorer, samples_with_vision(root, "test", shift=5))
    assert own < other / 2, (own, other)


def test_a_second_run_reuses_the_cached_graft(grafted, data):
    teacher, info, _, cache = grafted
    root, _ = data
    calls, fit = [], graft_mod.fit_graft_fold
    graft_mod.fit_graft_fold = lambda *a, **k: calls.append(a) or fit(*a, **k)
    try:
        again = graft_teacher(teacher, root / "samples", root / "targets" / "cells", SETTINGS, cache, progress=False)
    finally:
        graft_mod.fit_graft_fold = fit
    assert again["cached"] and again["folder"] == info["folder"] and not calls
    assert again["graft"] == info["graft"] and info["graft"]["vision"] == "cells"
    assert info["graft"]["vision_weights_digest"] == "cells-v1"
    for a in info["adapters"]:  # safetensors files with their sha256 in adapters.json
        fold = Path(info["folder"]) / a["path"]
        assert sorted(p.name for p in fold.glob("*.safetensors")) == ["adapter_model.safetensors",
                                                                      "projector.safetensors"]
        assert set(load_file(str(fold / "projector.safetensors"))) >= {"fc1.weight", "fc2.weight", "features_mean"}


def test_the_cache_key_holds_the_vision_teacher_and_a_text_only_key_is_unchanged(grafted, data):
    teacher, info, _, _ = grafted
    manifest = load_manifest(data[0] / "targets" / "cells")
    record = vision_record(manifest, "cells")
    key = adapters_key(teacher, "d", SETTINGS, record)
    assert adapters_key(teacher, "e", SETTINGS, record) != key  # the data
    assert adapters_key(teacher, "d", SETTINGS, {**record, "vision_weights_digest": "other"}) != key
    assert adapters_key(teacher, "d", AdaptConfig(**{**vars(SETTINGS), "image_tokens": 2}), record) != key
    text = AdaptConfig(**{**vars(SETTINGS), "vision": None})
    ident = teacher.identity()
    before_grafts = {k: v for k, v in vars(text).items() if k not in ("vision", "image_tokens")}
    base = {k: ident.get(k) for k in ("weights_digest", "tokenizer_digest", "prompt", "max_tokens")}
    assert adapters_key(teacher, "d", text) == digest([base, "d", before_grafts])[:16]


def test_each_row_is_scored_by_its_folds_graft_which_never_trained_on_it(grafted, llama_dir, cache_dir, data):
    teacher, info, fits, _ = grafted
    root, _ = data
    train = read_rows(root / "samples", {"train"})["train"]
    for fold, rows in enumerate(fits):  # fold k trained on every train row outside fold k, and on no other
        outside = [tuple(teacher.encode([r["caption"]])[0][0]) for r in train if fold_of(r["id"], 2) != fold]
        assert rows == outside and len(rows) == info["adapters"][fold]["train_rows"]
    scorer = HFCausalLMTeacher(lm_config(llama_dir, adapters=info["folder"]), cache_dir)
    samples = samples_with_vision(root, "train")[:10]
    assert {fold_of(s["id"], 2) for s in samples} == {0, 1}
    rows = scorer.rows(samples)
    for fold in (0, 1):  # a plain forward over prompt + image tokens + caption with fold k's files
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir),
                                          f"{info['folder']}/fold-{fold}").eval()
        proj = scorer.projectors[fold]
        for s, row in zip(samples, rows, strict=True):
            v = s["vision"]["cells"]
            with torch.no_grad():
                image = proj(torch.tensor(v["summary"][None]).float(), proj.pool(torch.tensor(v["features"][None])))
                embed = model.get_input_embeddings()
                ids = row["token_ids"].tolist()
                x = torch.cat([embed(torch.tensor([scorer.prompt_ids])), image, embed(torch.tensor([ids[1:]]))], 1)
                logits = model(inputs_embeds=x).logits[0]
            start = len(scorer.prompt_ids) + image.shape[1] - 1
            ref = torch.log_softmax(logits[start: start + len(ids)].double(), -1).numpy()
            same = np.allclose(row["topk_logprobs"], np.take_along_axis(ref, row["topk_ids"], 1), atol=1e-4)
            assert same == (fold_of(s["id"], 2) == fold)


def test_the_identity_names_the_graft_and_a_changed_vision_teacher_is_refused(grafted, llama_dir, cache_dir, data,
                                                                              tmp_path):
    _, info, _, _ = grafted
    root, samples = data
    scorer = HFCausalLMTeacher(lm_config(llama_dir, adapters=info["folder"]), cache_dir)
    ident = scorer.identity()["adapt"]
    assert ident["graft"]["vision"] == "cells" and scorer.reads == ("cells",)
    assert [a["projector_digest"] for a in ident["adapters"]] == [a["projector_digest"] for a in info["adapters"]]
    shard = root / "samples" / samples["shards"][0]["file"]
    out = collect_shard(scorer, shard, tmp_path / "lm", producer_digest="p", progress=False,
                        inputs={"cells": root / "targets" / "cells"})
    assert out["rows"] == samples["shards"][0]["rows"] and not out["skipped"]
    with pytest.raises(ValueError, match=r"reads the stored rows of teacher\(s\) \['cells'\]"):
        collect_shard(scorer, shard, tmp_path / "lm2", producer_digest="p", progress=False)
    with pytest.raises(ShardError, match="missing or unfinished"):
        scorer.check_reads({"cells": tmp_path / "nothing"})
    other = collect_vision(Cells(digest_="cells-v2"), samples, root, tmp_path / "cells-v2")  # other weights
    with pytest.raises(GraftMismatchError, match=r"weights_digest cells-v2.*fitted on cells-v1"):
        collect_shard(scorer, shard, tmp_path / "lm3", producer_digest="p", progress=False,
                      inputs={"cells": other})
    manifest = json.loads((other / MANIFEST).read_text())
    manifest["producer"]["weights_digest"] = "cells-v1"  # same weights, another identity (e.g. its image size)
    manifest["producer"]["grid"] = [9, 1]
    (other / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GraftMismatchError, match="identity_digest"):
        scorer.check_reads({"cells": other})


def test_a_tampered_projector_is_refused(grafted, llama_dir, cache_dir, tmp_path):
    _, info, _, _ = grafted
    copy = tmp_path / "graft"
    shutil.copytree(info["folder"], copy)
    with open(copy / "fold-0" / "projector.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="projector digest"):
        HFCausalLMTeacher(lm_config(llama_dir, adapters=str(copy)), cache_dir)


def test_collection_runs_the_vision_teachers_before_a_grafted_language_teacher(tiny_cfg):
    from distill.config import to_container
    from flows.targets import phases
    assert phases(to_container(tiny_cfg())) == [["lm", "vit", "clip"]]
    assert phases(to_container(tiny_cfg("teachers.language.adapt={}"))) == [["lm", "vit", "clip"]]
    assert phases(to_container(tiny_cfg("teachers.language.adapt={vision: clip}"))) == [["vit", "clip"], ["lm"]]


@pytest.mark.slow
def test_mmtp_adapt_alone_collects_the_vision_teacher_it_reads_first(prefect_harness, tiny_cfg):
    from distill.config import shards_path
    from flows.adapt import run_adapt
    cfg = tiny_cfg("teachers.language.adapt={vision: clip, folds: 2, rank: 4, max_steps: 3, eval_every: 3, "
                   "val_rows: 8}")
    first = run_adapt(cfg)
    clip = shards_path(cfg, "targets", "clip")
    assert not first["cached"] and load_manifest(clip)["modality"] == "vision"
    assert not shards_path(cfg, "targets", "vit").exists()  # only the vision teacher the graft reads
    info = json.loads((Path(first["adapters"]) / "adapters.json").read_text())
    assert info["graft"]["vision_identity_digest"] == digest(load_manifest(clip)["producer"])
    written = (clip / MANIFEST).stat().st_mtime_ns
    again = run_adapt(cfg)
    assert again["cached"] and again["adapters"] == first["adapters"]
    assert (clip / MANIFEST).stat().st_mtime_ns == written  # finished vision shards are not collected again


@pytest.mark.slow
def test_the_tiny_pipeline_with_a_grafted_language_teacher(prefect_harness, tiny_cfg):
    """samples -> vision shards -> adapt (a child MLflow run) -> language shards -> train -> evaluate, for real."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from distill.config import shards_path
    from flows.collect import run_collect
    from flows.pipeline import run_pipeline
    adapt = "teachers.language.adapt={vision: vit, folds: 2, rank: 4, layers: null, lr: 0.01, batch_size: 8, " \
            "max_steps: 6, eval_every: 3, val_rows: 16, image_tokens: 2}"
    cfg = tiny_cfg(adapt, "train.max_steps=4", "train.checkpoint_every=4", "train.progress=false",
                   "evaluate.probe=false", "evaluate.mtp_prompts=1")
    result = run_pipeline(cfg)

    lang, vit = (load_manifest(shards_path(cfg, "targets", n)) for n in ("lm", "vit"))
    graft = lang["producer"]["adapt"]["graft"]
    assert graft["vision"] == "vit" and graft["vision_weights_digest"] == vit["producer"]["weights_digest"]
    assert graft["vision_identity_digest"] == digest(vit["producer"])
    vit_done = (shards_path(cfg, "targets", "vit") / MANIFEST).stat().st_mtime_ns  # the vision teacher finished first
    assert all((shards_path(cfg, "targets", "lm") / s["file"]).stat().st_mtime_ns > vit_done for s in lang["shards"])
    client = MlflowClient(cfg.tracking.uri)
    experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = {r.data.tags["mmtp.stage"]: r for r in client.search_runs([experiment])}
    assert {"pipeline", "adapt", "collect", "train", "evaluate"} <= set(runs)
    adapt_run = runs["adapt"]
    assert adapt_run.data.tags["mlflow.parentRunId"] == result["mlflow_run_id"]
    assert adapt_run.data.tags["adapt.graft.vision"] == "vit"
    m = adapt_run.data.metrics
    for key in ("val_perplexity_before", "val_perplexity_after", "val_perplexity_grounded_before",
                "val_perplexity_grounded_after", "val_perplexity_other_after", "val_perplexity_start"):
        assert math.isfinite(m[f"adapt/{key}"]) and m[f"adapt/{key}"] > 1, key
    assert adapt_run.info.start_time < runs["collect"].info.end_time  # adapt ran inside collection
    assert result["steps"] == 4 and math.isfinite(result["final_loss"])
    evaluated = client.get_run(result["evaluate_run_id"]).data.metrics
    assert math.isfinite(evaluated["eval/teacher_perplexity"])
    again = run_collect(cfg)  # nothing refitted, every shard reused
    assert again["shards_reused"] == {n: len(lang["shards"]) for n in ("lm", "vit", "clip")}
    cached = [r.data.tags["adapt.cached"] for r in client.search_runs([experiment], "tags.`mmtp.stage` = 'adapt'")]
    assert sorted(cached) == ["False", "True"]


def test_on_policy_rounds_refuse_a_grafted_teacher(tiny_cfg):
    from distill.config import to_container
    from flows.onpolicy import onpolicy_distill
    with pytest.raises(ConfigError, match="a grafted teacher cannot score them"):
        onpolicy_distill.fn(to_container(tiny_cfg("teachers.language.adapt={vision: vit}")))

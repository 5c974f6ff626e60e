"""The teacher contract: a teacher kind added as one class plus one config line (a dotted `kind`), run
through the real tiny collection; the manifest records its modality, which the dataset reads."""

import json
from pathlib import Path

import numpy as np
import pytest

from data.dataset import DistillDataset, ManifestMismatchError
from data.images import decode_image
from data.shards import load_manifest, read_shard
from data.targets import decode_vision
from student.pixels import image_transform
from teachers import Modality, teacher_config
from teachers.contract import check_teacher
from teachers.registry import teacher_class


class ChannelMeans:
    """A vision teacher in one class: per-channel means of the image, resized to `options.side`, (summary)
    and of its 2x2 quadrants (patch features). Exact in float16, so the stored rows can be checked to the bit."""
    modality = Modality.vision

    def __init__(self, cfg, cache_dir):
        self.cfg = teacher_config(cfg)
        self.side = self.cfg.options.get("side", 8)

    def identity(self) -> dict:
        return {"name": self.cfg.name, "kind": self.cfg.kind, "source": "test", "weights_digest": "none",
                "summary_dim": 3, "feature_dim": 3, "num_patches": 4, "grid": [2, 2]}

    def rows(self, samples: list[dict]) -> list[dict]:
        return [{"summary": x.mean((0, 1)), "features": quadrants(x)}
                for x in (image_array(s["image"], self.side) for s in samples)]


class NoModality:
    def __init__(self, cfg, cache_dir):
        pass


def image_array(png: bytes, side: int) -> np.ndarray:
    return np.round(np.asarray(decode_image(png).resize((side, side)), dtype=np.float32) / 8)  # small integers


def quadrants(x: np.ndarray) -> np.ndarray:
    h = x.shape[0] // 2
    return np.stack([x[i:i + h, j:j + h].mean((0, 1)) for i in (0, h) for j in (0, h)])


KIND = f"{__name__}:ChannelMeans"


@pytest.mark.slow
def test_a_teacher_kind_is_one_class_and_one_config_line(tiny_cfg, prefect_harness, tmp_path):
    from flows.collect import run_collect

    cfg = tiny_cfg("teachers.vision=[{name: means, kind: '" + KIND + "', options: {side: 6}}]",
                   "teachers.language=null")
    summary = run_collect(cfg)
    folder = summary["targets"]["means"]
    manifest = load_manifest(folder)
    assert manifest["modality"] == "vision" and manifest["producer"]["kind"] == KIND
    assert manifest["shape"] == [4, 3] and len(manifest["feature_stats"]["summary_mean"]) == 3
    samples = load_manifest(summary["samples_dir"])
    for entry in samples["shards"]:
        images = read_shard(f"{summary['samples_dir']}/{entry['file']}").column("image").to_pylist()
        got_summary, got_features = decode_vision(read_shard(f"{folder}/{entry['file']}"))
        want = [image_array(png, 6) for png in images]
        np.testing.assert_array_equal(got_summary, np.stack([x.mean((0, 1)) for x in want]).astype(np.float16))
        np.testing.assert_array_equal(got_features, np.stack([quadrants(x) for x in want]).astype(np.float16))

    ds = DistillDataset(summary["samples_dir"], summary["targets"], transform=image_transform(28))
    assert ds.language is None and ds.vision == ["means"]

    path = Path(folder) / "manifest.json"  # made a manifest from before the contract
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "modality"}))
    with pytest.raises(ManifestMismatchError, match="no teacher modality recorded.*re-run `mmtp collect`"):
        DistillDataset(summary["samples_dir"], summary["targets"], transform=image_transform(28))


def test_dotted_kinds_resolve_and_must_declare_a_modality(cache_dir):
    assert teacher_class(KIND) is ChannelMeans
    teacher = teacher_class(KIND)(dict(name="m", kind=KIND), cache_dir)
    assert check_teacher(teacher) == Modality.vision
    with pytest.raises(ValueError, match="must declare `modality`"):
        teacher_config(dict(name="x", kind=f"{__name__}:NoModality"))
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        teacher_config(dict(name="x", kind="no_such_module_xyz:Teacher"))
    with pytest.raises(ValueError, match="has no attribute 'Missing'"):
        teacher_config(dict(name="x", kind=f"{__name__}:Missing"))
    with pytest.raises(ValueError, match=r"unknown teacher kind 'hf_visoin'; expected one of \[.*'hf_vision'"):
        teacher_config(dict(name="x", kind="hf_visoin"))


def test_a_teacher_in_the_wrong_slot_is_refused(tiny_cfg, cache_dir):
    from distill.config import ConfigError
    from flows.targets import collect_teacher

    cfg = tiny_cfg("teachers.language={name: means, kind: '" + KIND + "'}", "teachers.vision=[]")
    with pytest.raises(ConfigError, match="teachers.language.*a vision teacher, but teachers.language takes "
                                          "language teachers"):
        collect_teacher(cfg, "means")

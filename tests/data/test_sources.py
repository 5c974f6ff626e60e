"""Source adapters, the scene generator and the image helpers."""

import gzip
import io
import re
import struct
import zlib
from itertools import islice

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from data import scenes
from data.images import decode_image, encode_png
from data.sources import (
    DIGIT_WORDS,
    FASHION_NOUNS,
    SOURCES,
    caption_corpus,
    iter_source,
)


def words(caption):
    return re.findall(r"[a-z0-9][a-z0-9'-]*[a-z0-9]|[a-z0-9]", caption.lower())


def pixels(sample):
    return np.asarray(Image.open(io.BytesIO(sample["image"])))


def check_sample(s):
    assert set(s) == {"id", "image", "caption", "label", "grounded"}
    assert isinstance(s["id"], str) and isinstance(s["caption"], str) and s["caption"]
    assert s["image"][:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(s["image"])).mode == "RGB"
    assert s["grounded"], s
    missing = [w for w in s["grounded"] if w not in words(s["caption"])]
    assert not missing, (s["caption"], missing)


# ---------------------------------------------------------------- images


def png_with_size(width, height):
    """A hand-built PNG whose header claims width×height (PIL refuses to write zero sizes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_png_roundtrip():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    img = decode_image(encode_png(arr))
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)
    grey = decode_image(encode_png(arr[:, :, 0]))
    assert np.array_equal(np.asarray(grey)[:, :, 2], arr[:, :, 0])
    assert encode_png(arr) == encode_png(Image.fromarray(arr))


@pytest.mark.parametrize("data, match", [
    (b"", "empty"),
    (b"not an image at all, just text", "cannot be decoded"),
    (png_with_size(0, 0), "cannot be decoded"),  # PIL refuses a zero-size header
    (png_with_size(0, 5), "cannot be decoded"),
    (encode_png(np.zeros((4, 4, 3), np.uint8))[:40], "cannot be decoded"),  # truncated
])
def test_decode_image_rejects_bad_bytes(data, match):
    with pytest.raises(ValueError, match=match):
        decode_image(data)


# ---------------------------------------------------------------- digits


def test_digits_deterministic_varied_and_grounded():
    a = list(iter_source({"kind": "digits", "limit": 60, "image_size": 28}))
    b = list(iter_source({"kind": "digits", "limit": 60, "image_size": 28}))
    assert a == b
    assert len({s["id"] for s in a}) == 60
    for s in a:
        check_sample(s)
        assert DIGIT_WORDS[s["label"]] in words(s["caption"])
        assert pixels(s).shape == (28, 28, 3)
    assert len({s["caption"] for s in a}) >= 20
    assert len({re.sub(r"\b(" + "|".join(DIGIT_WORDS) + r"|\d)\b", "#", s["caption"]) for s in a}) >= 8
    other = list(iter_source({"kind": "digits", "limit": 60, "image_size": 28, "seed": 1}))
    assert [s["caption"] for s in other] != [s["caption"] for s in a]
    assert [s["image"] for s in other] == [s["image"] for s in a]  # the seed picks captions, not pixels


def test_digits_pixels_follow_sklearn():
    from sklearn.datasets import load_digits

    ref = load_digits()
    got = list(iter_source({"kind": "digits", "limit": 3, "image_size": 16, "resample": "nearest"}))
    for i, s in enumerate(got):
        assert s["label"] == ref.target[i]
        ink = pixels(s)[::2, ::2, 0].astype(float)  # every 2×2 block is one source pixel
        assert np.abs(ink - (255 - ref.images[i] * 255 / 16)).max() <= 0.5


# ---------------------------------------------------------------- scenes

GROUP = re.compile(r"\b(an?|one|two|three) (?:(small|little|large|big) )?(\w+) (circle|square|triangle|star)s?"
                   r"(?: (?:on|at|along|in) the (left|right|top|bottom)\b)?")
COUNTS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
RELATION = re.compile(r"\b(\w+) (?:circle|square|triangle|star)s? (to the left of|to the right of|above|below) "
                      r"(?:an?|one|two|three) (?:(?:small|little|large|big) )?(\w+) ")


def test_scenes_deterministic():
    cfg = {"kind": "scenes", "n": 12, "seed": 3, "image_size": 48}
    a, b = list(iter_source(cfg)), list(iter_source(cfg))
    assert a == b
    c = list(iter_source({**cfg, "seed": 4}))
    assert [s["image"] for s in a] != [s["image"] for s in c]
    assert len({s["caption"] for s in a}) >= 10


def test_scene_captions_match_drawn_pixels():
    size = 96
    cell = size / 3
    samples = list(iter_source({"kind": "scenes", "n": 40, "seed": 7, "image_size": size}))
    n_groups, n_relations = set(), 0
    for s in samples:
        check_sample(s)
        img = pixels(s)
        groups = [(COUNTS[m[0]], m[1], m[2], m[3], m[4]) for m in GROUP.findall(s["caption"])]
        n_groups.add(len(groups))
        assert groups, s["caption"]
        for name, rgb in scenes.COLOURS.items():
            mask = np.all(img == rgb, axis=-1)
            comps, n = ndimage.label(mask)
            ours = [g for g in groups if g[2] == name]
            assert n == sum(g[0] for g in ours), (s["caption"], name, n)
            if len(ours) != 1:
                continue
            count, size_word, _, shape, where = ours[0]
            for box in ndimage.find_objects(comps):
                h, w = box[0].stop - box[0].start, box[1].stop - box[1].start
                fill = mask[box].mean()
                expect = {"square": (0.95, 1.01), "circle": (0.7, 0.86), "triangle": (0.4, 0.62), "star": (0.2, 0.45)}
                assert expect[shape][0] <= fill <= expect[shape][1], (s["caption"], shape, fill)
                if size_word:
                    assert (w > 0.65 * cell) == (size_word in ("large", "big")), (s["caption"], w)
                cy, cx = (box[0].start + h / 2), (box[1].start + w / 2)
                inside = {"left": cx < cell, "right": cx > 2 * cell, "top": cy < cell, "bottom": cy > 2 * cell}
                assert inside.get(where, True), (s["caption"], where, cx, cy)
        relation = RELATION.search(s["caption"])
        if relation and relation[1] != relation[3]:  # two colours: every pixel of one is on that side of the other
            (ya, xa), (yb, xb) = (np.nonzero(np.all(img == scenes.COLOURS[c], axis=-1)) for c in relation.group(1, 3))
            side = {"to the left of": xa.max() < xb.min(), "to the right of": xa.min() > xb.max(),
                    "above": ya.max() < yb.min(), "below": ya.min() > yb.max()}
            assert side[relation[2]], s["caption"]
            n_relations += 1
        top = max(groups, key=lambda g: g[0])
        assert scenes.LABEL_NAMES[s["label"]] == f"{top[2]} {top[3]}"
        background = [w for w in scenes.BACKGROUNDS if f"{w} background" in s["caption"]]
        if background:  # corners are never covered by a shape's 1 px border gap
            assert np.abs(img[0, 0].astype(int) - scenes.BACKGROUNDS[background[0]]).max() <= 6
    assert n_groups == {1, 2} and n_relations > 0


def test_scenes_plain_background():
    for s in iter_source({"kind": "scenes", "n": 5, "image_size": 32, "max_noise": 0}):
        img = pixels(s).reshape(-1, 3)
        colours = {tuple(p) for p in img}
        bg = [c for c in colours if c in {tuple(v) for v in scenes.BACKGROUNDS.values()}]
        assert len(bg) == 1 and colours - set(bg) <= {tuple(v) for v in scenes.COLOURS.values()}


# ---------------------------------------------------------------- fashion-mnist


def write_idx(path, arr, compress):
    data = bytes([0, 0, 8, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def test_fashion_mnist_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*apt-get install dataset-fashion-mnist"):
        iter_source({"kind": "fashion_mnist", "root": str(tmp_path / "nowhere")})


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 1, 9], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", images, compress)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", labels, compress)
    got = list(iter_source({"kind": "fashion_mnist", "root": str(tmp_path), "split": "test"}))
    assert [s["label"] for s in got] == [9, 0, 1, 9]
    assert len({s["id"] for s in got}) == 4
    for s, img, label in zip(got, images, labels, strict=True):
        check_sample(s)
        assert FASHION_NOUNS[label] in s["caption"]
        assert np.array_equal(pixels(s)[:, :, 1], img)
    resized = next(iter_source({"kind": "fashion_mnist", "root": str(tmp_path), "split": "test", "image_size": 14}))
    assert pixels(resized).shape == (14, 14, 3)


def test_fashion_mnist_bad_idx_names_the_file(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8), False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01\0\0\0\x05ab")  # says 5 labels, has 2
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        iter_source({"kind": "fashion_mnist", "root": str(tmp_path)})


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def hf_rows():
    rng = np.random.default_rng(0)
    ims = [Image.fromarray(rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)) for i in range(3)]
    ims.append(Image.fromarray(np.zeros((6, 6), np.uint8)).convert("L"))
    return {"image": ims, "label": [0, 1, 1, 0], "caption": ["a red thing", "x", "y", "z"]}


def image_features():
    from datasets import ClassLabel, Features, Value
    from datasets import Image as ImageFeature

    return Features({"image": ImageFeature(), "label": ClassLabel(names=["cat", "hot dog"]),
                     "caption": Value("string")})


def test_hf_disk_with_template_and_broken_image(tmp_path, hf_rows):
    from datasets import Dataset

    rows = {**hf_rows, "image": [{"bytes": encode_png(np.asarray(im.convert("RGB"))), "path": None}
                                 for im in hf_rows["image"]]}
    rows["image"][2] = {"bytes": b"definitely not a png", "path": None}
    Dataset.from_dict(rows, features=image_features()).save_to_disk(str(tmp_path / "ds"))
    cfg = {"kind": "hf_disk", "path": str(tmp_path / "ds"), "image_size": 8, "label_column": "label", "name": "toy"}
    got = list(iter_source(cfg))
    assert [s["id"] for s in got] == ["toy-00000", "toy-00001", "toy-00002", "toy-00003"]
    assert [s["label"] for s in got] == [0, 1, 1, 0]
    assert got[0]["caption"] == "a red thing" and got[0]["grounded"] == []
    assert got[2]["image"] == b"definitely not a png"  # passed on for the writer to count
    assert pixels(got[1]).shape == (8, 8, 3) and pixels(got[3]).shape == (8, 8, 3)

    templated = list(iter_source({"kind": "hf_disk", "path": str(tmp_path / "ds"),
                                  "caption_template": "a photo of a {label_name}.", "limit": 2}))
    assert [s["caption"] for s in templated] == ["a red thing", "x"]  # a text column wins over the template
    Dataset.from_dict(rows, features=image_features()).remove_columns("caption").save_to_disk(str(tmp_path / "nc"))
    nc = list(iter_source({"kind": "hf_disk", "path": str(tmp_path / "nc"),
                           "caption_template": "a photo of a {label_name}."}))
    assert [s["caption"] for s in nc] == ["a photo of a cat.", "a photo of a hot dog.", "a photo of a hot dog.",
                                          "a photo of a cat."]
    assert nc[1]["grounded"] == ["hot", "dog"]
    with pytest.raises(ValueError, match="caption_template"):
        iter_source({"kind": "hf_disk", "path": str(tmp_path / "nc")})
    with pytest.raises(ValueError, match="only {label_name} and {label}"):
        iter_source({"kind": "hf_disk", "path": str(tmp_path / "nc"), "caption_template": "a {class}"})


def test_hf_disk_errors(tmp_path, hf_rows):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_dict(hf_rows, features=image_features())
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"splits \['train', 'test'\]"):
        iter_source({"kind": "hf_disk", "path": str(tmp_path / "dd")})
    assert len(list(iter_source({"kind": "hf_disk", "path": str(tmp_path / "dd"), "split": "test"}))) == 4
    with pytest.raises(ValueError, match="'picture' is not a column"):
        iter_source({"kind": "hf_disk", "path": str(tmp_path / "dd"), "split": "test", "image_column": "picture"})
    with pytest.raises(FileNotFoundError, match="missing"):
        iter_source({"kind": "hf_disk", "path": str(tmp_path / "missing")})


def test_parquet(tmp_path, hf_rows):
    from datasets import Dataset

    Dataset.from_dict(hf_rows, features=image_features()).to_parquet(str(tmp_path / "part.parquet"))
    got = list(iter_source({"kind": "parquet", "data_files": str(tmp_path / "part.parquet"),
                            "cache_dir": str(tmp_path / "cache"), "text_column": "caption"}))
    assert [s["caption"] for s in got] == hf_rows["caption"]
    assert [s["label"] for s in got] == hf_rows["label"]
    for s, im in zip(got, hf_rows["image"], strict=True):
        assert np.array_equal(pixels(s), np.asarray(im.convert("RGB")))  # no image_size: kept as is
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        iter_source({"kind": "parquet", "data_files": str(tmp_path / "nope.parquet")})


def test_imagefolder(tmp_path):
    for label, colour in (("apple", (200, 0, 0)), ("lime", (0, 200, 0))):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (9, 7), colour).save(tmp_path / "train" / label / f"{i}.png")
    cfg = {"kind": "imagefolder", "data_dir": str(tmp_path), "cache_dir": str(tmp_path / "cache"),
           "caption_template": "a photo of a {label_name}.", "image_size": 4}
    got = list(iter_source(cfg))
    assert len(got) == 4
    for s in got:
        check_sample(s)
        name = s["caption"].split()[-1].rstrip(".")
        assert pixels(s).shape == (4, 4, 3)
        assert tuple(pixels(s)[0, 0]) == {"apple": (200, 0, 0), "lime": (0, 200, 0)}[name]


# ---------------------------------------------------------------- registry and corpus


def test_iter_source_rejects_bad_config():
    assert set(SOURCES) >= {"digits", "scenes", "hf_disk", "parquet", "imagefolder", "fashion_mnist"}
    with pytest.raises(ValueError, match="'pixels'"):
        iter_source({"kind": "pixels"})
    with pytest.raises(ValueError, match=r"\['colour'\]"):
        iter_source({"kind": "scenes", "colour": "red"})


def test_caption_corpus_covers_the_vocabulary():
    corpus = caption_corpus(600, seed=0)
    assert corpus == caption_corpus(600, seed=0) and len(corpus) == 600
    assert caption_corpus(600, seed=1) != corpus
    vocab = {w for c in corpus for w in words(c)}
    needed = set(DIGIT_WORDS) | set(scenes.COLOURS) | set(scenes.SHAPES) | set(scenes.BACKGROUNDS)
    needed |= {"small", "large", "left", "right", "top", "bottom", "two", "three", "t-shirt", "trousers", "boot"}
    assert needed <= vocab, needed - vocab
    generated = [s["caption"] for s in islice(iter_source({"kind": "scenes", "n": 30, "image_size": 24}), 30)]
    assert {w for c in generated for w in words(c)} <= vocab

"""Source adapters: each yields raw samples as plain dicts, in a deterministic order.

    {"id": str, "image": bytes (RGB PNG), "caption": str, "label": int | None, "grounded": list[str]}

`grounded` lists the caption words that can only be known by looking at the image (the digit's
word, the class noun, a shape's colour/count/shape/size/region word); each appears as a word of
the caption. Bad rows are not filtered here: an HF image that cannot be decoded is passed on as
its raw bytes for the samples writer to count and skip.

`iter_source(cfg)` dispatches on `cfg["kind"]`; the other keys are the adapter's keyword
arguments below (an unknown key is an error naming it):

- `digits`: scikit-learn's 1,797 8×8 handwritten digits, dark ink on white, upscaled; captions
  from 20 paraphrase templates (`DIGIT_TEMPLATES`). `image_size`=56, `resample`="bilinear" |
  "nearest", `seed`=0 (picks caption templates), `limit`.
- `scenes`: procedural coloured shapes (see `data/scenes.py`; label = dominant colour+shape, 24 classes;
  captions paraphrase and may state a left/right/above/below relation between two groups).
  `n`=1000, `seed`=0, `image_size`=112, `max_noise`=6 (background noise amplitude, 0 = plain).
- `fashion_mnist`: Fashion-MNIST IDX files (gzipped or not) from Debian's `dataset-fashion-mnist`.
  `root`="/usr/share/datasets/fashion-mnist", `split`="train" | "test" (which files; not the
  samples split), `image_size`=None (28), `seed`=0, `limit`.
- `hf_disk`: `datasets.load_from_disk(path)`; `split` needed when it holds several splits.
- `parquet`: `datasets.load_dataset("parquet", data_files=...)`, `split`="train", `cache_dir`.
- `imagefolder`: `datasets.load_dataset("imagefolder", data_dir=...)`, `split`="train", `cache_dir`.
  The three HF kinds (data/hf_sources.py) share: `image_column`="image"; `text_column` (default "caption" or "text"
  when present); `label_column` (default "label" when present); `caption_template`, used when
  there is no text column, formatted with `label_name` (ClassLabel name) and `label`, e.g.
  "a photo of a {label_name}."; `image_size` (plain resize, default keep); `limit`; `name`
  (id prefix, default the kind). Ids are `<name>-<row index>`. Images may be PIL images,
  {"bytes", "path"} dicts, paths or bytes. A string label column gives `label` None.

Held-out caption templates: the three generators (digits, scenes, fashion_mnist) take
`split_of(sample_id) -> "train" | "val" | "test"`, which `iter_source(cfg, split_of)` passes on
(the samples builder passes the split it will assign; it is not a config key). Train rows draw
from the first three quarters of each template list, val/test rows only from the held-out last
quarter (`scenes.template_pool`), so no val/test caption is verbatim a train caption and a
language teacher's knowledge of paraphrase has something to add. Ids never depend on the split
(the split is a hash of the id). Without `split_of` every row is captioned as a train row.
The HF kinds (their captions are the data's own) take no `split_of`.
"""

from __future__ import annotations

import gzip
import inspect
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image

from data import scenes
from data.hf_sources import (  # noqa: F401  (caption_words: re-exported)
    _check_limit,
    _iter_hf,
    caption_words,
    iter_hf_disk,
    iter_imagefolder,
    iter_parquet,
)
from data.images import encode_png, resize

CAPTIONS_VERSION = 2  # in the samples config digest: bump when generated captions change, so samples rebuild
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_TEMPLATES = [  # {a_word} is the word with its article: "an eight", "a seven"
    "a handwritten {word}.",
    "the digit {word}, written by hand.",
    "a scanned image of the number {word}.",
    "someone wrote {a_word} here.",
    "the handwritten digit {word} in dark ink on white paper.",
    "the number {numeral} written by hand, {word}.",
    "a low resolution image of a handwritten {word}.",
    "a blurry, pixelated {word} drawn by hand.",
    "{word}, a digit written by hand.",
    "a small grey picture of the number {word}.",
    "the handwritten numeral {numeral}, read as {word}.",
    "{a_word}, drawn with a pen on a light background.",
    "this is the digit {word}.",
    "a quick sketch of the number {word}.",
    "an old scan of a handwritten {word}, the digit {numeral}.",
    # held out: val/test rows only (scenes.template_pool)
    "a photo of somebody's handwriting showing {a_word}.",
    "the figure {word}, scrawled in ink.",
    "a tiny black and white image of the digit {numeral}, that is {word}.",
    "this looks like a handwritten {word}.",
    "a close-up of a single handwritten {word}.",
]

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]  # the dataset's own names
FASHION_NOUNS = ["a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat",
                 "a sandal", "a shirt", "a sneaker", "a bag", "an ankle boot"]
FASHION_GROUNDED = [["t-shirt"], ["trousers"], ["pullover"], ["dress"], ["coat"],
                    ["sandal"], ["shirt"], ["sneaker"], ["bag"], ["ankle", "boot"]]
FASHION_TEMPLATES = [
    "a photo of {noun}.",
    "a grey picture of {noun} on a black background.",
    "{noun}, shown in a small product photo.",
    "a low resolution image of {noun}.",
    "this is {noun}.",
    "a fashion catalogue picture of {noun}.",
    # held out: val/test rows only (scenes.template_pool)
    "a black and white photo of {noun}.",
    "a product shot of {noun} from a web shop.",
]
FASHION_APT = "apt-get install dataset-fashion-mnist"


def _pick(seed: int, index: int, n: int) -> int:
    return int(np.random.default_rng([seed, index]).integers(n))


SplitOf = Callable[[str], str]  # sample id -> "train" | "val" | "test"


def _split(split_of: SplitOf | None, sample_id: str) -> str:
    return "train" if split_of is None else split_of(sample_id)


def _digit_text(template: str, label: int) -> tuple[str, list[str]]:
    word = DIGIT_WORDS[label]
    a_word = ("an " if word == "eight" else "a ") + word
    grounded = [word] + ([str(label)] if "{numeral}" in template else [])
    return template.format(word=word, a_word=a_word, numeral=label), grounded


def digit_caption(label: int, seed: int, index: int, split: str = "train") -> tuple[str, list[str]]:
    pool = scenes.template_pool(DIGIT_TEMPLATES, split)
    return _digit_text(pool[_pick(seed, index, len(pool))], label)


def iter_digits(image_size: int = 56, resample: str = "bilinear", seed: int = 0,
                limit: int | None = None, split_of: SplitOf | None = None) -> Iterator[dict]:
    from sklearn.datasets import load_digits

    _check_limit(limit)
    digits = load_digits()
    n = len(digits.target) if limit is None else min(limit, len(digits.target))
    for i in range(n):
        label = int(digits.target[i])
        ink = np.round(255.0 - digits.images[i] * (255.0 / 16.0)).astype(np.uint8)  # values are 0..16
        img = resize(Image.fromarray(ink).convert("RGB"), image_size, resample)
        sample_id = f"digits-{i:05d}"
        caption, grounded = digit_caption(label, seed, i, _split(split_of, sample_id))
        yield {"id": sample_id, "image": encode_png(img), "caption": caption,
               "label": label, "grounded": grounded}


# ---------------------------------------------------------------- scenes


def iter_scenes(n: int = 1000, seed: int = 0, image_size: int = 112, max_noise: int = 6,
                split_of: SplitOf | None = None) -> Iterator[dict]:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"scenes: n must be a non-negative int, got {n!r}")
    for i in range(n):
        sample_id = f"scenes-{i:05d}"
        scene, img, caption, grounded = scenes.make_scene(seed, i, image_size, max_noise,
                                                          _split(split_of, sample_id))
        yield {"id": sample_id, "image": encode_png(img), "caption": caption,
               "label": scene.label, "grounded": grounded}


# ---------------------------------------------------------------- fashion-mnist


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """A uint8 IDX array (gzipped if the name ends in .gz); ValueError naming the file if malformed."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(data) < 4 + 4 * ndim or data[0:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise ValueError(f"{path}: not a uint8 IDX file with {ndim} dims (header {data[:4]!r})")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), body has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def _find_idx(root: Path, name: str) -> Path:
    for p in (root / f"{name}.gz", root / name):
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST file {root / name}[.gz] not found. Install Debian's dataset-fashion-mnist "
        f"package ({FASHION_APT}) or set root to a folder holding the IDX files.")


def fashion_caption(label: int, seed: int, index: int, split: str = "train") -> tuple[str, list[str]]:
    pool = scenes.template_pool(FASHION_TEMPLATES, split)
    template = pool[_pick(seed, index, len(pool))]
    return template.format(noun=FASHION_NOUNS[label]), list(FASHION_GROUNDED[label])


def iter_fashion_mnist(root: str = FASHION_ROOT, split: str = "train", image_size: int | None = None,
                       seed: int = 0, limit: int | None = None, split_of: SplitOf | None = None) -> Iterator[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"fashion_mnist: split must be 'train' or 'test', got {split!r}")
    _check_limit(limit)
    prefix = "train" if split == "train" else "t10k"
    root = Path(root)
    images_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    labels_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"fashion_mnist: {images_path} has {len(images)} images but {labels_path} has "
                         f"{len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_CLASSES):
        raise ValueError(f"{labels_path}: label {int(labels.max())} out of range 0..{len(FASHION_CLASSES) - 1}")
    n = len(labels) if limit is None else min(limit, len(labels))

    def rows():  # files are checked above, at call time, not at the first row
        for i in range(n):
            label = int(labels[i])
            sample_id = f"fashion_mnist-{split}-{i:05d}"
            caption, grounded = fashion_caption(label, seed, i, _split(split_of, sample_id))
            img = resize(Image.fromarray(images[i]).convert("RGB"), image_size)
            yield {"id": sample_id, "image": encode_png(img), "caption": caption,
                   "label": label, "grounded": grounded}

    return rows()


# ---------------------------------------------------------------- Hugging Face datasets


SOURCES = {
    "digits": iter_digits,
    "scenes": iter_scenes,
    "fashion_mnist": iter_fashion_mnist,
    "hf_disk": iter_hf_disk,
    "parquet": iter_parquet,
    "imagefolder": iter_imagefolder,
}
_HF_KEYS = set(inspect.signature(_iter_hf).parameters) - {"ds", "kind"}


def _allowed_keys(kind: str) -> set[str]:
    params = set(inspect.signature(SOURCES[kind]).parameters) - {"kw", "split_of"}  # split_of: not config
    return params | _HF_KEYS if kind in ("hf_disk", "parquet", "imagefolder") else params


def iter_source(cfg: Mapping, split_of: SplitOf | None = None) -> Iterator[dict]:
    """Samples of the source described by `cfg` (`kind` plus that adapter's keyword arguments).

    `split_of(sample_id)` -> "train" | "val" | "test" reaches the generators that take it (they
    caption val/test rows from held-out templates); the other kinds ignore it.
    """
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind not in SOURCES:
        raise ValueError(f"source kind {kind!r} is unknown; known kinds: {sorted(SOURCES)}")
    unknown = sorted(set(cfg) - _allowed_keys(kind))
    if unknown:
        raise ValueError(f"source {kind!r}: unknown key(s) {unknown}; allowed: {sorted(_allowed_keys(kind))}")
    if split_of is not None and "split_of" in inspect.signature(SOURCES[kind]).parameters:
        cfg["split_of"] = split_of
    return SOURCES[kind](**cfg)


def caption_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """Deterministic captions in the digits, scenes and fashion caption language (no images drawn).

    Round-robin over the three: the digits and fashion turns first enumerate every template ×
    class (200 and 80 captions, the held-out templates included), then draw train captions at
    random from `seed`; the scene turns sample scenes, every fourth one captioned from the held-out
    templates. The held-out templates are in on purpose: the corpus trains tokenizers, which
    should know the val/test wording too.
    """
    digits = [_digit_text(t, d)[0] for t in DIGIT_TEMPLATES for d in range(10)]
    fashion = [t.format(noun=noun) for t in FASHION_TEMPLATES for noun in FASHION_NOUNS]
    out = []
    for i in range(n):
        k = i // 3
        if i % 3 == 0:
            out.append(digits[k] if k < len(digits) else digit_caption(_pick(seed, k, 10), seed + 1, k)[0])
        elif i % 3 == 1:
            split = "test" if k % 4 == 3 else "train"
            out.append(scenes.caption_scene(scenes.sample_scene(seed, k), seed, k, split)[0])
        else:
            out.append(fashion[k] if k < len(fashion) else fashion_caption(_pick(seed, k, 10), seed + 1, k)[0])
    return out

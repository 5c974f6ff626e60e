"""Generated captions: paraphrase templates, scene relations, held-out templates for val/test rows."""

import re
from collections import Counter

import pytest

from data import scenes
from data.samples import assign_split, build_samples
from data.shards import read_shard
from data.sources import DIGIT_TEMPLATES, DIGIT_WORDS, _digit_text, digit_caption, iter_source

ONE = (rf"(?:an?|one|two|three) (?:(?:small|little|large|big) )?(?:{'|'.join(scenes.COLOURS)}) "
       r"(?:circle|square|triangle|star)s?")
REGION = (r"(?: (?:on the (?:left|right)(?: side)?|in the (?:left|right) column|(?:at|along) the (?:top|bottom)"
          r"|in the (?:top|bottom) row))?")
GROUPS = rf"{ONE}{REGION}(?: and {ONE}{REGION}| (?:to the left of|to the right of|above|below) {ONE})?"
RELATION = re.compile(r"(\w+) (circle|square|triangle|star)s? (to the left of|to the right of|above|below) "
                      r"(?:an?|one|two|three) (?:(?:small|little|large|big) )?(\w+) (circle|square|triangle|star)")


def template_regex(template):
    """`template` as a regex whose {groups} accepts only the scene grammar, so templates never overlap."""
    parts = re.split(r"(\{groups\}|\{background\})", template)
    fill = {"{groups}": GROUPS, "{background}": "(?:" + "|".join(scenes.BACKGROUNDS) + ")"}
    return re.compile("".join(fill.get(p, re.escape(p)) for p in parts))


SCENE_TEMPLATES = [template_regex(t) for t in scenes.TEMPLATES]
DIGIT_TEXTS = {_digit_text(t, d)[0]: i for i, t in enumerate(DIGIT_TEMPLATES) for d in range(10)}


def scene_template(caption):
    found = [i for i, r in enumerate(SCENE_TEMPLATES) if r.fullmatch(caption)]
    assert len(found) == 1, (caption, found)
    return found[0]


def test_template_pools():
    assert len(DIGIT_TEMPLATES) == 20 and len(scenes.TEMPLATES) == 16
    train, held = scenes.template_pool(DIGIT_TEMPLATES), scenes.template_pool(DIGIT_TEMPLATES, "test")
    assert len(held) == 5 and train + held == DIGIT_TEMPLATES
    assert scenes.template_pool(scenes.TEMPLATES, "val") == scenes.TEMPLATES[12:]
    with pytest.raises(ValueError, match="split"):
        scenes.template_pool(DIGIT_TEMPLATES, "dev")
    assert len(DIGIT_TEXTS) == 200  # every template × digit is a distinct caption


def test_digit_captions_read_well_and_are_deterministic():
    for d, word in enumerate(DIGIT_WORDS):
        for i in range(40):
            for split in ("train", "test"):
                caption, grounded = digit_caption(d, 0, i, split)
                assert (caption, grounded) == digit_caption(d, 0, i, split)
                assert "a eight" not in caption and grounded[0] == word
    assert "someone wrote an eight here." in DIGIT_TEXTS


def test_scene_relations_are_true_of_the_cells():
    kinds, stated, possible = Counter(), 0, 0
    for seed in range(3):
        for i in range(400):
            scene = scenes.sample_scene(seed, i)
            caption, grounded = scenes.caption_scene(scene, seed, i, ("train", "test")[i % 2])
            assert "a orange" not in caption
            scene_template(caption)  # the caption follows the grammar
            found = RELATION.search(caption)
            if len(scene.groups) == 2:
                a, b = scene.groups
                cols = [[c for _, c in g.cells] for g in (a, b)]
                rows = [[r for r, _ in g.cells] for g in (a, b)]
                possible += (max(cols[0]) < min(cols[1]) or min(cols[0]) > max(cols[1])
                             or max(rows[0]) < min(rows[1]) or min(rows[0]) > max(rows[1]))
            if not found:
                continue
            stated += 1
            assert len(scene.groups) == 2, caption
            first, second = ((g.colour, g.shape) for g in scene.groups)
            assert (found[1], found[2]) == first and (found[4], found[5]) == second, caption
            truth = {"to the left of": max(cols[0]) < min(cols[1]), "to the right of": min(cols[0]) > max(cols[1]),
                     "above": max(rows[0]) < min(rows[1]), "below": min(rows[0]) > max(rows[1])}
            assert truth[found[3]], (caption, scene.groups)
            assert scenes.RELATION_WORDS[found[3]] in grounded
            assert set(grounded) <= set(re.findall(r"[\w-]+", caption)), caption
            kinds[found[3]] += 1
    assert set(kinds) == set(scenes.RELATION_WORDS)
    assert 0.45 < stated / possible < 0.75, (stated, possible)


def test_split_changes_only_the_caption():
    split_of = {"scenes-00001": "test", "digits-00001": "val"}.get
    for kind, cfg in (("scenes", {"n": 3}), ("digits", {"limit": 3})):
        plain = list(iter_source({"kind": kind, "image_size": 24, **cfg}))
        split = list(iter_source({"kind": kind, "image_size": 24, **cfg}, lambda i: split_of(i, "train")))
        assert [s["id"] for s in plain] == [s["id"] for s in split]
        assert [s["image"] for s in plain] == [s["image"] for s in split]
        assert [s["caption"] for s in plain][::2] == [s["caption"] for s in split][::2]
        assert plain[1]["caption"] != split[1]["caption"]
    with pytest.raises(ValueError, match="split_of"):
        iter_source({"kind": "digits", "split_of": None})  # not a config key


def test_val_and_test_captions_are_never_train_captions(tmp_path):
    """The default data (all digits + 1,000 scenes, default split settings): held-out templates only."""
    data = {"sources": [{"kind": "digits"}, {"kind": "scenes", "n": 1000, "seed": 0}], "image_size": 16,
            "shard_rows": 4096, "val_fraction": 0.1, "test_fraction": 0.1, "max_caption_chars": 512,
            "max_bad_fraction": 0.0}
    m = build_samples(data, tmp_path, seed=0, progress=False)
    assert m["rows"] == 2797
    captions = {}  # (source, split) -> captions
    for shard in m["shards"]:
        t = read_shard(tmp_path / shard["file"]).to_pydict()
        for sid, caption, split, source in zip(t["id"], t["caption"], t["split"], t["source"], strict=True):
            assert split == assign_split(sid, 0, 0.1, 0.1)
            template = DIGIT_TEXTS[caption] if source == "digits" else scene_template(caption)
            cut = 15 if source == "digits" else 12
            assert (template < cut) == (split == "train"), (sid, split, caption)
            captions.setdefault((source, split), []).append(caption)
    for source in ("digits", "scenes"):
        train = set(captions[source, "train"])
        held = set(captions[source, "val"]) | set(captions[source, "test"])
        assert not train & held
        assert len(train) > (100 if source == "digits" else 700) and len(held) > (30 if source == "digits" else 150)

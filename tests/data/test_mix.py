"""MixedDataset (data/mix.py): the share of mixed-in rows in every window, determinism, and refused mixes."""

import pytest

from data.dataset import ManifestMismatchError
from data.mix import MixedDataset


class Rows:
    """The part of DistillDataset that MixedDataset reads: rows, manifests and a shuffled order."""

    def __init__(self, n, tag, teacher="t", digest="w"):
        self.n, self.tag, self.language, self.vision = n, tag, teacher, []
        self.targets = {teacher: {"producer": {"weights_digest": digest}}}
        self.samples_dir = tag

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        assert 0 <= i < self.n
        return {"tag": self.tag, "i": i}

    def block_order(self, seed, epoch, window=None):
        import numpy as np
        return np.random.default_rng([seed, epoch]).permutation(self.n).tolist()


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7])
def test_every_window_holds_the_fraction(fraction):
    mix = MixedDataset(Rows(200, "base"), [Rows(30, "a"), Rows(7, "b")], fraction)
    order = mix.block_order(seed=1, epoch=0)
    assert len(order) == mix.epoch_rows == 200
    tags = [mix[i]["tag"] for i in order]
    for lo in range(0, 200 - 16, 16):
        extra = sum(t != "base" for t in tags[lo:lo + 16])
        assert abs(extra - 16 * fraction) <= 1
    base_rows = [mix[i]["i"] for i in order if mix[i]["tag"] == "base"]
    assert len(set(base_rows)) == len(base_rows)  # offline rows are not repeated within an epoch
    assert {t for t in tags} == {"base", "a", "b"}  # both extra sets are read
    assert mix.block_order(seed=1, epoch=0) == order and mix.block_order(seed=1, epoch=1) != order


def test_zero_fraction_is_the_base_order():
    base = Rows(50, "base")
    assert MixedDataset(base, [Rows(10, "a")], 0.0).block_order(3, 0) == base.block_order(3, 0)


def test_base_attributes_pass_through():
    mix = MixedDataset(Rows(5, "base"), [Rows(3, "a")], 0.5)
    assert mix.language == "t" and mix.samples_dir == "base" and len(mix) == 8
    assert mix[6] == {"tag": "a", "i": 1, "ground_truth": False} and mix[4] == {"tag": "base", "i": 4}


def test_mixes_of_other_teachers_are_refused():
    with pytest.raises(ManifestMismatchError, match="another language teacher"):
        MixedDataset(Rows(5, "base"), [Rows(3, "a", digest="other")], 0.5)
    with pytest.raises(ManifestMismatchError, match="same teachers"):
        MixedDataset(Rows(5, "base"), [Rows(3, "a", teacher="u")], 0.5)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MixedDataset(Rows(5, "base"), [], 1.0)


def test_generated_rows_carry_no_ce_labels():
    """collate drops the CE labels of rows marked not ground truth (the student's own tokens); KD stays."""
    import torch

    from data.dataset import collate
    items = [{"id": str(b), "input_ids": torch.tensor([1, 5, 6, 2]), "pixel_values": torch.zeros(3, 4, 4),
              "label": None, "vision": {}, "lang": {"topk_ids": torch.zeros(4, 3, dtype=torch.long),
                                                    "topk_logprobs": torch.zeros(4, 3), "tail_logprob": torch.zeros(4)}}
             for b in range(2)]
    items[1]["ground_truth"] = False
    batch = collate(items)
    assert batch["labels"][0].tolist() == [1, 5, 6, 2] and (batch["labels"][1] == -100).all()
    assert "generated" not in collate(items[:1])["lang"]  # offline rows only: no field at all
    assert batch["lang"]["generated"].tolist() == [[False] * 4, [True] * 4]  # the KD's generated_kind rows

"""The training view of the shards: samples joined with every teacher's targets, memory-mapped.

Target shards mirror samples shards row for row (collection writes them that way and the
manifests record it), so the join by sample id is a join by (shard, row); every read checks that
the ids agree. Only the shards being read are open: uncompressed shards are memory-mapped
zero-copy, compressed ones are decompressed one shard at a time, which is why the order is a
window shuffle: shards in random order, taken `window` at a time, and the rows of each window
shuffled together, deterministic per (seed, epoch). Shards are written in source order, so a
window of one shard would feed the trainer one source at a time (digits, then scenes), and every
loss jumps at each switch; a window spanning the sources mixes them in every batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data.shards import MANIFEST, ShardError, load_manifest, read_shard
from data.targets import Modality, decode_language_row, language_encoding


class ManifestMismatchError(ShardError):
    """Shard sets that cannot be trained on together (teacher, vocab or alignment mismatch)."""


def check_manifests(samples: dict, targets: dict[str, dict], *, expected_digests: dict[str, str | None],
                    student_vocab: int | None, where: dict[str, Path]) -> None:
    """Refuse mismatched inputs before any step, naming the folder and the fix."""
    for name, m in targets.items():
        if m["samples_config_digest"] != samples["config_digest"]:
            raise ManifestMismatchError(f"{where[name]}: targets were collected from other samples than "
                                        f"{where['samples']}; re-run `mmtp collect`")
        if len(m["shards"]) != len(samples["shards"]):
            raise ManifestMismatchError(f"{where[name]}: {len(m['shards'])} target shards for "
                                        f"{len(samples['shards'])} samples shards; re-run `mmtp collect`")
        for s, t in zip(samples["shards"], m["shards"], strict=True):
            if t["samples_sha256"] != s["sha256"] or t["rows"] != s["rows"]:
                raise ManifestMismatchError(f"{where[name] / t['file']}: does not line up with samples shard "
                                            f"{s['file']}; re-run `mmtp collect`")
        want = expected_digests.get(name)
        got = m["producer"].get("weights_digest")
        if want and want != got:
            raise ManifestMismatchError(
                f"{where[name] / MANIFEST}: shards come from teacher weights {str(got)[:12]}…, but the config "
                f"names {want[:12]}… (teachers.*.weights_digest); re-run `mmtp collect` with the configured "
                "teacher, or correct the digest in the config")
        vocab = m["producer"]["vocab_size"] if modality(m, where[name]) == Modality.language else None
        if vocab is not None and student_vocab is not None and vocab != student_vocab:
            raise ManifestMismatchError(f"{where[name]}: language teacher vocab {vocab} != student vocab "
                                        f"{student_vocab}; set student.vocab_size={vocab} (or null), or give the "
                                        "student its own tokenizer (student.tokenizer)")


def modality(manifest: dict, folder: Path) -> Modality:
    """The teacher modality a target manifest records (written by collection: teachers/contract.py)."""
    value = manifest.get("modality")
    if value not in {m.value for m in Modality}:
        raise ManifestMismatchError(f"{Path(folder) / MANIFEST}: no teacher modality recorded (got {value!r}; "
                                    "manifests before the teacher contract lack it); re-run `mmtp collect`, "
                                    "which reuses the finished shards and rewrites the manifest")
    return Modality(value)


class DistillDataset(torch.utils.data.Dataset):
    """Rows of one split: image tensor, the caption and its teacher token ids, and every teacher's targets.

    `transform` turns a sample's PNG bytes into its `pixel_values`: the student's preprocessing, which the
    layer above passes in (`student.image_transform(size)`), as data/ imports no model code.
    """

    def __init__(self, samples_dir: str | Path, target_dirs: dict[str, str | Path], split: str = "train", *,
                 transform: Callable[[bytes], torch.Tensor], verify: bool = True, open_shards: int = 8):
        self.samples_dir = Path(samples_dir)
        self.target_dirs = {n: Path(d) for n, d in target_dirs.items()}
        self.samples = load_manifest(self.samples_dir, verify)
        self.targets = {n: load_manifest(d, verify) for n, d in self.target_dirs.items()}
        kinds = {n: modality(m, self.target_dirs[n]) for n, m in self.targets.items()}
        self.language = next((n for n, k in kinds.items() if k == Modality.language), None)
        self.vision = [n for n, k in kinds.items() if k == Modality.vision]
        self.transform, self.open_shards = transform, open_shards
        self._open: OrderedDict[tuple[str, int], pa.Table] = OrderedDict()
        self.index: list[tuple[int, int]] = []  # (shard, row) of every row in `split`
        for s, entry in enumerate(self.samples["shards"]):
            splits = read_shard(self.samples_dir / entry["file"]).column("split").to_numpy(zero_copy_only=False)
            self.index += [(s, int(r)) for r in np.flatnonzero(splits == split)]
        if not self.index:
            raise ShardError(f"{self.samples_dir}: no rows in split {split!r}")

    def __len__(self) -> int:
        return len(self.index)

    def _table(self, source: str, shard: int) -> pa.Table:
        key = (source, shard)
        if key not in self._open:
            folder = self.samples_dir if source == "samples" else self.target_dirs[source]
            self._open[key] = read_shard(folder / self.samples["shards"][shard]["file"])
            while len(self._open) > self.open_shards * (1 + len(self.targets)):
                self._open.popitem(last=False)
        self._open.move_to_end(key)
        return self._open[key]

    def __getitem__(self, i: int) -> dict:
        shard, row = self.index[i]
        sample = self._table("samples", shard).slice(row, 1).to_pylist()[0]
        item = {"id": sample["id"], "caption": sample["caption"], "label": sample["label"],
                "grounded": sample["grounded"], "pixel_values": self.transform(sample["image"]),
                "vision": {}}
        for name in self.targets:
            table = self._table(name, shard)
            target_id = table.column("id")[row].as_py()
            if target_id != sample["id"]:
                raise ShardError(f"{self.target_dirs[name]}: row {row} of shard {shard} is {target_id!r}, "
                                 f"samples have {sample['id']!r}; re-run `mmtp collect`")
            if name == self.language:
                lang = decode_language_row(table, row)
                item["input_ids"] = torch.from_numpy(lang["token_ids"].astype(np.int64))
                item["lang"] = {"topk_ids": torch.from_numpy(lang["topk_ids"].astype(np.int64)),
                                "topk_logprobs": torch.from_numpy(lang["topk_logprobs"].astype(np.float32)),
                                "tail_logprob": torch.from_numpy(lang["tail_logprob"].astype(np.float32))}
                if "tempered_tail" in lang:  # exact KD at these temperatures (docs/losses.md)
                    item["lang"]["tempered_tail"] = torch.from_numpy(lang["tempered_tail"].astype(np.float32))
                    item["lang"]["tail_temperatures"] = language_encoding(table.schema)[2]
            else:
                s = table.column("summary")[row].values.to_numpy(zero_copy_only=False)
                f = table.column("features")[row].values.flatten().to_numpy(zero_copy_only=False)
                p, d = self.targets[name]["shape"]
                item["vision"][name] = {"summary": torch.from_numpy(s.astype(np.float32)),
                                        "features": torch.from_numpy(f.astype(np.float32).reshape(p, d))}
        return item

    def block_order(self, seed: int, epoch: int, window: int | None = None) -> list[int]:
        """A permutation of the rows: shards in random order, grouped `window` at a time (default
        `open_shards`, so a window's shards stay open), rows shuffled within each group."""
        window = window or self.open_shards
        rng = np.random.default_rng([seed, epoch])
        by_shard: dict[int, list[int]] = {}
        for i, (shard, _) in enumerate(self.index):
            by_shard.setdefault(shard, []).append(i)
        shards = [int(s) for s in rng.permutation(sorted(by_shard))]
        order = []
        for lo in range(0, len(shards), window):
            rows = [i for shard in shards[lo:lo + window] for i in by_shard[shard]]
            order += rng.permutation(rows).tolist()
        return order


class BlockShuffleSampler(torch.utils.data.Sampler):
    """Deterministic per (seed, epoch) window shuffle (`DistillDataset.block_order`); rank r of
    `world` takes every world-th row.

    Every rank gets the same number of rows (the tail that does not divide evenly is dropped), so
    ranks stay in step; the ranks' rows are disjoint.
    """

    def __init__(self, dataset: DistillDataset, seed: int = 0, rank: int = 0, world: int = 1):
        self.dataset, self.seed, self.rank, self.world, self.epoch = dataset, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:  # a mixed dataset's order is shorter than its index (data/mix.py)
        return getattr(self.dataset, "epoch_rows", len(self.dataset)) // self.world

    def __iter__(self):
        order = self.dataset.block_order(self.seed, self.epoch)
        return iter(order[self.rank: len(self) * self.world: self.world])


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Pad captions on the right; stack images; pad sparse teacher targets with a validity mask.

    Items moved into a student tokenizer's positions (`CrossTokenizer`) carry `exact` and `approx` masks:
    `lang["mask"]` is then the exact positions (the sparse KD) and `lang["approx"]` the others (ULD)."""
    n, length = len(items), max(len(it["input_ids"]) for it in items)
    generated = torch.tensor([[not it.get("ground_truth", True)] for it in items])
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    for b, it in enumerate(items):
        input_ids[b, : len(it["input_ids"])] = it["input_ids"]
        attention_mask[b, : len(it["input_ids"])] = 1
    batch = {"ids": [it["id"] for it in items], "pixel_values": torch.stack([it["pixel_values"] for it in items]),
             "input_ids": input_ids, "attention_mask": attention_mask,
             # CE labels: the caption tokens of ground-truth rows (data/mix.py marks generated rows)
             "labels": input_ids.masked_fill((attention_mask == 0) | generated, -100),
             "label": torch.tensor([-1 if it["label"] is None else it["label"] for it in items])}
    if "lang" in items[0]:
        k = items[0]["lang"]["topk_ids"].shape[1]
        # Position t's teacher target predicts token t+1: valid where CE has a label, so not after
        # the caption's last token (the KD mask equals the CE mask).
        mask = torch.zeros(n, length, dtype=torch.bool)
        mask[:, :-1] = attention_mask[:, 1:].bool()
        lang = {"topk_ids": torch.zeros(n, length, k, dtype=torch.long),
                "topk_logprobs": torch.zeros(n, length, k), "tail_logprob": torch.zeros(n, length),
                "mask": mask}
        temps = {it["lang"].get("tail_temperatures", ()) for it in items}
        keys = ["topk_ids", "topk_logprobs", "tail_logprob"]
        if len(temps) == 1 and (temps := temps.pop()):  # shards with different temperatures: approximate
            lang["tempered_tail"], lang["tail_temperatures"] = torch.zeros(n, length, len(temps)), temps
            keys.append("tempered_tail")
        if "exact" in items[0]["lang"]:  # a student with its own tokenizer (data/student_tokenizer.py)
            lang["exact"], lang["approx"] = torch.zeros_like(mask), torch.zeros_like(mask)
            lang["teacher_vocab_size"] = items[0]["lang"]["teacher_vocab_size"]
            keys += ["exact", "approx"]
        for b, it in enumerate(items):
            for key in keys:
                lang[key][b, : len(it["input_ids"])] = it["lang"][key]
        if "exact" in lang:  # the sparse KD where a teacher token is a student token, ULD where not
            lang["mask"], lang["approx"] = mask & lang.pop("exact"), mask & lang["approx"]
        if generated.any():  # rows the student generated: the loss's generated_kind divergence
            lang["generated"] = generated.expand(n, length).clone()
        batch["lang"] = lang
    batch["vision"] = {name: {key: torch.stack([it["vision"][name][key] for it in items])
                              for key in ("summary", "features")} for name in items[0]["vision"]}
    return batch

"""imglish.Dataset and imglish.StreamingDataset: the API, errors, exactly-once delivery across ranks and
DataLoader workers, and resume with another world size or worker count."""

import collections
import os
import shutil
import unittest

import numpy as np
import torch

import imglish
from common import dataset, tmpdir


def loader(ds, workers):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def read(batches):
    """(epoch, position, sample id) of every sample the batches read."""
    return [tuple(s) for b in batches for s in b["__samples__"]]


class DatasetTest(unittest.TestCase):
    def test_index_counts_schema_and_verify(self):
        ds = imglish.Dataset(dataset())
        self.assertEqual(len(ds), sum(ds.counts.values()))
        self.assertEqual(ds.splits, ["train", "val"])
        self.assertEqual(ds.tokenizer["grid"], [14, 14])
        names = [name for name, _ in ds.schema]
        self.assertEqual(names, ["sample_id", "tokens", "crops", "flips", "captions", "label", "split", "kind"])
        report = ds.verify()
        self.assertTrue(report["ok"], report)
        self.assertEqual(report["counts"], ds.counts)
        self.assertEqual(ds.stats()["counts"]["train"], ds.counts["train"])

    def test_errors_name_the_file_and_reason(self):
        with self.assertRaises(imglish.ImglishError) as e:
            imglish.Dataset("/nonexistent/ds")
        self.assertIn("/nonexistent/ds/index.json", str(e.exception))
        # A shard with flipped bytes: verify names it, and reading it fails naming it.
        d = os.path.join(tmpdir(self), "ds")
        shutil.copytree(dataset(), d)
        shard = sorted(f for f in os.listdir(d) if f.endswith(".arrow"))[0]
        with open(os.path.join(d, shard), "r+b") as f:
            f.seek(200)
            byte = f.read(1)
            f.seek(200)
            f.write(bytes([byte[0] ^ 0xFF]))
        report = imglish.Dataset(d).verify()
        self.assertFalse(report["ok"])
        self.assertEqual(report["bad"][0][0], shard)
        ds = imglish.StreamingDataset(d, 16, model="beit3", shuffle={"kind": "none"})
        with self.assertRaises(imglish.ImglishError) as e:
            list(ds)
        self.assertIn(shard, str(e.exception))

    def test_unknown_options_are_refused(self):
        with self.assertRaises(imglish.ImglishError) as e:
            imglish.StreamingDataset(dataset(), 4, model="beit3", batchsize=3)
        self.assertIn("unknown field `batchsize`", str(e.exception))


class StreamingTest(unittest.TestCase):
    def test_every_sample_exactly_once_across_ranks_and_workers(self):
        path = dataset()
        n = imglish.Dataset(path).counts["train"]
        seen = []
        lengths = []
        for rank in range(2):
            ds = imglish.StreamingDataset(path, 3, model="beit3", rank=rank, world_size=2)
            ds.set_epoch(1)
            batches = list(loader(ds, 2))
            lengths.append(len(batches))
            self.assertEqual([b["__batch__"] for b in batches], list(range(len(batches))))
            seen += read(batches)
        self.assertEqual(lengths[0], lengths[1], "every rank gets the same number of batches")
        self.assertEqual(sorted(p for e, p, _ in seen), list(range(n)))
        self.assertEqual({e for e, _, _ in seen}, {1})
        ids = [i for _, _, i in seen]
        self.assertEqual(len(set(ids)), n)

    def test_batches_hold_the_trainers_arrays(self):
        ds = imglish.StreamingDataset(dataset(), 16, model="beit3", depth=2)
        b = next(iter(ds))
        self.assertEqual(b["__len__"], 16)
        self.assertEqual(b["__state__"], {"epoch": 0, "position": 16})
        for kind in ("image", "text", "pair"):
            self.assertIn(f"{kind}.ids", b)
        self.assertEqual(b["image.mask"].shape, b["image.tokens"].shape)
        self.assertEqual(b["image.mask"].dtype, np.bool_)
        # 40% of 196 patches masked per image (BEiT-3's default), and exactly the predicted text tokens as targets.
        self.assertTrue((b["image.mask"].sum(axis=1) == round(0.4 * 196)).all())
        self.assertEqual(int(b["text.predict"].sum()), len(b["text.targets"]))
        self.assertFalse((b["text.predict"] & b["text.padding"]).any())
        t = imglish.batch_to_torch(b)
        self.assertEqual(t["image.tokens"].dtype, torch.int64)

    def test_resume_with_another_world_size_and_worker_count(self):
        path = dataset()
        n = imglish.Dataset(path).counts["train"]
        first = []
        k = 3
        for rank in range(2):
            ds = imglish.StreamingDataset(path, 4, model="beit3", rank=rank, world_size=2)
            batches = list(loader(ds, 2))[:k]
            first += read(batches)
            state = ds.state_dict(k)
        self.assertEqual(state, {"epoch": 0, "position": k * 4 * 2})
        self.assertEqual(sorted(p for _, p, _ in first), list(range(k * 8)))
        rest = []
        for rank in range(3):
            ds = imglish.StreamingDataset(path, 5, model="beit3", rank=rank, world_size=3)
            ds.load_state_dict(state)
            rest += read(loader(ds, 3 - rank))
        positions = sorted(p for _, p, _ in first + rest)
        self.assertEqual(positions, list(range(n)), "the rest of the epoch, no sample repeated or lost")

    def test_masks_and_views_depend_only_on_seed_epoch_and_sample(self):
        """Two ranks of 4 and one rank of 8 read the same samples per step, with identical arrays per sample."""
        path = dataset()
        one = list(imglish.StreamingDataset(path, 8, model="beit3", endless=True, max_batches=12, seed=3))
        two = [
            list(imglish.StreamingDataset(path, 4, model="beit3", endless=True, max_batches=12, seed=3, rank=r, world_size=2))
            for r in range(2)
        ]
        for step, whole in enumerate(one):
            halves = [two[0][step], two[1][step]]
            self.assertEqual(sorted(read([whole])), sorted(read(halves)))
            self.assertEqual(whole["__state__"], halves[0]["__state__"])
            for key in ("image", "pair"):
                rows = {}
                for h in halves:
                    if f"{key}.ids" in h:
                        for i, sid in enumerate(h[f"{key}.ids"]):
                            rows[int(sid)] = (h[f"{key}.tokens"][i], h[f"{key}.mask"][i])
                if f"{key}.ids" in whole:
                    for i, sid in enumerate(whole[f"{key}.ids"]):
                        tokens, mask = rows[int(sid)]
                        np.testing.assert_array_equal(tokens, whole[f"{key}.tokens"][i])
                        np.testing.assert_array_equal(mask, whole[f"{key}.mask"][i])
        # The stream goes on into the next epoch (a batch may span two), as imglish train reads it.
        self.assertEqual(one[-1]["__state__"]["epoch"], (12 * 8) // imglish.Dataset(path).counts["train"])

    def test_set_epoch_and_resume_reach_persistent_workers(self):
        path = dataset()
        n = imglish.Dataset(path).counts["train"]
        ds = imglish.StreamingDataset(path, 8, model="beit3")
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
        self.assertEqual({e for e, _, _ in read(dl)}, {0})
        ds.set_epoch(1)
        seen = read(dl)
        self.assertEqual({e for e, _, _ in seen}, {1})
        self.assertEqual(sorted(p for _, p, _ in seen), list(range(n)))
        ds.load_state_dict({"epoch": 2, "position": 40})
        seen = read(dl)
        self.assertEqual(sorted(p for _, p, _ in seen), list(range(40, n)))

    def test_samples_and_the_default_collate_give_the_batches_back(self):
        path = dataset()
        for model in ("beit", "beit3"):
            batches = list(imglish.StreamingDataset(path, 8, model=model, max_batches=4, endless=True))
            ds = imglish.StreamingDataset(path, 8, model=model, max_batches=4, endless=True, samples=True)
            dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=0, collate_fn=ds.collate)
            for whole, again in zip(batches, dl):
                arrays = {k: v for k, v in whole.items() if isinstance(v, np.ndarray)}
                self.assertEqual(sorted(arrays), sorted(k for k in again if not k.startswith("__")), model)
                for k, v in arrays.items():
                    np.testing.assert_array_equal(v, again[k], err_msg=f"{model} {k}")

    def test_epochs_reorder_and_change_masks(self):
        path = dataset()
        a = imglish.StreamingDataset(path, 8, model="beit3", shuffle={"kind": "global"})
        e0 = read(list(a))
        a.set_epoch(1)
        e1 = read(list(a))
        self.assertNotEqual([i for _, _, i in e0], [i for _, _, i in e1])
        self.assertEqual(sorted(i for _, _, i in e0), sorted(i for _, _, i in e1))
        self.assertEqual(collections.Counter(e for e, _, _ in e1), {1: len(e1)})


if __name__ == "__main__":
    unittest.main()

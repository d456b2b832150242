"""WebDataset shards: ``write-shards``, reading per rank and loader worker, exact resume,
bad shards, and ``fit`` on shards -- all on real tar files written by the command."""
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from webdataset import TarWriter

from tests.test_fit import tiny_config
from train.cli import main as cli
from train.data import resolve_data
from train.errors import UserError
from train.fit import run
from train.schema import make_config
from train.shards import ShardBatches, ShardSpec, first_crops, make_shard_loader, resolve_shards, shard_samples

SIZE = 24


def cfg_for(path, **train):
    return OmegaConf.structured(make_config(data={"image_size": SIZE, "path": str(path)}, train=train))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """The 7 built-in photographs, shorter side 40 px, in shards of 2 (the last holds 1)."""
    folder = tmp_path_factory.mktemp("shards")
    assert cli(["write-shards", "builtin", str(folder / "train-%04d.tar"), "--shard-size", "2", "--size", "40"]) == 0
    return folder


def pattern(folder):
    return str(folder / "train-{0000..0003}.tar")


def batches(loader):
    return [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in b.items()} for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["path"] == y["path"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["file_index"], y["file_index"])


def test_write_shards_writes_tars_an_index_and_the_data_pattern(shards, capsys, tmp_path):
    index = json.loads((shards / "train.json").read_text())
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [e["nsamples"] for e in index["shardlist"]] == [2, 2, 2, 1]
    keys = []
    for entry in index["shardlist"]:
        path = shards / entry["url"]
        assert os.path.getsize(path) == entry["filesize"]
        for sample in shard_samples(str(path)):
            keys.append(sample["__key__"])
            img = Image.open(io.BytesIO(sample.get("jpg") or sample["png"]))
            assert min(img.size) == 40                      # --size: shorter side reduced
    assert len(set(keys)) == 7
    # The printed --data value names exactly the shards written.
    out = tmp_path / "again"
    assert cli(["write-shards", "builtin", str(out / "x_%02d.tar"), "--shard-size", "4", "--size", "32"]) == 0
    assert "--data '" + str(out / "x_{00..01}.tar") + "'" in capsys.readouterr().out
    assert cli(["write-shards", "builtin", str(out / "no_number.tar")]) == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_batches_equal_the_uninterrupted_runs(shards, workers):
    spec = resolve_shards(cfg_for(pattern(shards)))
    assert spec.counts == [2, 2, 2, 1] and spec.n_images == 7
    common = dict(spec=spec, seed=5, batch_size=2, world_size=1, rank=0, num_workers=workers)
    full = batches(make_shard_loader(accumulate=1, start_step=0, end_step=10, **common))
    assert len(full) == 10 and full[0]["image"].dtype == torch.uint8 and full[0]["image"].shape == (2, 3, SIZE, SIZE)
    # Odd and even micro-batch offsets (each worker then plays another reader's role).
    for start in (3, 4):
        assert_same_batches(batches(make_shard_loader(accumulate=1, start_step=start, end_step=10, **common)),
                            full[start:])
    # With accumulation, micro-batches are numbered step x accumulate + micro.
    assert_same_batches(batches(make_shard_loader(accumulate=2, start_step=3, end_step=5, **common)), full[6:])
    # Over 10 micro-batches (20 samples, almost 3 epochs) every photograph is drawn.
    assert {p for b in full for p in b["path"]} == {k for s in spec.shards for k in
                                                    (x["__key__"] for x in shard_samples(s))}


def test_ranks_and_workers_read_disjoint_shards_and_skip_by_index(shards):
    spec = resolve_shards(cfg_for(pattern(shards)))
    # 2 ranks x 2 workers = 4 reader slots over 4 shards: the first round gives each its own shard.
    reader = ShardBatches(spec, 0, 1, 1, world_size=2, rank=0, start_step=0, end_step=None, readers=2)
    firsts = [next(reader.stream(slot, 0)).file_index for slot in range(4)]
    offsets = np.cumsum([0] + spec.counts)
    assert len({int(np.searchsorted(offsets, i, side="right")) - 1 for i in firsts}) == 4
    # Skipping whole shards by the index count equals reading through them (no index).
    unindexed = ShardSpec(paths=[], image_size=SIZE, shards=spec.shards, counts=None)
    plain = ShardBatches(unindexed, 0, 1, 1, world_size=2, rank=0, start_step=0, end_step=None, readers=2)
    for slot, start in ((1, 3), (2, 5)):
        a, b = reader.stream(slot, start), plain.stream(slot, start)
        assert [next(a).key for _ in range(4)] == [next(b).key for _ in range(4)]
    crops = first_crops(spec, 3, seed=0)
    assert crops.shape == (3, 3, SIZE, SIZE) and crops.min() >= -1 and crops.max() <= 1
    assert torch.equal(crops, first_crops(spec, 3, seed=0))


def _tar(path, samples):
    with open(path, "wb") as fh, TarWriter(fh, encoder=False, mtime=0.0) as sink:
        for sample in samples:
            sink.write(sample)


def _png(value):
    out = io.BytesIO()
    Image.fromarray(np.full((32, 48, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_a_sample_that_does_not_decode_is_replaced_and_counted(tmp_path, capsys):
    _tar(tmp_path / "mixed.tar", [{"__key__": "a", "png": _png(10)}, {"__key__": "bad", "jpg": b"not a jpeg"},
                                  {"__key__": "notes", "txt": b"no image here"}, {"__key__": "c", "png": _png(200)}])
    spec = resolve_shards(cfg_for(tmp_path / "mixed.tar", max_steps=1))
    assert spec.counts is None and "sample count unknown" in spec.source
    batch = next(iter(make_shard_loader(spec, 0, 4, 1, 1, 0, start_step=0, end_step=1)))
    assert int(batch["skipped"].sum()) >= 2 and "bad" not in batch["path"] and "notes" not in batch["path"]
    assert all(p in ("a", "c") for p in batch["path"]) and batch["file_index"].tolist() == [-1] * 4
    err = capsys.readouterr().err
    assert "skipping unusable sample bad" in err and "has no image member" in err


def _expect_error(match, where, **train):
    with pytest.raises(UserError, match=match):
        resolve_shards(cfg_for(where, **train))


def test_bad_shards_are_refused_before_training(shards, tmp_path, capsys):
    _expect_error("matches no file", tmp_path / "none-{0000..0003}.tar")
    _expect_error("6 of 10 shards do not exist", shards / "train-{0000..0009}.tar")
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    _expect_error("is not a tar file", tmp_path / "junk.tar")
    (tmp_path / "empty.tar").write_bytes(b"")
    _expect_error("is empty", tmp_path / "empty.tar")
    _tar(tmp_path / "text.tar", [{"__key__": "x", "txt": b"a caption, no image"}])
    _expect_error("no usable image.*has no image member", tmp_path / "text.tar")

    # Truncated after the index was written: its size gives it away.
    cut = tmp_path / "cut"
    shutil.copytree(shards, cut)
    data = (cut / "train-0002.tar").read_bytes()
    (cut / "train-0002.tar").write_bytes(data[:len(data) // 2])
    _expect_error("train-0002.tar has .* bytes but its index .* says", pattern(cut))
    # Without an index, a shard cut inside its first sample has no usable image.
    (cut / "train-0002.tar").write_bytes(data[:700])
    os.remove(cut / "train.json")
    _expect_error("no usable image.*damaged", cut / "train-0002.tar")
    _expect_error("train.max_epochs needs the number of samples", pattern(cut), max_epochs=1)

    # Other commands read files, not shards; fit says so with exit code 2, before training.
    with pytest.raises(UserError, match="read by `fit` only"):
        resolve_data(cfg_for(pattern(shards)))
    config = tiny_config(tmp_path, use_gan=False)
    assert cli(["fit", config, "--data", str(tmp_path / "none-{0..3}.tar"), "--out", str(tmp_path / "r")]) == 2
    assert "matches no file" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fit_on_shards_resumes_exactly(shards, tmp_path):
    config = tiny_config(tmp_path, use_gan=False, ckpt_every=1, image_every=100, log_every=100)
    args = ["--data", pattern(shards), "--no-bar"]
    full, part = tmp_path / "full", tmp_path / "part"
    code, trainer = run([config, "--out", str(full), "--max-steps", "3", *args])
    assert code == 0 and isinstance(trainer.data, ShardSpec)
    assert run([config, "--out", str(part), "--max-steps", "1", *args])[0] == 0
    code, resumed = run(["--resume", str(part), "--max-steps", "3", "--no-bar"])     # data from the run's config
    assert code == 0 and resumed.step == 3 and isinstance(resumed.data, ShardSpec)
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(part / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["data"]["n_images"] == 7
    assert set(a["model"]) == set(b["model"])
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key

"""distill/data.py: shard writers, checks and the streaming DataModule, on sklearn digits and image folders."""

import itertools
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

import distill.data
from distill.data import (
    ShardDataModule,
    check_shards,
    iterate_split,
    list_shards,
    read_meta,
    write_digits_shards,
    write_folder_shards,
)
from distill.errors import DataError


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    """Digits shards, written once for the module; tests that damage shards work on a copy."""
    out = tmp_path_factory.mktemp("digits") / "shards"
    write_digits_shards(out, val_fraction=0.1, seed=0, shard_size=400)
    return out


def copy_shards(src, dst):
    shutil.copytree(src, dst)
    return dst


def tar_keys(url):
    with tarfile.open(url) as tar:
        return [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".png")]


def cut_inside_sample(url, k):
    """Truncate a shard in the middle of the png of its k-th sample (its cls, stored first, stays whole)."""
    with tarfile.open(url) as tar:
        png = [m for m in tar.getmembers() if m.name.endswith(".png")][k]
    with open(url, "r+b") as f:
        f.truncate(png.offset_data + png.size // 2)


def first_batches(dm, n):
    return list(itertools.islice(iter(dm.train_dataloader()), n))


# ---------------------------------------------------------------------------------------------------------------
# Writers


def test_digits_shards_round_trip_exactly(digits_dir):
    meta = read_meta(digits_dir)
    assert meta["train"] + meta["val"] == 1797 and meta["val"] == 180
    assert (meta["num_classes"], meta["channels"], meta["resolution"]) == (10, 1, [8, 8])
    assert meta["classes"] == [str(c) for c in range(10)]
    train, val = list_shards(digits_dir, "train"), list_shards(digits_dir, "val")
    assert [u.rsplit("/", 1)[1] for u in train] == [f"train-{i:06d}.tar" for i in range(5)]  # 1617 = 4*400 + 17

    digits = load_digits()
    seen = set()
    for split, urls in (("train", train), ("val", val)):
        keys = [k for u in urls for k in tar_keys(u)]
        assert len(keys) == meta[split]  # meta counts match the shards
        images, labels = map(torch.cat, zip(*iterate_split(digits_dir, split, batch_size=128)))
        assert images.shape == (meta[split], 1, 8, 8) and images.dtype == torch.float32
        assert images.min() == -1.0 and images.max() == 1.0
        assert set(labels.tolist()) == set(range(10))
        # Map [-1, 1] back to 0..255 and then to sklearn's 0..16: must be the original, exactly.
        uint8 = torch.round((images + 1) / 2 * 255)
        values = torch.round(uint8 * 16 / 255).squeeze(1).numpy()
        index = [int(k.split("-")[1]) for k in keys]
        np.testing.assert_array_equal(values, digits.images[index])
        np.testing.assert_array_equal(labels.numpy(), digits.target[index])
        seen.update(index)
    assert seen == set(range(1797))  # train and val are disjoint and cover everything


def test_digits_shards_are_reproducible_and_refuse_to_overwrite(tmp_path, digits_dir):
    write_digits_shards(tmp_path / "same", seed=0, shard_size=400)
    write_digits_shards(tmp_path / "other", seed=1, shard_size=400)
    same = (tmp_path / "same" / "train-000000.tar").read_bytes()
    assert same == (digits_dir / "train-000000.tar").read_bytes()
    assert same != (tmp_path / "other" / "train-000000.tar").read_bytes()
    with pytest.raises(DataError, match="already contains .tar files") as info:
        write_digits_shards(tmp_path / "same")
    assert str(tmp_path / "same") in str(info.value)
    with pytest.raises(DataError, match="val_fraction"):
        write_digits_shards(tmp_path / "bad", val_fraction=1.0)


COLOURS = {"ant": (250, 10, 10), "bee": (10, 250, 10), "cat": (10, 10, 250)}  # sorted: ant=0, bee=1, cat=2


def make_image_folder(root, size=(12, 9), odd=None):
    """Three class folders of solid-colour PNG and JPEG images (plus files that must be ignored)."""
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(4):
            ext = [".png", ".jpg", ".JPEG", ".PNG"][i]
            image = Image.new("RGB", size, colour)
            image.save(root / name / f"{name}{i}{ext}", format="png" if "png" in ext.lower() else "jpeg")
        (root / name / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    if odd is not None:
        Image.new("RGB", (size[0] + 1, size[1]), (0, 0, 0)).save(root / "bee" / odd)


@pytest.mark.parametrize("channels", [3, 1])
def test_folder_shards_with_resize(tmp_path, channels):
    make_image_folder(tmp_path / "src")
    meta = write_folder_shards(tmp_path / "src", tmp_path / "out", channels=channels, resolution=6,
                               val_fraction=0.25, shard_size=5)
    assert meta == read_meta(tmp_path / "out")
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["num_classes"] == 3
    assert (meta["train"], meta["val"], meta["channels"], meta["resolution"]) == (9, 3, channels, [6, 6])
    assert len(list_shards(tmp_path / "out", "train")) == 2  # 9 samples, 5 per shard
    for split in ("train", "val"):
        images, labels = map(torch.cat, zip(*iterate_split(tmp_path / "out", split)))
        assert images.shape == (meta[split], channels, 6, 6)
        for image, label in zip(images, labels.tolist()):
            colour = COLOURS[meta["classes"][label]]
            expected = [c / 255 * 2 - 1 for c in colour]
            if channels == 1:  # PIL's L = R * 299/1000 + G * 587/1000 + B * 114/1000
                expected = [(colour[0] * 0.299 + colour[1] * 0.587 + colour[2] * 0.114) / 255 * 2 - 1]
            # JPEG is lossy: solid colours come back within a few levels.
            torch.testing.assert_close(image.mean((1, 2)), torch.tensor(expected), atol=0.05, rtol=0)


def test_folder_shards_keep_a_non_square_size(tmp_path):
    make_image_folder(tmp_path / "src", size=(10, 7))
    meta = write_folder_shards(tmp_path / "src", tmp_path / "out", val_fraction=0.0)
    assert meta["resolution"] == [7, 10] and meta["val"] == 0
    dm = ShardDataModule(tmp_path / "out", batch_size=4)
    dm.setup()
    images, _ = next(iter(dm.train_dataloader()))
    assert dm.sample_shape == (3, 7, 10) and images.shape == (4, 3, 7, 10)
    with pytest.raises(DataError, match="no val-"):
        list_shards(tmp_path / "out", "val")


def test_folder_shards_with_a_mismatched_size_name_the_file(tmp_path):
    make_image_folder(tmp_path / "src", size=(8, 8), odd="zz_odd.png")
    with pytest.raises(DataError, match=r"zz_odd\.png is 9x8, expected 8x8"):
        write_folder_shards(tmp_path / "src", tmp_path / "out")
    assert not list(tmp_path.glob("out/*.tar"))
    # Resizing makes them agree.
    meta = write_folder_shards(tmp_path / "src", tmp_path / "out", resolution=8)
    assert meta["train"] + meta["val"] == 13


def stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def save_truncated_png(file, size=(12, 9)):
    """A PNG whose header is valid and whose pixel data is cut in half: it opens, and fails only when decoded."""
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(file, format="png")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def assert_labels_match_colours(out, meta, colours):
    """Every sample of both splits has the colour of the class that meta["classes"][label] names."""
    n = 0
    for split in ("train", "val"):
        if meta[split] == 0:
            continue
        for images, labels in iterate_split(out, split):
            for image, label in zip(images, labels.tolist()):
                expected = torch.tensor([c / 255 * 2 - 1 for c in colours[meta["classes"][label]]])
                torch.testing.assert_close(image.mean((1, 2)), expected, atol=0.05, rtol=0)  # JPEG: a few levels
                n += 1
    assert n == meta["train"] + meta["val"]


def test_folder_shards_skip_empty_class_folders_with_a_warning_each(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src)
    (src / "bat").mkdir()  # empty; sorts between ant and bee, so an index given to it would shift bee and cat
    (src / "dog" / "2024").mkdir(parents=True)  # images one level down are not searched: dog holds none
    Image.new("RGB", (12, 9), (0, 0, 0)).save(src / "dog" / "2024" / "d.png")
    (src / "dog" / "notes.txt").write_text("no images here")
    meta = write_folder_shards(src, tmp_path / "out", val_fraction=0.25)
    assert meta == read_meta(tmp_path / "out")
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["num_classes"] == 3
    assert meta["skipped_classes"] == ["bat", "dog"] and meta["skipped_images"] == 0
    assert meta["train"] + meta["val"] == 12
    lines = stderr_lines(capsys)
    assert len(lines) == 2  # one line per skipped folder, naming it
    assert str(src / "bat") in lines[0] and str(src / "dog") in lines[1]
    assert all("skipping class folder" in line and "no .png/.jpg/.jpeg images" in line for line in lines)
    assert_labels_match_colours(tmp_path / "out", meta, COLOURS)


def test_folder_shards_sort_class_folders_naturally(tmp_path):
    names = ["10", "2", "c10", "1", "b", "c2"]
    colours = {name: (40 * i, 250 - 40 * i, 128) for i, name in enumerate(names)}
    for name, colour in colours.items():
        (tmp_path / "src" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4), colour).save(tmp_path / "src" / name / "x.png")
    meta = write_folder_shards(tmp_path / "src", tmp_path / "out", val_fraction=0.0)
    # Numbers compare as numbers ("2" < "10", "c2" < "c10"); meta lists the names in index order.
    assert meta["classes"] == ["1", "2", "10", "b", "c2", "c10"] and meta["num_classes"] == 6
    assert read_meta(tmp_path / "out")["classes"] == meta["classes"]
    assert_labels_match_colours(tmp_path / "out", meta, colours)


def test_folder_shards_skip_unreadable_images_with_a_warning_each(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src)
    (src / "ant" / "empty.png").write_bytes(b"")
    save_truncated_png(src / "bee" / "cut.png")  # fails only when its pixels are decoded
    (src / "cat" / "broken.jpg").write_bytes(b"this is not a jpeg")
    meta = write_folder_shards(src, tmp_path / "out", val_fraction=0.25)
    assert meta == read_meta(tmp_path / "out")
    assert meta["skipped_images"] == 3 and meta["skipped_classes"] == []
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["train"] + meta["val"] == 12
    lines = stderr_lines(capsys)
    assert len(lines) == 3  # one line per skipped file, naming it and the reason
    for file in (src / "ant" / "empty.png", src / "bee" / "cut.png", src / "cat" / "broken.jpg"):
        assert sum(str(file) in line for line in lines) == 1
    assert all(line.startswith("warning: skipping unreadable image") for line in lines)
    assert any("cut.png" in line and "truncated" in line for line in lines)
    assert_labels_match_colours(tmp_path / "out", meta, COLOURS)


def test_folder_shards_skip_a_class_folder_whose_images_are_all_unreadable(tmp_path, capsys):
    src = tmp_path / "src"
    make_image_folder(src)
    (src / "bat").mkdir()
    save_truncated_png(src / "bat" / "b0.png")
    (src / "bat" / "b1.jpg").write_bytes(b"junk")
    meta = write_folder_shards(src, tmp_path / "out", val_fraction=0.25)
    assert meta["classes"] == ["ant", "bee", "cat"] and meta["num_classes"] == 3
    assert meta["skipped_classes"] == ["bat"] and meta["skipped_images"] == 2
    lines = stderr_lines(capsys)
    assert len(lines) == 3
    bat = f"skipping class folder {src / 'bat'}: no readable image"
    assert sum(bat in line for line in lines) == 1
    assert_labels_match_colours(tmp_path / "out", meta, COLOURS)


def test_folder_shards_refuse_a_folder_without_a_readable_image(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.png").write_bytes(b"junk")
    save_truncated_png(src / "a" / "y.png")
    message = rf"image folder {src} has no readable image: all 2 failed to decode; expected PNG or JPEG files"
    with pytest.raises(DataError, match=message):
        write_folder_shards(src, tmp_path / "out")
    assert len(stderr_lines(capsys)) == 2  # the skipped files were named first
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (src / "a").iterdir()) == ["x.png", "y.png"]  # the user's files are untouched


def test_folder_shards_stop_and_clean_up_when_an_image_breaks_while_writing(tmp_path, monkeypatch):
    src = tmp_path / "src"
    make_image_folder(src)
    encode = distill.data._encode_png

    def encode_and_break_cat(array):  # the folder changes after the check, as when another program writes to it
        for file in (src / "cat").glob("cat*"):
            file.write_bytes(b"gone")
        return encode(array)

    monkeypatch.setattr(distill.data, "_encode_png", encode_and_break_cat)
    with pytest.raises(DataError, match=r"cannot read image .*cat[0-9]\.\w+: .*expected a PNG or JPEG file"):
        write_folder_shards(src, tmp_path / "out", shard_size=2)
    assert not list(tmp_path.glob("out/*.tar"))  # partial shards are removed, so the same command can run again


def test_folder_shards_reject_missing_or_empty_folders(tmp_path):
    with pytest.raises(DataError, match=r"missing_src does not exist"):
        write_folder_shards(tmp_path / "missing_src", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no class subfolders"):
        write_folder_shards(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "a").mkdir()
    (tmp_path / "empty" / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"empty has no images"):
        write_folder_shards(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Listing and checking


def test_list_shards_and_read_meta_name_the_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere does not exist; expected train-\*\.tar shards written by"):
        list_shards(tmp_path / "nowhere")
    with pytest.raises(DataError, match=rf"{tmp_path} has no train-\*\.tar shards"):
        list_shards(tmp_path)
    with pytest.raises(DataError, match=r"missing .*meta\.json"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*meta\.json"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"num_classes": 10}))
    with pytest.raises(DataError, match=r"lacks channels, resolution"):
        read_meta(tmp_path)


def test_check_shards_skips_bad_shards_with_a_warning_each(tmp_path, digits_dir):
    shards = copy_shards(digits_dir, tmp_path / "shards")
    half = shards / "train-000001.tar"
    half.write_bytes(half.read_bytes()[: 700])  # inside the first sample
    (shards / "train-000009.tar").write_bytes(b"garbage" * 300)
    (shards / "train-000010.tar").write_bytes(b"")
    urls = list_shards(shards)
    with pytest.warns(UserWarning) as record:
        good = check_shards(urls)
    assert good == [str(shards / f"train-00000{i}.tar") for i in (0, 2, 3, 4)]
    messages = [str(w.message) for w in record if "skipping unreadable shard" in str(w.message)]
    assert len(messages) == 3
    for name in ("train-000001.tar", "train-000009.tar", "train-000010.tar"):
        assert sum(name in m for m in messages) == 1

    bad = [str(half), str(shards / "train-000009.tar")]
    with pytest.warns(UserWarning, match="skipping unreadable shard"):
        with pytest.raises(DataError, match=rf"no readable sample in any of the 2 shards under {shards}"):
            check_shards(bad)


# ---------------------------------------------------------------------------------------------------------------
# Streaming


def test_datamodule_streams_endless_batches(digits_dir):
    dm = ShardDataModule(digits_dir, batch_size=64, shuffle_buffer=500)
    assert dm.num_classes == 10 and dm.sample_shape == (1, 8, 8)
    dm.setup()
    batches = first_batches(dm, 60)  # 3840 samples: more than twice the 1617 training samples
    for images, labels in batches:
        assert images.shape == (64, 1, 8, 8) and images.dtype == torch.float32
        assert labels.shape == (64,) and labels.dtype == torch.int64
        assert images.min() >= -1.0 and images.max() <= 1.0
    labels = torch.cat([b[1] for b in batches])
    assert set(labels.tolist()) == set(range(10))
    # Shuffled: the first batch is not dominated by one shard's write order (which is itself random) nor one class.
    assert len(set(batches[0][1].tolist())) >= 8


def test_datamodule_is_reproducible_per_seed_and_rank(digits_dir, monkeypatch):
    def batches(seed):
        dm = ShardDataModule(digits_dir, batch_size=32, seed=seed, shuffle_buffer=200)
        dm.setup()
        return first_batches(dm, 5)

    a, b, c = batches(0), batches(0), batches(1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not all(torch.equal(xa, xc) for (xa, _), (xc, _) in zip(a, c))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    r1 = batches(0)
    assert not all(torch.equal(xa, xr) for (xa, _), (xr, _) in zip(a, r1))


def test_shard_corrupted_mid_stream_is_skipped_and_the_stream_goes_on(tmp_path, digits_dir):
    shards = copy_shards(digits_dir, tmp_path / "shards")
    dm = ShardDataModule(shards, batch_size=50, shuffle_buffer=100)
    dm.setup()  # all shards are fine here
    cut_inside_sample(shards / "train-000002.tar", k=5)  # damaged after the check, as on a flaky disk
    with pytest.warns(UserWarning) as record:
        batches = first_batches(dm, 120)  # 6000 samples: about 15 shard draws of 5 shards
    messages = [str(w.message) for w in record]
    assert any("skipping unreadable shard" in m and "train-000002.tar after 5 samples" in m for m in messages)
    assert len(batches) == 120 and all(x.shape == (50, 1, 8, 8) for x, _ in batches)
    assert dm.stats.skipped_shards >= 1
    # The sample whose png was cut kept its cls: it is dropped with its own warning, not passed on half-made.
    assert dm.skipped_samples >= 1
    assert any("expected png and cls" in m and "train-000002.tar" in m for m in messages)


def test_stream_raises_when_every_shard_goes_bad(tmp_path, digits_dir):
    shards = copy_shards(digits_dir, tmp_path / "shards")
    dm = ShardDataModule(shards, batch_size=8)
    dm.setup()
    for url in list_shards(shards):
        open(url, "wb").close()
    with pytest.warns(UserWarning, match="skipping unreadable shard"):
        with pytest.raises(DataError, match=r"no readable sample in the last 100 shards"):
            first_batches(dm, 1)


def test_datamodule_setup_refuses_a_folder_without_good_shards(tmp_path):
    with pytest.raises(DataError, match="missing .*meta.json"):
        ShardDataModule(tmp_path, batch_size=8).setup()
    with pytest.raises(DataError, match="batch_size"):
        ShardDataModule(tmp_path, batch_size=0)

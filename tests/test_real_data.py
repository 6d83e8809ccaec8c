"""The GAN term's real data: RealData (random access over image, caption and latent shards, batches that are a
function of a torch.Generator), `write_latent_shards` and `distill data latents`."""

from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from distill.cli import main
from distill.data import (
    RealData,
    iterate_captions,
    iterate_split,
    read_meta,
    write_caption_shards,
    write_folder_shards,
    write_latent_shards,
)
from distill.errors import DataError


def _tar_members(url: Path) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(url) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite_shard(url: Path, members: list[tuple[str, bytes]]) -> None:
    """Write `members` (name, bytes) as the tar file `url`, as webdataset's TarWriter would."""
    url.unlink()
    with wds.TarWriter(str(url), mtime=0) as sink:
        samples: dict[str, dict] = {}
        for name, data in members:
            key, _, suffix = name.partition(".")
            samples.setdefault(key, {"__key__": key})[suffix] = data
        for sample in samples.values():
            sink.write(sample)


@pytest.fixture(scope="module")
def images16(tmp_path_factory) -> Path:
    """16 px grayscale PNGs in three class subfolders (4, 3 and 3 images), random seeded pixels."""
    rng = np.random.default_rng(0)
    src = tmp_path_factory.mktemp("images16") / "src"
    for c, n in (("a", 4), ("b", 3), ("c", 3)):
        (src / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(src / c / f"{i}.png")
    out = src.parent / "shards"
    write_folder_shards(src, out, channels=1, val_fraction=0.2, seed=0, shard_size=3)
    return out


@pytest.fixture(scope="module")
def captions16(tmp_path_factory) -> Path:
    """Caption shards of 10 16 px grayscale PNGs captioned `picture <i>`, in shards of 4."""
    rng = np.random.default_rng(1)
    src = tmp_path_factory.mktemp("captions16") / "src"
    src.mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L").save(src / f"p{i}.png")
        (src / f"p{i}.txt").write_text(f"picture {i}\n")
    out = src.parent / "shards"
    write_caption_shards(src, out, channels=1, val_fraction=0.2, seed=0, shard_size=4)
    return out


# ----------------------------------------------------------------------------------------------------------------
# RealData over image and caption shards


def test_get_returns_the_samples_that_iterate_split_yields(digits_shards):
    for split in ("train", "val"):
        data = RealData(digits_shards, split)
        images, labels = map(torch.cat, zip(*iterate_split(digits_shards, split, batch_size=500)))
        assert len(data) == len(labels) == read_meta(digits_shards)[split]
        assert data.kind == "images" and data.sample_shape == (1, 8, 8) and data.num_classes == 10
        batch = data.get(list(range(len(data))))
        assert torch.equal(batch.x, images) and torch.equal(batch.labels, labels) and batch.captions is None
        assert batch.x.dtype == torch.float32 and batch.labels.dtype == torch.int64
    # any order, repeats allowed, each shard read once per call
    picks = [1500, 3, 1500, 600]
    batch = RealData(digits_shards, "train").get(picks)
    train_images, train_labels = map(torch.cat, zip(*iterate_split(digits_shards, "train", batch_size=500)))
    assert torch.equal(batch.x, train_images[picks]) and torch.equal(batch.labels, train_labels[picks])
    with pytest.raises(DataError, match=r"indices \[1617\]; expected a non-empty list of indices in \[0, 1617\)"):
        RealData(digits_shards, "train").get([0, 1617])


def test_draw_is_a_function_of_the_generator_in_a_fresh_object(digits_shards):
    a = RealData(digits_shards).draw(64, torch.Generator().manual_seed(7))
    fresh = RealData(digits_shards)
    b = fresh.draw(64, torch.Generator().manual_seed(7))
    assert torch.equal(a.x, b.x) and torch.equal(a.labels, b.labels)
    # the contract: the indices are torch.randint(len, (n,), generator)
    expected = fresh.get(torch.randint(len(fresh), (64,), generator=torch.Generator().manual_seed(7)).tolist())
    assert torch.equal(a.x, expected.x)
    c = fresh.draw(64, torch.Generator().manual_seed(8))
    assert not torch.equal(a.x, c.x)
    # a resumed run restores the generator state, whatever was drawn before in this process
    g = torch.Generator().manual_seed(3)
    fresh.draw(5, g)
    state = g.get_state()
    after = fresh.draw(16, g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(pickle.loads(pickle.dumps(fresh)).draw(16, g2).x, after.x)  # also after a pickle (DDP)
    with pytest.raises(DataError, match="needs a CPU torch.Generator"):
        fresh.draw(4, None)


def test_draws_are_uniform_over_the_samples(digits_shards, monkeypatch):
    data = RealData(digits_shards)
    drawn = []
    monkeypatch.setattr(data, "get", lambda indices: drawn.extend(indices))
    g = torch.Generator().manual_seed(0)
    per_sample = 40
    for _ in range(per_sample):
        data.draw(len(data), g)
    counts = np.bincount(drawn, minlength=len(data))
    assert len(counts) == len(data)
    # each count is Binomial(M, 1/N): within 6 standard errors (a miss has probability < 1e-5 over all N)
    sd = math.sqrt(len(drawn) / len(data) * (1 - 1 / len(data)))
    assert np.abs(counts - per_sample).max() < 6 * sd, (counts.min(), counts.max())
    # and the chi-square over all samples within 5 of its standard deviations of its mean (N - 1)
    chi2 = ((counts - per_sample) ** 2 / per_sample).sum()
    assert abs(chi2 - (len(data) - 1)) < 5 * math.sqrt(2 * (len(data) - 1)), chi2


def test_our_shards_are_indexed_without_tarfile_and_other_tars_with_it(digits_shards, tmp_path, monkeypatch):
    import io
    import tarfile

    import distill.data

    # a tar with pax headers (names over 100 characters): the fast ustar reader hands it to tarfile
    folder = tmp_path / "pax"
    folder.mkdir()
    meta = dict(read_meta(digits_shards), train=2, val=0)
    (folder / "meta.json").write_text(json.dumps(meta))
    first = RealData(digits_shards).get([0, 1])
    with tarfile.open(folder / "train-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        for j, key in enumerate(("k" * 120, "short")):
            png = io.BytesIO()
            Image.fromarray(((first.x[j, 0].numpy() + 1) / 2 * 255).round().astype(np.uint8), "L").save(png, "png")
            for suffix, data in (("png", png.getvalue()), ("cls", str(int(first.labels[j])).encode())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    pax = RealData(folder)
    assert pax.keys == ["k" * 120, "short"]
    batch = pax.get([0, 1])
    assert torch.equal(batch.x, first.x) and torch.equal(batch.labels, first.labels)
    # what `distill data` writes is read header by header, without tarfile (about 50 us a member)
    monkeypatch.setattr(distill.data.tarfile, "open", lambda *a, **k: pytest.fail("tarfile used"))
    assert len(RealData(digits_shards)) == read_meta(digits_shards)["train"]


@pytest.mark.parametrize("damage", ["cut in a file", "cut at a header", "header damaged"])
def test_a_truncated_or_damaged_shard_is_one_error_naming_it(digits_shards, tmp_path, damage):
    folder = tmp_path / "digits"
    shutil.copytree(digits_shards, folder)
    url = folder / "train-000001.tar"
    data = url.read_bytes()
    if damage == "cut in a file":
        url.write_bytes(data[:len(data) // 2 + 100])
    elif damage == "cut at a header":  # the member list just ends there: only the missing end block tells
        url.write_bytes(data[:512 * 40])
        assert _tar_members_prefix_ok(url)
    else:
        damaged = bytearray(data)
        damaged[512 * 40 + 10] ^= 0xFF  # a byte of a member's name, in the middle of the archive
        url.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"^(cannot read )?shard \S*/train-000001\.tar") as info:
        RealData(folder)
    assert "\n" not in str(info.value)


def test_a_shard_cut_short_after_indexing_is_an_error_naming_the_sample(digits_shards, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(digits_shards, folder)
    data = RealData(folder)
    url = folder / "train-000000.tar"
    url.write_bytes(url.read_bytes()[:len(url.read_bytes()) // 2])
    with pytest.raises(DataError, match=rf"sample {data.keys[499]} of \S*/train-000000\.tar is cut short \(0 of "
                                        r"\d+ bytes\): the shard changed since it was indexed"):
        data.get([499])


def _tar_members_prefix_ok(url: Path) -> bool:
    """The cut is at a member header: tarfile lists what comes before it without an error."""
    import tarfile

    with tarfile.open(url) as tar:
        return len(tar.getmembers()) > 0


def test_a_corrupt_member_is_an_error_naming_shard_and_key_every_time(digits_shards, tmp_path):
    folder = tmp_path / "digits"
    shutil.copytree(digits_shards, folder)
    url = folder / "train-000000.tar"
    members = _tar_members(url)
    bad_key = members[20][0].partition(".")[0]
    members = [(name, b"\x89PNG\r\n\x1a\n not a png" if name == f"{bad_key}.png" else data) for name, data in members]
    _rewrite_shard(url, members)
    data = RealData(folder)
    bad = data.keys.index(bad_key)
    assert data.get([bad + 1]).x.shape == (1, 1, 8, 8)  # the others read fine
    for _ in range(2):  # never skipped: the same index fails the same way
        with pytest.raises(DataError, match=rf"sample {bad_key} of .*train-000000\.tar cannot be decoded"):
            data.get([0, bad])
    # a sample without its label is found when indexing
    _rewrite_shard(url, [(n, d) for n, d in members if n != f"{bad_key}.cls"])
    with pytest.raises(DataError, match=rf"sample {bad_key} of .*train-000000\.tar has files \['png'\], expected "
                                        r"png and cls"):
        RealData(folder)


def test_caption_shards_give_their_captions(captions16):
    data = RealData(captions16, "train")
    assert data.kind == "captions" and data.sample_shape == (1, 16, 16) and data.num_classes is None
    images, captions = zip(*iterate_captions(captions16, "train", batch_size=100))
    batch = data.get(list(range(len(data))))
    assert torch.equal(batch.x, torch.cat(images)) and batch.captions == [c for cs in captions for c in cs]
    assert batch.labels is None and len(data) == 8 and len(RealData(captions16, "val")) == 2
    assert all(c.startswith("picture ") for c in batch.captions)


def test_prompt_shards_are_refused(digit_prompt_shards):
    with pytest.raises(DataError, match=r"holds prompt shards .*no images; expected image, caption or latent"):
        RealData(digit_prompt_shards)


# ----------------------------------------------------------------------------------------------------------------
# Latent shards


def _encode_like_the_writer(teacher: Path, src: Path, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """codec.encode of every source image, train then val, in batches, with one generator seeded by `seed`."""
    from distill.teachers import load_teacher

    codec = load_teacher(teacher).codec
    g = torch.Generator().manual_seed(seed)
    out = {}
    for split in ("train", "val"):
        data = RealData(src, split)
        for start in range(0, len(data), batch_size):
            idx = list(range(start, min(start + batch_size, len(data))))
            z = codec.encode(data.get(idx).x, g)
            out.update({data.keys[i]: z[j] for j, i in enumerate(idx)})
    return out


def _float16_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float16 rounding of b: half an ulp, 2**-11 relative (normal numbers)."""
    return bool(((a - b).abs() <= b.abs() * 2.0 ** -11 + 2.0 ** -24).all())


@pytest.mark.parametrize("source", ["captions", "images"])
def test_latents_are_the_vae_encoding_with_the_seed_and_keep_keys_splits_and_conditions(
        tiny_pipelines, captions16, images16, tmp_path, source):
    teacher, src = tiny_pipelines["sd15"], captions16 if source == "captions" else images16
    out = tmp_path / "latents"
    meta = write_latent_shards(teacher, src, out, batch_size=3, seed=5)
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["kind"] == "latents" and meta["latent_shape"] == [4, 8, 8] and meta["image_shape"] == [1, 16, 16]
    assert meta["teacher"] == str(teacher.resolve()) and meta["source"] == str(src.resolve())
    assert meta["source_kind"] == source and meta["scaling_factor"] == 0.5 and meta["dtype"] == "float16"
    assert ("num_classes" in meta) == (source == "images")
    expected = _encode_like_the_writer(teacher, src, batch_size=3, seed=5)
    other_seed = _encode_like_the_writer(teacher, src, batch_size=3, seed=6)
    worst = 0.0
    for split in ("train", "val"):
        latents, images = RealData(out, split), RealData(src, split)
        assert latents.kind == "latents" and latents.sample_shape == (4, 8, 8)
        assert latents.keys == images.keys and len(latents) == meta[split] > 0  # the same samples, in order
        got, real = latents.get(list(range(len(latents)))), images.get(list(range(len(images))))
        assert got.x.dtype == torch.float32
        ref = torch.stack([expected[k] for k in latents.keys])
        assert _float16_close(got.x, ref)
        assert not torch.allclose(got.x, torch.stack([other_seed[k] for k in latents.keys]), atol=1e-3)
        worst = max(worst, (got.x - ref).abs().max().item())
        if source == "captions":
            assert got.captions == real.captions and got.labels is None
        else:
            assert torch.equal(got.labels, real.labels) and got.captions is None
            assert latents.num_classes == 3
    assert meta["float16_max_abs_error"] == pytest.approx(worst, rel=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]  # no temporary folder left behind


def test_latents_refuse_an_existing_folder_unless_overwrite_and_keep_it_intact(tiny_pipelines, captions16, tmp_path):
    teacher, out = tiny_pipelines["sd15"], tmp_path / "latents"
    write_latent_shards(teacher, captions16, out, seed=0)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError, match=rf"output folder {out} is not empty; expected a new or empty folder \(or "
                                        r"--overwrite\)"):
        write_latent_shards(teacher, captions16, out, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    write_latent_shards(teacher, captions16, out, seed=1, overwrite=True)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys() and after["train-000000.tar"] != before["train-000000.tar"]
    assert json.loads(after["meta.json"])["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latents"]  # the old folder and the temporary one gone
    with pytest.raises(DataError, match="holds the source folder"):
        write_latent_shards(teacher, captions16, captions16.parent, overwrite=True)


def test_latents_refuse_a_pixel_teacher_a_size_mismatch_and_prompts_before_writing(
        tiny_pipelines, tiny_teacher, digits_shards, digit_prompt_shards, captions16, tmp_path):
    out = tmp_path / "new" / "latents"
    with pytest.raises(DataError, match=rf"teacher {tiny_teacher} is a pixel-space teacher .*no VAE"):
        write_latent_shards(tiny_teacher, captions16, out)
    with pytest.raises(DataError, match=r"holds images of shape \(1, 8, 8\) \(C, H, W\); the VAE of .* takes "
                                        r"\(1, 16, 16\) \(its unet's sample_size 8x8 times the VAE's scale factor 2\)"):
        write_latent_shards(tiny_pipelines["sd15"], digits_shards, out)
    with pytest.raises(DataError, match=r"holds prompt shards; expected images with labels"):
        write_latent_shards(tiny_pipelines["sd15"], digit_prompt_shards, out)
    with pytest.raises(DataError, match=r"batch_size must be a positive number"):
        write_latent_shards(tiny_pipelines["sd15"], captions16, out, batch_size=0)
    assert not (tmp_path / "new").exists()


def test_latent_shards_are_refused_by_the_image_readers(tiny_pipelines, images16, tmp_path):
    out = tmp_path / "latents"
    write_latent_shards(tiny_pipelines["sd15"], images16, out)
    with pytest.raises(DataError, match=r"holds latent shards \(meta\.json kind 'latents', written by `distill data "
                                        r"latents`\), not images"):
        read_meta(out)


# ----------------------------------------------------------------------------------------------------------------
# The command


def test_data_latents_cli(tiny_pipelines, images16, tiny_teacher, tmp_path, capsys):
    out = tmp_path / "latents"
    code = main(["data", "latents", "--teacher", str(tiny_pipelines["sd15"]), "--src", str(images16), "--out",
                 str(out), "--batch-size", "4", "--seed", "2"])
    printed = capsys.readouterr()
    meta = json.loads((out / "meta.json").read_text())
    assert code == 0, printed.err
    assert (f"wrote {meta['train']} train and {meta['val']} val latents (3 classes, 4x8x8 float16" in printed.out
            and meta["seed"] == 2 and meta["batch_size"] == 4)
    for bad, what in (([str(tiny_teacher), str(images16), str(tmp_path / "x")], "pixel-space teacher"),
                      ([str(tiny_pipelines["sd15"]), str(tmp_path / "missing"), str(tmp_path / "y")], "missing"),
                      ([str(tiny_pipelines["sd15"]), str(images16), str(out)], "not empty")):
        code = main(["data", "latents", "--teacher", bad[0], "--src", bad[1], "--out", bad[2]])
        err = capsys.readouterr().err
        assert code == 2 and what in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    code = main(["data", "latents", "--teacher", str(tiny_pipelines["sd15"]), "--src", str(images16), "--out",
                 str(tmp_path / "z"), "--device", "tpu"])
    err = capsys.readouterr().err
    assert code == 2 and "device 'tpu'" in err and not (tmp_path / "z").exists()


def test_data_latents_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as info:
        main(["data", "latents", "--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for option in ("--teacher", "--src", "--out", "--batch-size", "--seed", "--device", "--overwrite"):
        assert option in text


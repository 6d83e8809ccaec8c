"""Prompts and captions as data (distill/data.py): `distill data prompts` and `distill data captions`, their bad
inputs, and the readers that training calls (read_prompts, shard_kind, iterate_captions)."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

import distill.data
from distill.data import (
    ShardDataModule,
    check_shards,
    first_sample,
    iterate_captions,
    list_shards,
    read_meta,
    read_prompts,
    shard_kind,
    write_caption_shards,
    write_folder_shards,
    write_prompt_shards,
)
from distill.errors import DataError

from conftest import run_cli

# Line 1 is a prompt, line 3 is blank, line 6 only whitespace; a repeat, non-ASCII text and CRLF endings.
LINES = ["a handwritten zero", "  a photo of a cat  ", "", "ein Hund im Schnee, größer", "a handwritten zero",
         " \t ", "数字 七", "a red cube on a blue sphere\r", "last"]
PROMPTS = [line.strip() for line in LINES if line.strip()]


def tar_texts(url):
    """(key, text) of the .txt members of a shard, read with tarfile: what the shard really holds, in order."""
    with tarfile.open(url) as tar:
        return [(m.name.split(".")[0], tar.extractfile(m).read().decode()) for m in tar.getmembers()
                if m.name.endswith(".txt")]


def stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def prompt_file(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_bytes("\n".join(LINES * 3).encode() + b"\n")  # 27 lines, 21 prompts, 6 blank
    return file


# ---------------------------------------------------------------------------------------------------------------
# Prompts


def test_prompt_shards_round_trip_in_shard_order(tmp_path, prompt_file):
    out = tmp_path / "out"
    meta = write_prompt_shards(prompt_file, out, val_fraction=0.2, seed=3, shard_size=4)
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["kind"], meta["train"], meta["val"], meta["skipped_blank"]) == ("prompts", 17, 4, 6)
    assert meta["source"] == str(prompt_file)
    lines = prompt_file.read_text().split("\n")
    read = {}
    for split in ("train", "val"):
        urls = list_shards(out, split)
        assert len(urls) == -(-meta[split] // 4)
        in_shards = [item for url in urls for item in tar_texts(url)]
        prompts = read_prompts(out, split)
        assert prompts == [text for _, text in in_shards]  # shard order, then sample order
        for key, text in in_shards:  # the key names the prompt's line in the file
            assert key.startswith("line-") and text == lines[int(key[5:]) - 1].strip()
        read[split] = prompts
    assert sorted(read["train"] + read["val"]) == sorted(PROMPTS * 3)  # every prompt once, repeats kept
    assert read_prompts(out) == read["train"]  # train is the default split, and the order is fixed
    # The split depends on the seed only: the same seed writes the same shards, byte for byte.
    again = write_prompt_shards(prompt_file, tmp_path / "again", val_fraction=0.2, seed=3, shard_size=4)
    assert again == meta
    for url in list_shards(out) + list_shards(out, "val"):
        assert (tmp_path / "again" / url.rsplit("/", 1)[1]).read_bytes() == open(url, "rb").read()


def test_prompt_file_with_a_bom_and_blank_lines(tmp_path, capsys):
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbf" + "first\r\n\r\n   \r\nsecond\r\n\r\n".encode())
    meta = write_prompt_shards(src, tmp_path / "out", val_fraction=0.0)
    assert (meta["train"], meta["val"], meta["skipped_blank"]) == (2, 0, 3)
    assert sorted(read_prompts(tmp_path / "out")) == ["first", "second"]  # no "\ufeff" before "first", no "\r"
    assert stderr_lines(capsys) == []  # not a terminal: no progress bar


@pytest.mark.parametrize("content, message", [
    (None, r"prompt file .*absent\.txt does not exist; expected a UTF-8 text file with one prompt per line"),
    ("folder", r"prompt file .*bad\.txt is a folder; expected a UTF-8 text file"),
    (b"", r"prompt file .*bad\.txt is empty; expected"),
    (b"\xef\xbb\xbf", r"prompt file .*bad\.txt is empty; expected"),
    (b"\n  \n\t\r\n", r"prompt file .*bad\.txt has no prompt: all 3 lines are blank; expected"),
    (b"ok\nfine\ncaf\xe9 au lait\n", r"prompt file .*bad\.txt: line 3 is not UTF-8 \(byte 0xe9 at byte 4 of the line"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", r"prompt file .*bad\.txt: line 1 is not UTF-8 \(byte 0x89"),
    (b"one\ntwo\x00three\n", r"prompt file .*bad\.txt: line 2 holds a NUL character"),
])
def test_bad_prompt_files_stop_with_one_line_naming_them(tmp_path, content, message):
    src = tmp_path / ("absent.txt" if content is None else "bad.txt")
    if content == "folder":
        src.mkdir()
    elif content is not None:
        src.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        write_prompt_shards(src, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing is written before the input is known to be good


def test_writers_refuse_a_folder_that_holds_shards_and_touch_nothing(tmp_path, prompt_file):
    out = tmp_path / "out"
    write_prompt_shards(prompt_file, out, shard_size=8)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    with pytest.raises(DataError, match=rf"shard folder {out} already contains \.tar files; expected an empty"):
        write_prompt_shards(prompt_file, out)
    with pytest.raises(DataError, match=r"already contains \.tar files"):
        write_caption_shards(make_caption_folder(tmp_path / "caps"), out)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before


def test_a_failed_write_leaves_no_shard_behind(tmp_path, prompt_file, monkeypatch):
    calls = []

    def replace_and_break(src, dst):  # the second shard fails to move in, as on a full disk
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    real_replace = distill.data.os.replace
    monkeypatch.setattr(distill.data.os, "replace", replace_and_break)
    with pytest.raises(OSError, match="No space"):
        write_prompt_shards(prompt_file, tmp_path / "out", shard_size=4)
    monkeypatch.undo()
    # The first shard had been moved in: it is removed again, and so is the hidden folder the shards were written in.
    assert len(calls) == 2 and list((tmp_path / "out").iterdir()) == []
    write_prompt_shards(prompt_file, tmp_path / "out", shard_size=4)  # the same command runs again


def test_read_prompts_parses_our_shards_itself_and_other_tars_with_tarfile(tmp_path, prompt_file, monkeypatch):
    out = tmp_path / "out"
    write_prompt_shards(prompt_file, out, val_fraction=0.0, shard_size=5)
    expected = [text for url in list_shards(out) for _, text in tar_texts(url)]

    def no_tarfile(*args, **kwargs):
        raise AssertionError("tarfile used for a shard that distill wrote")

    with monkeypatch.context() as patch:  # the fast path reads what the writer wrote, with no help from tarfile
        patch.setattr(distill.data.tarfile, "open", no_tarfile)
        assert read_prompts(out) == expected
    # A shard written by another tool (a pax header for a non-ASCII name; a directory member) goes to tarfile.
    other = tmp_path / "other"
    other.mkdir()
    (other / "meta.json").write_text(json.dumps({"kind": "prompts", "train": 3}))
    with tarfile.open(other / "train-000000.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("dir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, text in (("a", "first"), ("zürich", "second"), ("c", "third")):
            data = text.encode()
            info = tarfile.TarInfo(f"{name}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert distill.data._ustar_texts((other / "train-000000.tar").read_bytes()) is None
    assert read_prompts(other) == ["first", "second", "third"]


def test_read_prompts_names_a_damaged_shard(tmp_path, prompt_file):
    out = tmp_path / "out"
    write_prompt_shards(prompt_file, out, val_fraction=0.0, shard_size=8)
    (out / "train-000002.tar").unlink()  # 21 prompts: 8 + 8 + 5
    with pytest.raises(DataError, match=rf"{out} holds 16 train prompts, its meta\.json says 21"):
        read_prompts(out)
    shard = out / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:512 * 3 + 5])  # cut inside the text of its second sample
    with pytest.raises(DataError, match=r"cannot read shard .*train-000001\.tar: .*expected a tar file written by "
                                        r"`distill data prompts"):
        read_prompts(out)


# ---------------------------------------------------------------------------------------------------------------
# Captions

COLOURS = {"a": 30, "b": 90, "c": 150, "d": 210}  # grey levels of the captioned images


def make_caption_folder(src):
    """Four good pairs (a..d), an image without caption, a caption without image, an unreadable image and a caption
    that is not UTF-8 (each beside its partner), a blank caption, and files that are not looked at."""
    src.mkdir(parents=True)
    for stem, grey in COLOURS.items():
        Image.new("L", (10, 6), grey).save(src / f"{stem}.{'png' if stem != 'b' else 'JPG'}")
        (src / f"{stem}.txt").write_text(f"  a grey square, level {grey}\n")
    Image.new("L", (10, 6), 0).save(src / "lonely.png")
    (src / "ghost.txt").write_text("a caption without its image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (src / "broken.txt").write_text("the image beside me is broken")
    Image.new("L", (10, 6), 0).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes(b"caf\xe9")
    Image.new("L", (10, 6), 0).save(src / "blank.png")
    (src / "blank.txt").write_text(" \n")
    (src / "notes.md").write_text("ignored")
    (src / "sub").mkdir()
    (src / "sub" / "deep.txt").write_text("subfolders are not searched")
    return src


def test_caption_shards_pair_images_with_captions_and_name_what_they_skip(tmp_path, capsys):
    src = make_caption_folder(tmp_path / "caps")
    out = tmp_path / "out"
    meta = write_caption_shards(src, out, channels=1, resolution=4, val_fraction=0.25, shard_size=2)
    assert meta == json.loads((out / "meta.json").read_text())
    assert (meta["kind"], meta["channels"], meta["resolution"], meta["train"], meta["val"]) == \
           ("captions", 1, [4, 4], 3, 1)
    assert (meta["images_without_caption"], meta["captions_without_image"], meta["skipped_images"],
            meta["skipped_captions"]) == (1, 1, 1, 2)
    lines = stderr_lines(capsys)
    assert len(lines) == 5, lines  # one line for each file skipped, naming it
    for name, reason in (("lonely.png", "no caption"), ("ghost.txt", "no image"), ("latin1.txt", "line 1 is not "
                         "UTF-8"), ("blank.txt", "blank"), ("broken.png", "unreadable image")):
        assert sum(str(src / name) in line and reason in line for line in lines) == 1, (name, lines)
    assert shard_kind(out) == "captions"
    seen = []
    for split in ("train", "val"):
        batches = list(iterate_captions(out, split, batch_size=2))
        assert [len(captions) for _, captions in batches] == ([2, 1] if split == "train" else [1])
        for images, captions in batches:
            assert images.dtype == torch.float32 and images.shape[1:] == (1, 4, 4)
            for image, caption in zip(images, captions):
                grey = int(caption.rsplit(" ", 1)[1])  # the caption names its image's grey level
                torch.testing.assert_close(image.mean(), torch.tensor(grey / 255 * 2 - 1), atol=0.02, rtol=0)
                seen.append(caption)
        assert read_prompts(out, split) == [c for _, captions in batches for c in captions]  # captions are prompts
    assert sorted(seen) == sorted(f"a grey square, level {grey}" for grey in COLOURS.values())


def test_caption_folders_without_a_usable_pair_or_with_an_ambiguous_stem(tmp_path, capsys):
    src = tmp_path / "caps"
    src.mkdir()
    Image.new("RGB", (4, 4)).save(src / "x.png")
    (src / "y.txt").write_text("an orphan")
    with pytest.raises(DataError, match=r"caption folder .*caps has no usable image-caption pair \("
                                        r"images_without_caption 1, captions_without_image 1, .*expected images"):
        write_caption_shards(src, tmp_path / "out")
    assert len(stderr_lines(capsys)) == 2 and not (tmp_path / "out").exists()
    (src / "x.txt").write_text("x")
    Image.new("RGB", (4, 4)).save(src / "x.jpg")
    with pytest.raises(DataError, match=r"holds x\.jpg and x\.png: one stem, several files"):
        write_caption_shards(src, tmp_path / "out")
    with pytest.raises(DataError, match=r"caption folder .*nowhere does not exist"):
        write_caption_shards(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty has no images and no \.txt captions"):
        write_caption_shards(tmp_path / "empty", tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Kinds: each reader takes its own kind and says what it got otherwise


@pytest.fixture
def image_shards(tmp_path):
    src = tmp_path / "classes"
    for name, grey in (("zero", 0), ("one", 255)):
        (src / name).mkdir(parents=True)
        for i in range(2):
            Image.new("L", (4, 4), grey).save(src / name / f"{i}.png")
    write_folder_shards(src, tmp_path / "images", channels=1, val_fraction=0.0)
    return tmp_path / "images"


def test_shard_kind_of_each_kind_and_of_what_is_not_shards(tmp_path, image_shards, prompt_file):
    write_prompt_shards(prompt_file, tmp_path / "prompts")
    write_caption_shards(make_caption_folder(tmp_path / "caps"), tmp_path / "captions", channels=1)
    assert [shard_kind(tmp_path / k) for k in ("images", "prompts", "captions")] == ["images", "prompts", "captions"]
    with pytest.raises(DataError, match=r"shard folder .*nowhere does not exist"):
        shard_kind(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"missing .*caps/meta\.json"):
        shard_kind(tmp_path / "caps")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "meta.json").write_text(json.dumps({"kind": "audio"}))
    with pytest.raises(DataError, match=r"has kind 'audio'; expected 'prompts', 'captions', or no kind"):
        shard_kind(tmp_path / "odd")


def test_read_prompts_refuses_image_shards(image_shards):
    with pytest.raises(DataError, match=rf"shard folder {image_shards} holds image shards with class labels \(its "
                                        r"meta\.json has no kind\), not prompts; expected prompt shards written by "
                                        r"`distill data prompts"):
        read_prompts(image_shards)
    with pytest.raises(DataError, match=r"holds image shards, not images with captions"):
        iterate_captions(image_shards)


def test_image_readers_refuse_prompt_shards_saying_what_they_are(tmp_path, prompt_file):
    out = tmp_path / "prompts"
    write_prompt_shards(prompt_file, out)
    message = rf"shard folder {out} holds prompt shards \(meta\.json kind 'prompts', written by `distill data " \
              r"prompts`\), not images with class labels"
    with pytest.raises(DataError, match=message):
        read_meta(out)
    with pytest.raises(DataError, match=message):
        check_shards(list_shards(out))
    with pytest.raises(DataError, match=message):
        first_sample(out)
    with pytest.raises(DataError, match=message):
        ShardDataModule(out, batch_size=2).setup()


# ---------------------------------------------------------------------------------------------------------------
# Command line


def test_data_prompts_help_lists_every_option():
    r = run_cli("data", "prompts", "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    for option in ("--src", "--out", "--val-fraction", "--seed", "--shard-size"):
        assert option in r.stdout
    assert "blank lines are skipped and counted" in " ".join(r.stdout.split())  # the description, wrapped


def test_data_prompts_cli_reports_bad_input_in_one_line(tmp_path):
    src = tmp_path / "prompts.txt"
    src.write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    r = run_cli("data", "prompts", "--src", str(src), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [f"distill data: error: prompt file {src}: line 3 is not UTF-8 (byte 0xff at "
                                     f"byte 1 of the line: invalid start byte); expected a UTF-8 text file with one "
                                     f"prompt per line"]
    assert not (tmp_path / "out").exists()


def test_data_prompts_and_captions_cli_print_what_they_wrote_and_skipped(tmp_path, prompt_file, capsys):
    from distill.cli import main

    out = tmp_path / "out"
    assert main(["data", "prompts", "--src", str(prompt_file), "--out", str(out), "--shard-size", "7"]) == 0
    printed = capsys.readouterr().out
    assert printed == f"wrote 19 train and 2 val prompts to {out}; skipped 6 blank lines of {prompt_file}\n"
    assert len(list_shards(out)) == 3 and len(read_prompts(out)) == 19
    src = make_caption_folder(tmp_path / "caps")
    assert main(["data", "captions", "--src", str(src), "--out", str(tmp_path / "c"), "--channels", "1",
                 "--val-fraction", "0.25"]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"wrote 3 train and 1 val image-caption pairs (1x6x10) to {tmp_path / 'c'}",
        f"skipped 1 images without a caption, 1 captions without an image, 1 unreadable images and 2 blank or "
        f"unreadable captions (each named on stderr; counted in {tmp_path / 'c'}/meta.json)"]
    assert len(captured.err.splitlines()) == 5
    assert main(["data", "prompts", "--src", str(tmp_path), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err == f"distill data: error: prompt file {tmp_path} is a folder; expected a UTF-8 " \
                                      f"text file with one prompt per line\n"

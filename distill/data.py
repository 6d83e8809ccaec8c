"""Data as webdataset shards: writers (sklearn digits, a folder of class subfolders, a prompt file, a folder of
captioned images, latents of image shards encoded by a teacher's VAE), checks, readers (streamed, and random access
for the GAN term's real data), and the Lightning DataModule that streams images. docs/data.md is the user's guide.

Layout of a shard folder (what every reader here expects):

    out/train-000000.tar, out/train-000001.tar, ...   samples of `shard_size`, shuffled once at write time
    out/val-000000.tar, ...
    out/meta.json                                     what the shards hold, the counts, and what was skipped

Four kinds, told apart by meta.json's "kind" (`shard_kind`):
- images (no "kind"; `distill data digits`, `distill data shards`): `<key>.cls` (the class index as text) and
  `<key>.png` (8-bit "L" or "RGB"); meta.json has source, num_classes, classes, channels, resolution.
- prompts (`distill data prompts`): `<key>.txt`, one prompt in UTF-8; the key is `line-<n>`, n its 1-based line
  in the source file.
- captions (`distill data captions`): `<key>.png` and `<key>.txt`, an image and its caption; meta.json has
  channels and resolution.
- latents (`distill data latents`): `<key>.npy` (a float16 latent of the source image, scaled as the teacher's UNet
  sees it) and the source sample's `<key>.cls` or `<key>.txt`; meta.json has latent_shape, the source and the
  teacher. The same keys and splits as the source shards.
Readers map pixels to float32 in [-1, 1] as uint8 / 255 * 2 - 1.

Training reads an endless, resampled stream of images (shards drawn with replacement): there are no epochs, count
steps and images. A shard that turns out corrupt while streaming is skipped with a warning naming it, and the
stream goes on. Prompts are few bytes each: `read_prompts` reads a whole split into memory once. The GAN term's
real data (`RealData`) is read by random access instead: a batch is a function of a torch.Generator, never of a
stream's position, so that a resumed run reads the same batches.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import struct
import sys
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from typing import NamedTuple
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from distill.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CAPTION_SUFFIX = ".txt"
SHARD_KINDS = ("images", "prompts", "captions", "latents")  # meta.json "kind"; image shards have none
TEXT_KINDS = ("prompts", "captions")  # shards whose .txt samples are prompts
_NOT_IMAGE_KINDS = (*TEXT_KINDS, "latents")  # what image readers refuse, saying what it is
_KIND_NAMES = {"images": "image", "prompts": "prompt", "captions": "caption", "latents": "latent"}
_WRITERS_HINT = "written by `distill data digits` or `distill data shards`"
_PROMPTS_HINT = "written by `distill data prompts --src FILE.txt --out DIR`"
_CAPTIONS_HINT = "written by `distill data captions --src FOLDER --out DIR`"
_LATENTS_HINT = "written by `distill data latents --teacher PIPELINE --src SHARDS --out DIR`"
_BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark that some editors put at the start of a file
_DIGITS_MAX = 16  # sklearn digits pixel values are integers 0..16
# What PIL raises for a file that is not a whole PNG or JPEG: unidentified, truncated, a broken chunk or stream,
# or more pixels than PIL's decompression-bomb limit.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


# ----------------------------------------------------------------------------------------------------------------
# Writing shards


def write_digits_shards(out: str | Path, val_fraction: float = 0.1, seed: int = 0, shard_size: int = 500) -> dict:
    """scikit-learn's digits (1797 8x8 images, 10 classes, shipped with sklearn) as train/val shards in `out`.

    Pixel value v in 0..16 is stored as round(v * 255 / 16), which is injective, so the data round-trips exactly.
    Keys are `digits-<index in load_digits()>`.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / _DIGITS_MAX)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    keys = [f"digits-{i:05d}" for i in range(len(labels))]
    meta = {"source": "sklearn-digits", "num_classes": 10, "classes": [str(c) for c in range(10)], "channels": 1,
            "resolution": [8, 8]}
    return _write_shards(out, keys, lambda i: {"png": _encode_png(images[i]), "cls": int(labels[i])}, meta,
                         val_fraction, seed, shard_size)


def write_folder_shards(src: str | Path, out: str | Path, channels: int = 3, resolution: int | None = None,
                        val_fraction: float = 0.1, seed: int = 0, shard_size: int = 500) -> dict:
    """A folder of images in class subfolders (`src/<class>/*.png|jpg|jpeg`) as train/val shards in `out`.

    The class index is the position of the subfolder name in natural order (numbers compare as numbers: "2" before
    "10"); meta.json lists the names in index order under "classes", so that indices map back. Images are converted
    to "L" (channels=1) or "RGB" (channels=3) and resized to resolution x resolution (bicubic) when it is given;
    without it every image must already have the same size.

    One bad file should not cost a long conversion, so what cannot be used is skipped, with one line each on stderr,
    and recorded in meta.json: an unreadable image (counted in "skipped_images") and a class folder without a
    readable image (named in "skipped_classes"; it gets no index, so every class index has samples). No readable
    image at all is an error.
    """
    _check_image_options(channels, resolution)
    src = Path(src)
    folders, empty = _list_image_folder(src)
    # Pass 1 decodes every image once and writes nothing: unreadable files are found now, so that the classes and
    # the train/val counts are final before the first shard.
    images, classes, unreadable, skipped_images = _readable_classes(src, folders)
    size = _common_size([(file, file_size) for file, file_size, _ in images], resolution)
    mode = "L" if channels == 1 else "RGB"

    def load(i: int) -> dict:
        file, _, label = images[i]
        return {"png": _encode_png(_load_image(file, mode, resolution)), "cls": label}

    keys = [f"img-{i:06d}" for i in range(len(images))]
    meta = {"source": os.path.abspath(src), "num_classes": len(classes), "classes": classes, "channels": channels,
            "resolution": [size[1], size[0]],  # PIL sizes are (W, H); meta holds [H, W]
            "skipped_classes": sorted(empty + unreadable, key=_natural_key), "skipped_images": skipped_images}
    return _write_shards(out, keys, load, meta, val_fraction, seed, shard_size)


def write_prompt_shards(src: str | Path, out: str | Path, val_fraction: float = 0.1, seed: int = 0,
                        shard_size: int = 500) -> dict:
    """A text file with one prompt per line as train/val shards of `<key>.txt` in `out`; the key `line-<n>` is
    the prompt's 1-based line in `src`.

    The file must be UTF-8 (a leading byte-order mark is dropped). Each line is stripped of surrounding whitespace;
    blank lines are skipped and counted (meta.json "skipped_blank"). A prompt repeated in the file is kept as often
    as it appears. A missing file, a folder, an empty file, a file without a non-blank line, and bytes that are not
    UTF-8 (the message gives the line) are errors.
    """
    src = Path(src)
    prompts, lines, skipped_blank = _read_prompt_file(src)
    keys = [f"line-{n:07d}" for n in lines]
    meta = {"kind": "prompts", "source": os.path.abspath(src), "skipped_blank": skipped_blank}
    return _write_shards(out, keys, lambda i: {"txt": prompts[i]}, meta, val_fraction, seed, shard_size)


def write_caption_shards(src: str | Path, out: str | Path, channels: int = 3, resolution: int | None = None,
                         val_fraction: float = 0.1, seed: int = 0, shard_size: int = 500) -> dict:
    """Images with their captions beside them (`src/x.png|jpg|jpeg` and `src/x.txt`, the same stem) as train/val
    shards of `<key>.png` + `<key>.txt` in `out` (text-to-image data, e.g. for DMD2's GAN term).

    Images are converted and resized as by `write_folder_shards`; captions are read as prompt lines are (UTF-8, a
    byte-order mark dropped, surrounding whitespace stripped). What cannot be used is skipped, with one line each on
    stderr naming the file, and counted in meta.json: an image without its caption ("images_without_caption"), a
    caption without its image ("captions_without_image"), an unreadable image ("skipped_images"), and a caption that
    is blank or not UTF-8 ("skipped_captions"). No usable pair at all is an error, and so is a stem with two images
    (x.png and x.jpg): its caption would fit either. Subfolders are not searched.
    """
    _check_image_options(channels, resolution)
    src = Path(src)
    pairs, no_caption, no_image = _caption_pairs(src)
    captions = {image: caption for image, file in pairs if (caption := _read_caption(file)) is not None}
    readable = _readable_images([image for image, _ in pairs if image in captions])  # decoded once, like pass 1
    skipped = {"images_without_caption": no_caption, "captions_without_image": no_image,
               "skipped_images": len(captions) - len(readable), "skipped_captions": len(pairs) - len(captions)}
    if not readable:
        counts = ", ".join(f"{key} {n}" for key, n in skipped.items())
        raise DataError(f"caption folder {src} has no usable image-caption pair ({counts}); expected images with a "
                        f"caption beside each (x.png and x.txt)")
    size = _common_size(readable, resolution)
    mode = "L" if channels == 1 else "RGB"

    def load(i: int) -> dict:
        file = readable[i][0]
        return {"png": _encode_png(_load_image(file, mode, resolution)), "txt": captions[file]}

    keys = [f"img-{i:06d}" for i in range(len(readable))]
    meta = {"kind": "captions", "source": os.path.abspath(src), "channels": channels,
            "resolution": [size[1], size[0]], **skipped}  # PIL sizes are (W, H); meta holds [H, W]
    return _write_shards(out, keys, load, meta, val_fraction, seed, shard_size)


def _check_image_options(channels: int, resolution: int | None) -> None:
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"resolution must be a positive integer or None, got {resolution!r}")


def _read_prompt_file(src: Path) -> tuple[list[str], list[int], int]:
    """The non-blank lines of a prompt file, stripped, with their 1-based line numbers, and the number of blank
    lines."""
    expected = "expected a UTF-8 text file with one prompt per line"
    if src.is_dir():
        raise DataError(f"prompt file {src} is a folder; {expected}")
    try:
        data = src.read_bytes()
    except FileNotFoundError:
        raise DataError(f"prompt file {src} does not exist; {expected}") from None
    except OSError as exn:
        raise DataError(f"cannot read prompt file {src}: {exn.strerror or exn}; {expected}") from None
    try:
        text = _decode_text(data)
    except ValueError as exn:
        raise DataError(f"prompt file {src}: {exn}; {expected}") from None
    if not text:
        raise DataError(f"prompt file {src} is empty; {expected}")
    rows = text.split("\n")  # "\r\n" too: the "\r" goes with the surrounding whitespace
    if rows[-1] == "":  # the newline that ends the last line starts no line
        rows.pop()
    prompts, lines = [], []
    for n, row in enumerate(rows, 1):
        if row.strip():
            prompts.append(row.strip())
            lines.append(n)
    if not prompts:
        raise DataError(f"prompt file {src} has no prompt: all {len(rows)} lines are blank; {expected}")
    return prompts, lines, len(rows) - len(prompts)


def _decode_text(data: bytes) -> str:
    """UTF-8 bytes (a leading byte-order mark dropped) as text; ValueError naming the line of the first byte that is
    not UTF-8, or of a NUL (a binary file can be valid UTF-8)."""
    data = data.removeprefix(_BOM)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        line = data.count(b"\n", 0, exn.start) + 1
        column = exn.start - data.rfind(b"\n", 0, exn.start)  # 1-based, in bytes
        raise ValueError(f"line {line} is not UTF-8 (byte 0x{data[exn.start]:02x} at byte {column} of the line: "
                         f"{exn.reason})") from None
    nul = text.find("\x00")
    if nul >= 0:
        raise ValueError(f"line {text.count(chr(10), 0, nul) + 1} holds a NUL character: binary data, not text")
    return text


def _caption_pairs(src: Path) -> tuple[list[tuple[Path, Path]], int, int]:
    """(image, caption file) for each stem with both, in natural order of the stems, and the numbers of images
    without a caption and of captions without an image, each skipped with a line on stderr."""
    expected = f"expected a folder of {'/'.join(IMAGE_SUFFIXES)} images with a caption beside each (x.png and x.txt)"
    if not src.is_dir():
        raise DataError(f"caption folder {src} {'is a file' if src.exists() else 'does not exist'}; {expected}")
    images: dict[str, list[Path]] = {}
    captions: dict[str, list[Path]] = {}
    for file in sorted(src.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            suffix = file.suffix.lower()
            found = images if suffix in IMAGE_SUFFIXES else captions if suffix == CAPTION_SUFFIX else None
            if found is not None:
                found.setdefault(file.stem, []).append(file)
    for files in (*images.values(), *captions.values()):
        if len(files) > 1:
            raise DataError(f"caption folder {src} holds {' and '.join(f.name for f in files)}: one stem, several "
                            f"files; expected one image and one caption per stem")
    if not images and not captions:
        raise DataError(f"caption folder {src} has no images and no {CAPTION_SUFFIX} captions (subfolders are not "
                        f"searched); {expected}")
    no_caption = sorted(images.keys() - captions.keys(), key=_natural_key)
    no_image = sorted(captions.keys() - images.keys(), key=_natural_key)
    for stem in no_caption:
        _warn(f"skipping image {images[stem][0]}: no caption {src / stem}{CAPTION_SUFFIX} beside it")
    for stem in no_image:
        _warn(f"skipping caption {captions[stem][0]}: no image {src / stem}.{'|'.join(s[1:] for s in IMAGE_SUFFIXES)} "
              f"beside it")
    stems = sorted(images.keys() & captions.keys(), key=_natural_key)
    return [(images[stem][0], captions[stem][0]) for stem in stems], len(no_caption), len(no_image)


def _read_caption(file: Path) -> str | None:
    """The caption in `file`, stripped; None (with a line on stderr) when it is blank or cannot be read."""
    try:
        caption = _decode_text(file.read_bytes()).strip()
    except (OSError, ValueError) as exn:
        _warn(f"skipping caption {file}: {getattr(exn, 'strerror', None) or exn}; expected UTF-8 text")
        return None
    if not caption:
        _warn(f"skipping caption {file}: it is blank; expected the text of its image")
    return caption or None


def _list_image_folder(src: Path) -> tuple[list[tuple[str, list[Path]]], list[str]]:
    """(class folder name, its image files in sorted order) in natural order of the names, and the names of the
    class folders without image files, each skipped with a line on stderr; hidden entries are ignored."""
    expected = f"expected a folder with one subfolder of {'/'.join(IMAGE_SUFFIXES)} images per class"
    if not src.is_dir():
        raise DataError(f"image folder {src} does not exist; {expected}")
    names = sorted((p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key)
    if not names:
        raise DataError(f"image folder {src} has no class subfolders; {expected}")
    folders = [(name, _image_files(src / name)) for name in names]
    if not any(files for _, files in folders):
        raise DataError(f"image folder {src} has no images in its class subfolders {names}; {expected}")
    empty = [name for name, files in folders if not files]
    for name in empty:
        _warn(f"skipping class folder {src / name}: no {'/'.join(IMAGE_SUFFIXES)} images in it (subfolders are "
              f"not searched), so it gets no class index")
    return [(name, files) for name, files in folders if files], empty


def _image_files(folder: Path) -> list[Path]:
    return [file for file in sorted(folder.iterdir())
            if file.is_file() and not file.name.startswith(".") and file.suffix.lower() in IMAGE_SUFFIXES]


def _natural_key(name: str) -> tuple[list, str]:
    """Sort key that compares runs of digits as numbers ("2" < "10", "c2" < "c10"). Names that differ only in
    leading zeros ("c2", "c02") are ordered by the text, so the order never depends on the file system."""
    parts = re.split(r"([0-9]+)", name)  # text, digits, text, ...: the same type at each position of two keys
    return [int(part) if i % 2 else part for i, part in enumerate(parts)], name


def _readable_classes(src: Path, folders: list[tuple[str, list[Path]]]
                      ) -> tuple[list[tuple[Path, tuple[int, int], int]], list[str], list[str], int]:
    """(file, (W, H), class index) of every readable image, the class names in index order, the class folders
    without a readable image (skipped with a line on stderr, no index), and the number of unreadable images."""
    found = [(name, _readable_images(files)) for name, files in folders]
    skipped_images = sum(len(files) for _, files in folders) - sum(len(readable) for _, readable in found)
    if not any(readable for _, readable in found):
        raise DataError(f"image folder {src} has no readable image: all {skipped_images} failed to decode; "
                        f"expected PNG or JPEG files")
    images, classes, unreadable = [], [], []
    for name, readable in found:
        if not readable:
            _warn(f"skipping class folder {src / name}: no readable image in it, so it gets no class index")
            unreadable.append(name)
            continue
        images += [(file, size, len(classes)) for file, size in readable]
        classes.append(name)
    return images, classes, unreadable, skipped_images


def _readable_images(files: list[Path]) -> list[tuple[Path, tuple[int, int]]]:
    """(file, (W, H)) of each file that decodes; each other one is skipped with a line on stderr. Decoding the
    pixels, not only the header, finds truncated files too."""
    readable = []
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()
                readable.append((file, image.size))
        except _UNREADABLE as exn:
            _warn(f"skipping unreadable image {file}: {_reason_of(file, exn)}; expected a PNG or JPEG file")
    return readable


def _common_size(images: list[tuple[Path, tuple[int, int]]], resolution: int | None) -> tuple[int, int]:
    """(W, H) of the written images: resolution x resolution, or else the size that every image must share."""
    if resolution is not None:
        return resolution, resolution
    first, size = images[0]
    for file, file_size in images[1:]:
        if file_size != size:
            raise DataError(f"image {file} is {file_size[0]}x{file_size[1]}, expected {size[0]}x{size[1]} "
                            f"like {first} (give a resolution to resize all images)")
    return size


def _reason_of(file: Path, exn: BaseException) -> str:
    # PIL repeats the path ("cannot identify image file '/a/b.png'"); the message names the file once already.
    # Whitespace is collapsed so that the reason stays on the message's one line.
    return " ".join(str(exn).replace(f" '{file}'", "").split()) or type(exn).__name__


def _warn(message: str) -> None:
    """One line on stderr. Not warnings.warn: Python shows a repeated warning once per process and adds a line of
    source, and a conversion must name everything it skips, each time it runs."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _load_image(file: Path, mode: str, resolution: int | None) -> np.ndarray:
    """The pixels of an image file that decoded before, in `mode`, resized to resolution x resolution (bicubic) when
    it is given: (H, W) or (H, W, 3) uint8."""
    try:
        with Image.open(file) as image:
            image = image.convert(mode)
            if resolution is not None:
                image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
            return np.asarray(image, dtype=np.uint8)
    except _UNREADABLE as exn:  # it decoded when the writer listed it: the file changed since
        raise DataError(f"cannot read image {file}: {_reason_of(file, exn)}; expected a PNG or JPEG file") from exn


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "L" if array.ndim == 2 else "RGB").save(buffer, format="png")
    return buffer.getvalue()


def _write_shards(out, keys: list[str], load, meta: dict, val_fraction: float, seed: int, shard_size: int) -> dict:
    """Shuffle the samples with `seed`, split off the validation part and write both splits and meta.json.

    `load(i)` gives the files of sample i (keys[i]) as {extension: bytes, str or int}; webdataset stores str as
    UTF-8 and int as its digits. Everything is written into a hidden folder inside `out` and moved in (os.replace)
    only once complete, shards first and meta.json last: an error leaves no shard behind (those already moved are
    removed), so the same command can run again, and a folder with a meta.json holds all its shards.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise DataError(f"shard_size must be a positive number of samples, got {shard_size}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"shard folder {out} is a file; expected a folder (or a path to create)")
    if out.is_dir() and any(out.glob("*.tar")):
        raise DataError(f"shard folder {out} already contains .tar files; expected an empty or new folder")
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = int(round(val_fraction * len(keys)))
    n_train = len(keys) - n_val
    if n_train < 1:
        raise DataError(f"no training samples left: {len(keys)} samples with val_fraction {val_fraction}")
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".writing-", dir=out))  # the same file system: os.replace is atomic
    # disable=None: a bar on a terminal only, so that a log or a test's stderr holds just the warnings
    bar = tqdm(total=len(keys), desc=f"writing {out}", unit="sample", file=sys.stderr, disable=None, leave=False)
    moved = []
    try:
        for split, indices in (("train", order[:n_train]), ("val", order[n_train:])):
            if len(indices) > 0:
                _write_split(partial, split, ({"__key__": keys[i], **load(int(i))} for i in indices), shard_size, bar)
        meta = {**meta, "train": n_train, "val": n_val, "shard_size": shard_size, "seed": seed}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        for shard in sorted(partial.glob("*.tar")):
            os.replace(shard, out / shard.name)
            moved.append(out / shard.name)
        os.replace(partial / "meta.json", out / "meta.json")
    except BaseException:
        for shard in moved:  # `out` held no shards before: these are all ours
            shard.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    return meta


def _write_split(folder: Path, split: str, samples: Iterator[dict], shard_size: int, bar) -> None:
    """`<split>-%06d.tar` shards of `shard_size` samples in `folder`, in the order given."""
    # mtime=0: the same inputs give byte-identical shards.
    with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
        for sample in samples:
            sink.write(sample)
            bar.update()


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking shards


def list_shards(path: str | Path, split: str = "train", writers: str = _WRITERS_HINT) -> list[str]:
    """Sorted `<split>-*.tar` shard paths in the folder `path` (`writers` says in errors what writes them)."""
    path = Path(path)
    expected = f"expected {split}-*.tar shards {writers}"
    if not path.is_dir():
        raise DataError(f"shard folder {path} does not exist; {expected}")
    urls = sorted(str(p) for p in path.glob(f"{split}-*.tar") if p.is_file())
    if not urls:
        raise DataError(f"shard folder {path} has no {split}-*.tar shards; {expected}")
    return urls


def read_meta(path: str | Path) -> dict:
    """The meta.json of a folder of image shards; prompt or caption shards are refused, saying what they are."""
    file = Path(path) / "meta.json"
    expected = f"expected the meta.json {_WRITERS_HINT}"
    meta = _load_meta(file, expected)
    if meta.get("kind") in _NOT_IMAGE_KINDS:
        raise DataError(_not_images(Path(path), meta["kind"]))
    missing = [k for k in ("num_classes", "channels", "resolution") if k not in meta]
    if missing:
        raise DataError(f"{file} lacks {', '.join(missing)}; {expected}")
    return meta


def shard_kind(path: str | Path) -> str:
    """What a shard folder holds, from its meta.json: "images" (no "kind": `distill data digits` or `shards`),
    "prompts", "captions" or "latents"."""
    return _kind_and_meta(Path(path))[0]


def _kind_and_meta(path: Path) -> tuple[str, dict]:
    expected = "expected a shard folder written by `distill data` (digits, shards, prompts, captions or latents)"
    if not path.is_dir():
        raise DataError(f"shard folder {path} does not exist; {expected}")
    meta = _load_meta(path / "meta.json", expected)
    kind = meta.get("kind", "images")
    if kind not in SHARD_KINDS:
        raise DataError(f"{path / 'meta.json'} has kind {kind!r}; expected 'prompts', 'captions', or no kind (images), "
                        f"or 'latents'")
    return kind, meta


def _load_meta(file: Path, expected: str) -> dict:
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"missing {file}; {expected}") from None
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read {file}: {exn}; {expected}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{file} holds a JSON {type(meta).__name__}, not an object; {expected}")
    return meta


def _not_images(folder: Path, kind: str) -> str:
    return (f"shard folder {folder} holds {_KIND_NAMES[kind]} shards (meta.json kind {kind!r}, written by "
            f"`distill data {kind}`), not images with class labels; expected image shards {_WRITERS_HINT}")


def check_shards(urls: list[str]) -> list[str]:
    """The shards whose first sample can be read and decoded; each other one is skipped with a warning. Shards in a
    folder of prompts or captions are refused as a whole, saying what they are."""
    for folder in sorted({Path(url).resolve().parent for url in urls}):
        try:
            kind = json.loads((folder / "meta.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):  # no meta.json to go by: the samples will tell
            kind = None
        if kind in _NOT_IMAGE_KINDS:
            raise DataError(_not_images(folder, kind))
    good = []
    for url in urls:
        try:
            _read_first_sample(url)
        except Exception as exn:  # anything that stops reading counts as unreadable; the warning says what
            warnings.warn(f"skipping unreadable shard {url}: {_reason(exn)}", stacklevel=2)
            continue
        good.append(url)
    if not good:
        raise DataError(f"no readable sample in any of the {len(urls)} shards under {_folder_of(urls)}; "
                        f"expected tar shards {_WRITERS_HINT}")
    return good


def first_sample(path: str | Path, split: str = "train") -> tuple[torch.Tensor, int]:
    """The first readable sample of a split (image (C, H, W) in [-1, 1], label): what a run checks before it starts."""
    urls = check_shards(list_shards(path, split))
    return _read_first_sample(urls[0])


def _read_first_sample(url: str) -> tuple[torch.Tensor, int]:
    """Decode the first sample of a shard: its members up to the first key that has both png and cls."""
    sample = {}
    with open(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, _, suffix = member.name.partition(".")
            if sample and key != sample["__key__"]:
                break
            sample.update({"__key__": key, "__url__": url, suffix.lower(): tar.extractfile(member).read()})
            if "png" in sample and "cls" in sample:
                break
    if not sample:
        raise DataError("no sample in the tar file")
    return decode_sample(sample)


def decode_sample(sample: dict) -> tuple[torch.Tensor, int]:
    """A webdataset sample {png, cls} -> (image (C, H, W) float32 in [-1, 1], label)."""
    where = _require(sample, "png", "cls")
    try:
        label = int(sample["cls"])
    except ValueError as exn:
        raise DataError(f"{where} cannot be decoded: {exn}") from exn
    return _decode_png(sample["png"], where), label


def decode_caption_sample(sample: dict) -> tuple[torch.Tensor, str]:
    """A webdataset sample {png, txt} -> (image (C, H, W) float32 in [-1, 1], caption)."""
    where = _require(sample, "png", "txt")
    try:
        caption = sample["txt"].decode("utf-8")
    except UnicodeDecodeError as exn:
        raise DataError(f"{where} cannot be decoded: {exn}") from exn
    return _decode_png(sample["png"], where), caption


def _require(sample: dict, *suffixes: str) -> str:
    """The sample's name for messages, once it is known to have files with every one of `suffixes`."""
    where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    if not all(suffix in sample for suffix in suffixes):
        raise DataError(f"{where} has files {sorted(k for k in sample if not k.startswith('__'))}, "
                        f"expected {' and '.join(suffixes)}")
    return where


def _decode_png(data: bytes, where: str) -> torch.Tensor:
    """8-bit L or RGB image bytes -> (C, H, W) float32 in [-1, 1]."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image)
    except (OSError, ValueError, UnidentifiedImageError) as exn:
        raise DataError(f"{where} cannot be decoded: {exn}") from exn
    if mode not in ("L", "RGB") or pixels.dtype != np.uint8:
        raise DataError(f"{where} is a {mode} image, expected 8-bit L or RGB")
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    return torch.from_numpy(np.array(pixels)).float() / 255.0 * 2.0 - 1.0


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in samples])  # (B, C, H, W)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)  # (B,)
    return images, labels


def _collate_captions(samples: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in samples]), [caption for _, caption in samples]  # (B, C, H, W), B


def _reason(exn: BaseException) -> str:
    # webdataset appends " @ <file object>" to messages and the stream and url to args; keep the message only.
    message = str(exn.args[0]) if exn.args else ""
    message = message.split(" @ <")[0]
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__


def _folder_of(urls: list[str]) -> str:
    folders = sorted({os.path.dirname(os.path.abspath(u)) for u in urls})
    return folders[0] if len(folders) == 1 else os.path.commonpath(folders) if folders else "?"


def read_prompts(path: str | Path, split: str = "train") -> list[str]:
    """Every prompt of a split of prompt shards (or every caption of caption shards), in shard order and then
    sample order, read into memory at once.

    A prompt set is read once, so nothing in it is skipped: a shard that cannot be read, a sample that is not
    UTF-8, or a count that differs from meta.json's is an error naming it.
    """
    path = Path(path)
    kind, meta = _kind_and_meta(path)
    if kind == "latents":
        raise DataError(f"shard folder {path} holds latent shards (meta.json kind 'latents'), not prompts; expected "
                        f"prompt shards {_PROMPTS_HINT} (caption shards hold prompts too)")
    if kind not in TEXT_KINDS:
        raise DataError(f"shard folder {path} holds image shards with class labels (its meta.json has no kind), not "
                        f"prompts; expected prompt shards {_PROMPTS_HINT} (caption shards hold prompts too)")
    prompts = [text for url in list_shards(path, split, _PROMPTS_HINT) for text in _read_texts(url)]
    expected = meta.get(split)
    if isinstance(expected, int) and len(prompts) != expected:
        raise DataError(f"shard folder {path} holds {len(prompts)} {split} prompts, its meta.json says {expected}; "
                        f"expected the shards as written (is one missing or cut short?)")
    return prompts


def _read_texts(url: str) -> list[str]:
    """The `.txt` files of a shard, in order, as text."""
    hint = f"expected a tar file {_PROMPTS_HINT}"
    try:
        with open(url, "rb") as stream:
            members = _ustar_texts(stream.read())
        if members is None:  # not the plain archive that our writer makes: tarfile reads every variant
            with tarfile.open(url, mode="r|") as tar:
                members = [(m.name, tar.extractfile(m).read()) for m in tar
                           if m.isreg() and m.name.partition(".")[2].lower() == "txt"]
    except (tarfile.TarError, OSError, EOFError) as exn:
        raise DataError(f"cannot read shard {url}: {_reason(exn)}; {hint}") from None
    texts = []
    for name, data in members:
        try:
            texts.append(data.decode("utf-8"))
        except UnicodeDecodeError as exn:
            raise DataError(f"sample {name} of {url} is not UTF-8 text: {exn}; {hint}") from None
    return texts


_TAR_EOF = bytes(512)  # the zero block that ends an archive


def _ustar_texts(data: bytes) -> list[tuple[str, bytes]] | None:
    """(name, bytes) of the `.txt` members of a tar archive made of regular files with plain ustar headers (what
    webdataset's TarWriter writes for short ASCII names), in order; None for anything else, and for an archive cut
    short, which tarfile then reads (or names as broken).

    Why not tarfile: its header parsing costs about 50 us a member. Measured on two shared CPU cores, 100,000
    prompts of 3-20 words written by write_prompt_shards (200 shards of 500): tarfile lists the 90,000 train members
    in 4.7 s; this reads all 100,000 prompts in 0.2 s. The header checksum is not verified (it would add 0.6 s): a
    header damaged in its magic, type, size or position sends the shard to tarfile, and read_prompts compares the
    count with meta.json.
    """
    found, offset = [], 0
    while offset + 512 <= len(data):
        header = data[offset:offset + 512]  # POSIX ustar: name 0:100, size 124:136 (octal), type 156, magic 257:263
        if header == _TAR_EOF:
            return found
        if header[257:262] != b"ustar" or header[156] not in b"0\0" or header[345] != 0:  # 345: a name prefix
            return None
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            return None
        start = offset + 512
        if start + size > len(data):
            return None
        name = header[:100].rstrip(b"\0")
        if name.partition(b".")[2].lower() == b"txt":
            found.append((name.decode("utf-8", "replace"), data[start:start + size]))
        offset = start + (size + 511) // 512 * 512  # data is padded to whole blocks
    return None


# ----------------------------------------------------------------------------------------------------------------
# Streaming. The stages are small classes (not closures) so that DataLoader workers can pickle them.


class _StreamStats:
    """What the stream skipped, counted in this process (DataLoader workers count in their own copies)."""

    def __init__(self):
        self.skipped_shards = 0
        self.skipped_samples = 0


class _ShardSamples:
    """dict(url=...) stream -> samples, one shard at a time.

    Reading shard by shard keeps a sample that a corrupt shard cut short from merging with the next shard, and
    gives one warning per bad shard. Many bad shards in a row (every shard corrupt since setup) raise, rather
    than spin forever on a resampled stream.
    """

    def __init__(self, stats: _StreamStats, max_bad_in_a_row: int):
        self.stats = stats
        self.max_bad_in_a_row = max_bad_in_a_row

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        bad_in_a_row = 0
        for shard in src:
            url = shard["url"]
            errors = []

            def stop(exn, errors=errors):  # webdataset handler: False = stop reading this shard
                errors.append(exn)
                return False

            n = 0  # samples read before the first error
            try:
                stream = wds.gopen(url)  # opened here, not by webdataset, so that it is closed (it never is there)
            except Exception as exn:
                errors.append(exn)
            else:
                try:
                    files = wds.tariterators.tar_file_expander([dict(url=url, stream=stream)], handler=stop)
                    for sample in wds.tariterators.group_by_keys(files, handler=stop):
                        n += not errors
                        yield sample  # one cut short by an error is dropped by _Decode, with a warning
                finally:
                    stream.close()
            if errors:
                self.stats.skipped_shards += 1
                where = f" after {n} samples" if n else ""
                warnings.warn(f"skipping unreadable shard {url}{where}: {_reason(errors[0])}")
            bad_in_a_row = bad_in_a_row + 1 if n == 0 else 0
            if bad_in_a_row >= self.max_bad_in_a_row:
                raise DataError(f"no readable sample in the last {bad_in_a_row} shards drawn from "
                                f"{_folder_of([url])}; expected tar shards {_WRITERS_HINT}")


class _WorkerShuffle:
    """Buffer shuffle seeded by (seed, rank, worker), so every rank and worker draws its own reproducible order."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed

    def __call__(self, src: Iterator) -> Iterator:
        if self.bufsize < 2:
            yield from src
            return
        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        seed = wds.utils.make_seed(self.seed, rank, worker)
        yield from wds.shuffle(self.bufsize, initial=min(100, self.bufsize), seed=seed)(src)


class _Decode:
    """Samples -> (image, label), or what `decode` makes of them; an undecodable sample is skipped with a warning
    naming it and its shard."""

    def __init__(self, stats: _StreamStats, decode=decode_sample):
        self.stats = stats
        self.decode = decode

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple]:
        for sample in src:
            try:
                yield self.decode(sample)
            except DataError as exn:
                self.stats.skipped_samples += 1
                warnings.warn(f"skipping {exn}")


def iterate_split(path: str | Path, split: str = "val", batch_size: int = 256, every_rank: bool = False
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of a split once, in shard order, as (images (B, C, H, W), labels (B,)); the last batch may be
    smaller. Under DDP each rank reads its own shards (split_by_node), so a rank may get nothing; with
    `every_rank` each rank reads the whole split (reference statistics that every rank must hold)."""
    yield from _read_once(list_shards(path, split), decode_sample, _collate, batch_size, every_rank)


def iterate_captions(path: str | Path, split: str = "train", batch_size: int = 64, every_rank: bool = False
                     ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Every image-caption pair of a split of caption shards once, in shard order, as (images (B, C, H, W) float32
    in [-1, 1], captions); the last batch may be smaller. Ranks split the shards as in `iterate_split`."""
    path = Path(path)
    kind = shard_kind(path)
    if kind != "captions":
        raise DataError(f"shard folder {path} holds {_KIND_NAMES[kind]} shards, not images with captions; expected "
                        f"caption shards {_CAPTIONS_HINT}")
    return _read_once(list_shards(path, split, _CAPTIONS_HINT), decode_caption_sample, _collate_captions, batch_size,
                      every_rank)


def _read_once(urls: list[str], decode, collate, batch_size: int, every_rank: bool) -> Iterator[tuple]:
    stats = _StreamStats()
    split_stages = [] if every_rank else [wds.split_by_node, wds.split_by_worker]
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        *split_stages,
        _ShardSamples(stats, max_bad_in_a_row=len(urls) + 1),  # finite: a bad shard is warned about, not fatal
        _Decode(stats, decode),
        wds.batched(batch_size, collation_fn=collate, partial=True),
    )
    yield from dataset


class ShardDataModule(L.LightningDataModule):
    """Endless, resampled training stream over a shard folder.

    batch_size is per device. Shards are drawn with replacement by webdataset's ResampledShards with
    deterministic=True, whose seed combines (rank * 1000 + worker, seed), and samples are shuffled in a buffer
    seeded by (seed, rank, worker): the same seed, world size and num_workers give the same batches.
    """

    def __init__(self, path: str | Path, batch_size: int, num_workers: int = 0, seed: int = 0,
                 shuffle_buffer: int = 1000):
        super().__init__()
        if batch_size < 1:
            raise DataError(f"batch_size must be a positive number of samples per device, got {batch_size}")
        if num_workers < 0:
            raise DataError(f"num_workers must be 0 or more, got {num_workers}")
        self.path = Path(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.shuffle_buffer = shuffle_buffer
        self.train_urls: list[str] | None = None
        self.stats = _StreamStats()
        self._meta: dict | None = None

    @property
    def meta(self) -> dict:
        if self._meta is None:
            self._meta = read_meta(self.path)
        return self._meta

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        height, width = self.meta["resolution"]
        return int(self.meta["channels"]), int(height), int(width)  # (C, H, W)

    @property
    def skipped_samples(self) -> int:
        """Samples skipped as undecodable in this process (not counting DataLoader workers)."""
        return self.stats.skipped_samples

    def setup(self, stage: str | None = None) -> None:
        self.meta  # noqa: B018 -- fail early on a missing or invalid meta.json
        self.train_urls = check_shards(list_shards(self.path, "train"))

    def train_dataset(self) -> wds.DataPipeline:
        if self.train_urls is None:
            self.setup()
        urls = self.train_urls
        # Not wds.WebDataset(resampled=True): in webdataset 1.0.2 it builds ResampledShards without passing
        # seed or deterministic, so its shard order would differ on every run.
        return wds.DataPipeline(
            wds.ResampledShards(urls, seed=self.seed, deterministic=True, empty_check=False),
            _ShardSamples(self.stats, max_bad_in_a_row=max(100, 10 * len(urls))),
            _WorkerShuffle(self.shuffle_buffer, self.seed),
            _Decode(self.stats),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        )

    def train_dataloader(self) -> wds.WebLoader:
        return wds.WebLoader(self.train_dataset(), batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0)


# ----------------------------------------------------------------------------------------------------------------
# Random access: the real data of DMD2's GAN term (Yin et al. 2024, arXiv 2405.14867, §4.3).


class RealBatch(NamedTuple):
    """Real samples: x (B, C, H, W) float32, images in [-1, 1] or latents as stored; the class labels (B,) int64 of
    labelled shards, else None; the captions of captioned shards, else None."""

    x: torch.Tensor
    labels: torch.Tensor | None
    captions: list[str] | None


_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's split of a member name (base_plus_ext)


class RealData:
    """Random access over one split of a shard folder of kind images (png + cls), captions (png + txt) or latents
    (npy + cls or txt): `get(indices)` reads just those samples, `draw(n, generator)` draws n uniformly with
    replacement.

    A batch is a function of the generator's state only, never of what was read before, so a training step whose
    generator is seeded by (seed, rank, step) reads the same real batch in any process and after any resume.
    Construction indexes the tar files once (each member's offset and size, grouped by sample key, nothing
    decoded); a shard cut short or damaged, or a sample without its files, is one DataError naming the shard.
    Reads open the shard, seek and read, and close it again: no file handle outlives a call, so the object can be
    made before a fork (DDP, DataLoader workers) and pickled. A sample that fails to decode is a DataError naming
    its shard and key, never skipped: a fixed index must always give the same sample.
    """

    def __init__(self, path: str | Path, split: str = "train"):
        self.path = Path(path)
        self.split = split
        self.kind, self.meta = _kind_and_meta(self.path)
        if self.kind == "prompts":
            raise DataError(f"shard folder {self.path} holds prompt shards (meta.json kind 'prompts'): no images; "
                            f"expected image, caption or latent shards (`distill data digits|shards|captions|latents`)")
        if self.kind == "latents":
            self.sample_shape = self._shape("latent_shape", _LATENTS_HINT)
            self._suffixes = ("npy", "cls" if self.meta.get("source_kind") == "images" else "txt")
            hint = _LATENTS_HINT
        else:
            channels, (height, width) = self._meta_value("channels"), self._meta_value("resolution")
            self.sample_shape = (int(channels), int(height), int(width))  # (C, H, W)
            self._suffixes = ("png", "cls" if self.kind == "images" else "txt")
            hint = _WRITERS_HINT if self.kind == "images" else _CAPTIONS_HINT
        self.urls = list_shards(self.path, split, hint)
        keys, shards, spans = [], [], []  # spans: (data offset, data size, side offset, side size) per sample
        for s, url in enumerate(self.urls):
            for key, members in _index_shard(url, hint):
                missing = [suffix for suffix in self._suffixes if suffix not in members]
                if missing:
                    raise DataError(f"sample {key} of {url} has files {sorted(members)}, expected "
                                    f"{' and '.join(self._suffixes)}; {hint}")
                keys.append(key)
                shards.append(s)
                spans.append((*members[self._suffixes[0]], *members[self._suffixes[1]]))
        expected = self.meta.get(split)
        if isinstance(expected, int) and len(keys) != expected:
            raise DataError(f"shard folder {self.path} holds {len(keys)} {split} samples, its meta.json says "
                            f"{expected}; expected the shards as written (is one missing?)")
        if not keys:
            raise DataError(f"shard folder {self.path} has no {split} sample in its {len(self.urls)} shards; {hint}")
        self.keys = keys
        self._shard = np.asarray(shards, dtype=np.int64)  # (N,)
        self._spans = np.asarray(spans, dtype=np.int64)  # (N, 4)

    def _meta_value(self, name: str):
        if name not in self.meta:
            raise DataError(f"{self.path / 'meta.json'} lacks {name}; expected the meta.json of `distill data`")
        return self.meta[name]

    def _shape(self, name: str, hint: str) -> tuple[int, int, int]:
        shape = self._meta_value(name)
        if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
            raise DataError(f"{self.path / 'meta.json'} has {name} {shape!r}; expected [channels, height, width], "
                            f"{hint}")
        return tuple(shape)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_classes(self) -> int | None:
        """The number of classes of labelled shards, else None."""
        return int(self.meta["num_classes"]) if self._suffixes[1] == "cls" and "num_classes" in self.meta else None

    def draw(self, n: int, generator: torch.Generator) -> RealBatch:
        """n samples drawn uniformly with replacement by `torch.randint(len(self), (n,), generator=generator)`."""
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise DataError(f"RealData.draw needs a CPU torch.Generator (the same draws on every device), got "
                            f"{getattr(generator, 'device', generator)}")
        return self.get(torch.randint(len(self), (n,), generator=generator).tolist())

    def get(self, indices: list[int]) -> RealBatch:
        """The samples at `indices` (in that order, repeats allowed), reading only their members."""
        indices = [int(i) for i in indices]
        bad = [i for i in indices if not 0 <= i < len(self)]
        if bad or not indices:
            raise DataError(f"RealData.get: indices {bad[:5] or '[]'}; expected a non-empty list of indices in "
                            f"[0, {len(self)}) of {self.path} ({self.split})")
        by_shard: dict[int, list[int]] = {}  # each shard opened once, read front to back
        for i in sorted(set(indices), key=lambda i: (self._shard[i], self._spans[i, 0])):
            by_shard.setdefault(int(self._shard[i]), []).append(i)
        raw: dict[int, tuple[bytes, bytes]] = {}
        for s, members in by_shard.items():
            url = self.urls[s]
            try:
                with open(url, "rb") as stream:
                    for i in members:
                        raw[i] = tuple(_read_span(stream, int(o), int(n), url, self.keys[i])
                                       for o, n in ((self._spans[i, 0], self._spans[i, 1]),
                                                    (self._spans[i, 2], self._spans[i, 3])))
            except OSError as exn:
                raise DataError(f"cannot read shard {url}: {exn.strerror or exn}; it was readable when indexed") \
                    from None
        decoded = {i: self._decode(i, *raw[i]) for i in raw}
        x = torch.stack([decoded[i][0] for i in indices])  # (B, C, H, W)
        if self._suffixes[1] == "cls":
            return RealBatch(x, torch.tensor([decoded[i][1] for i in indices], dtype=torch.int64), None)
        return RealBatch(x, None, [decoded[i][1] for i in indices])

    def _decode(self, i: int, data: bytes, side: bytes) -> tuple[torch.Tensor, int | str]:
        where = f"sample {self.keys[i]} of {self.urls[self._shard[i]]}"
        if self._suffixes[0] == "png":
            x = _decode_png(data, where)
        else:
            try:
                array = np.load(io.BytesIO(data), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exn:
                raise DataError(f"{where} cannot be decoded: its npy file: {exn}") from None
            if array.dtype.kind != "f":
                raise DataError(f"{where} holds a {array.dtype} array; expected a float latent")
            x = torch.from_numpy(array.astype(np.float32))
        if tuple(x.shape) != self.sample_shape:
            raise DataError(f"{where} has shape {tuple(x.shape)}; expected {self.sample_shape} as meta.json says")
        try:
            value = int(side) if self._suffixes[1] == "cls" else side.decode("utf-8")
        except (ValueError, UnicodeDecodeError) as exn:
            raise DataError(f"{where} cannot be decoded: its {self._suffixes[1]} file: {exn}") from None
        return x, value


def _read_span(stream, offset: int, size: int, url: str, key: str) -> bytes:
    stream.seek(offset)
    data = stream.read(size)
    if len(data) != size:
        raise DataError(f"sample {key} of {url} is cut short ({len(data)} of {size} bytes): the shard changed since "
                        f"it was indexed")
    return data


def _index_shard(url: str, hint: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {suffix: (data offset, size)}) of each sample of a tar shard, in order; members are grouped into
    samples by key as webdataset does (consecutive members with the same key)."""
    expected = f"expected a tar file {hint}"
    try:
        with open(url, "rb") as stream:
            members = _ustar_index(stream)
            if members is None:  # not the plain archive that our writer makes, or damaged: tarfile tells which
                stream.seek(0)
                tar = tarfile.open(fileobj=stream, mode="r:")
                members = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
                # tarfile ends its listing without a word at a header cut short or damaged: the archive must go on
                # to its end-of-archive block there.
                stream.seek(tar.offset)
                if stream.read(512) != _TAR_EOF:
                    raise DataError(f"shard {url} is cut short or damaged at byte {tar.offset} (after {len(members)} "
                                    f"files; no end-of-archive block there); {expected}")
    except (tarfile.TarError, OSError, EOFError) as exn:
        raise DataError(f"cannot read shard {url}: {_reason(exn)}; {expected}") from None
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    for name, offset, size in members:
        match = _KEY_AND_SUFFIX.match(name)
        if match is None:
            continue  # a member without a suffix holds no sample's file (webdataset skips it too)
        key, suffix = match.group(1), match.group(2).lower()
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        if suffix in samples[-1][1]:
            raise DataError(f"sample {key} of {url} has two {suffix} files; {expected}")
        samples[-1][1][suffix] = (offset, size)
    return samples


def _ustar_index(stream) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of the members of a tar archive made of regular files with plain ustar headers,
    read header by header (seek, no data read); None for anything else and for an archive cut short or damaged,
    which tarfile then reads or names as broken. Faster than tarfile for the same reason as `_ustar_texts`; unlike
    it, the header checksum is verified here (a random-access index is not cross-checked by decoding)."""
    size_of_file = stream.seek(0, os.SEEK_END)
    found, offset = [], 0
    while offset + 512 <= size_of_file:
        stream.seek(offset)
        header = stream.read(512)
        if header == _TAR_EOF:
            return found
        if header[257:262] != b"ustar" or header[156] not in b"0\0" or header[345] != 0:
            return None
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            checksum = int(header[148:156].strip(b"\0 "), 8)
        except ValueError:
            return None
        if checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):  # the checksum field counts as spaces
            return None
        start = offset + 512
        if start + size > size_of_file:
            return None
        found.append((header[:100].rstrip(b"\0").decode("utf-8", "replace"), start, size))
        offset = start + (size + 511) // 512 * 512
    return None


# ----------------------------------------------------------------------------------------------------------------
# Latent shards: real images encoded once by a latent teacher's frozen VAE (the GAN term's real data for latent
# teachers; DMD2 encodes its real images with the SDXL VAE the same way).

LATENT_DTYPE = np.float16  # halves the shards; the round trip is checked and recorded (meta "float16_max_abs_error")


def write_latent_shards(teacher: str | Path, src: str | Path, out: str | Path, batch_size: int = 64, seed: int = 0,
                        device: str = "cpu", overwrite: bool = False) -> dict:
    """Every image of the image or caption shards `src`, encoded once by the frozen VAE of the pipeline folder
    `teacher` (`LatentCodec.encode`: a posterior draw, scaled as the UNet sees latents), as shards of kind
    "latents" in `out`: `<key>.npy` (float16, shape meta "latent_shape") with the source's `<key>.cls` or
    `<key>.txt`, the same keys, splits and order as `src`.

    The draws come from one CPU torch.Generator seeded by `seed`, batch after batch of `batch_size`, train then
    val, in shard order: the same arguments give the same latents on any device. Checked before anything is
    written: `out` is new or empty (or `overwrite`), `src` holds images, `teacher` has a VAE, and the images are
    what the VAE takes (channels, and the UNet's sample_size times the VAE's scale factor). The folder is written
    beside `out` and moved into place (os.replace) when complete, so `out` is never left half written.
    """
    teacher, src, out = Path(teacher), Path(src), Path(out)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive number of images, got {batch_size!r}")
    if out.exists() and not out.is_dir():
        raise DataError(f"output folder {out} is a file; expected a folder (or a path to create)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"output folder {out} is not empty; expected a new or empty folder (or --overwrite)")
    for name, other in (("source", src), ("teacher", teacher)):
        if other.exists() and (out.resolve() == other.resolve() or out.resolve() in other.resolve().parents):
            raise DataError(f"output folder {out} holds the {name} folder {other}; expected a folder of its own")
    source_kind = shard_kind(src)
    if source_kind not in ("images", "captions"):
        raise DataError(f"shard folder {src} holds {_KIND_NAMES[source_kind]} shards; expected images with labels "
                        f"(`distill data digits|shards`) or with captions (`distill data captions`) to encode")
    splits = {split: RealData(src, split) for split in ("train", "val") if any(src.glob(f"{split}-*.tar"))}
    if "train" not in splits:
        list_shards(src, "train")  # raises, naming what is missing
    from distill.evaluate import resolve_device
    from distill.teachers import load_teacher

    dev = resolve_device(device, "device")
    loaded = load_teacher(teacher)
    if loaded.codec is None:
        raise DataError(f"teacher {teacher} is a pixel-space teacher (a UNet2DModel folder, no VAE): its GAN term "
                        f"reads the image shards themselves; expected a Stable Diffusion pipeline folder with a vae/")
    codec = loaded.codec.to(dev)
    vae, unet = codec.vae.config, loaded.denoiser.net.unet.config
    size = unet.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    f = codec.scale_factor
    image_shape = (int(vae.in_channels), h * f, w * f)
    latent_shape = (int(vae.latent_channels), h, w)
    if splits["train"].sample_shape != image_shape:
        raise DataError(f"shard folder {src} holds images of shape {splits['train'].sample_shape} (C, H, W); the VAE "
                        f"of {teacher} takes {image_shape} (its unet's sample_size {h}x{w} times the VAE's scale "
                        f"factor {f}); expected shards written at that size (`--channels {image_shape[0]} "
                        f"--resolution {image_shape[1]}`)")
    del loaded  # the UNet and text encoders are not needed to encode
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws whichever device encodes
    worst = [0.0]  # largest |float16 - float32| over every latent written
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))  # same file system as out
    total = sum(len(data) for data in splits.values())
    bar = tqdm(total=total, desc=f"encoding {src}", unit="image", file=sys.stderr, disable=None, leave=False)
    try:
        shard_size = int(splits["train"].meta.get("shard_size", 500))
        for split, data in splits.items():
            samples = _encoded_samples(data, codec, generator, batch_size, dev, worst)
            _write_split(partial, split, samples, shard_size, bar)
        src_meta = splits["train"].meta
        meta = {"kind": "latents", "latent_shape": list(latent_shape), "image_shape": list(image_shape),
                "dtype": np.dtype(LATENT_DTYPE).name, "float16_max_abs_error": worst[0],
                "source": os.path.abspath(src), "source_kind": source_kind, "teacher": os.path.abspath(teacher),
                "scaling_factor": float(vae.scaling_factor), "seed": seed, "batch_size": batch_size,
                **({"num_classes": src_meta["num_classes"], "classes": src_meta.get("classes")}
                   if source_kind == "images" else {}),
                "train": len(splits["train"]), "val": len(splits["val"]) if "val" in splits else 0,
                "shard_size": shard_size}
        (partial / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace_folder(partial, out)
    finally:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
    return meta


def _encoded_samples(data: RealData, codec, generator: torch.Generator, batch_size: int, device: torch.device,
                     worst: list[float]) -> Iterator[dict]:
    """The samples of `data` in order, each image replaced by its float16 latent (`npy`)."""
    for start in range(0, len(data), batch_size):
        indices = list(range(start, min(start + batch_size, len(data))))
        batch = data.get(indices)
        z = codec.encode(batch.x.to(device), generator).cpu()  # (B, c, h, w) float32
        z16 = z.to(torch.float16)
        if not torch.isfinite(z16).all():
            raise DataError(f"latents of {data.path} ({data.split}, samples {start}..{indices[-1]}) exceed float16's "
                            f"range (largest |z| {z.abs().max().item():.3g}); expected latents scaled by the VAE's "
                            f"scaling_factor")
        worst[0] = max(worst[0], (z16.float() - z).abs().max().item())
        for j, i in enumerate(indices):
            buffer = io.BytesIO()
            np.save(buffer, z16[j].numpy(), allow_pickle=False)
            side = {"cls": int(batch.labels[j])} if batch.labels is not None else {"txt": batch.captions[j]}
            yield {"__key__": data.keys[i], "npy": buffer.getvalue(), **side}


def _replace_folder(partial: Path, out: Path) -> None:
    """Move the complete folder `partial` to `out`; an existing `out` (empty, or replaced on request) is moved aside
    first and removed only once the new one is in place."""
    if not out.exists():
        os.replace(partial, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "folder")
    try:
        os.replace(partial, out)
    except BaseException:
        os.replace(old / "folder", out)  # put it back as it was
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)

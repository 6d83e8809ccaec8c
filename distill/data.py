"""Image data as webdataset shards: writers (sklearn digits, a folder of class subfolders), checks, and the
Lightning DataModule that streams them.

Layout of a shard folder (what every reader here expects):

    out/train-000000.tar, out/train-000001.tar, ...   samples of `shard_size`, shuffled once at write time
    out/val-000000.tar, ...
    out/meta.json                                     source, num_classes, classes, channels, resolution, counts
                                                      (and, from a folder, what was skipped)

Each sample is `<key>.cls` (the class index as text) and `<key>.png` (8-bit "L" or "RGB"). Readers map pixels
to float32 in [-1, 1] as uint8 / 255 * 2 - 1.

Training reads an endless, resampled stream (shards drawn with replacement): there are no epochs, count steps and
images. A shard that turns out corrupt while streaming is skipped with a warning naming it, and the stream goes on.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import sys
import tarfile
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from distill.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_WRITERS_HINT = "written by `distill data digits` or `distill data shards`"
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
    items = [(f"digits-{i:05d}", int(labels[i])) for i in range(len(labels))]
    meta = {"source": "sklearn-digits", "num_classes": 10, "classes": [str(c) for c in range(10)], "channels": 1,
            "resolution": [8, 8]}
    return _write_shards(out, items, lambda i: images[i], meta, val_fraction, seed, shard_size)


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
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"resolution must be a positive integer or None, got {resolution!r}")
    src = Path(src)
    folders, empty = _list_image_folder(src)
    # Pass 1 decodes every image once and writes nothing: unreadable files are found now, so that the classes and
    # the train/val counts are final before the first shard.
    images, classes, unreadable, skipped_images = _readable_classes(src, folders)
    size = _common_size([(file, file_size) for file, file_size, _ in images], resolution)
    mode = "L" if channels == 1 else "RGB"

    def load(i: int) -> np.ndarray:
        file = images[i][0]
        try:
            with Image.open(file) as image:
                image = image.convert(mode)
                if resolution is not None:
                    image = image.resize((resolution, resolution), Image.Resampling.BICUBIC)
                return np.asarray(image, dtype=np.uint8)  # (H, W) or (H, W, 3)
        except _UNREADABLE as exn:  # it decoded in pass 1: the file changed since
            raise DataError(f"cannot read image {file}: {_reason_of(file, exn)}; expected a PNG or JPEG file") from exn

    items = [(f"img-{i:06d}", label) for i, (_, _, label) in enumerate(images)]
    meta = {"source": os.path.abspath(src), "num_classes": len(classes), "classes": classes, "channels": channels,
            "resolution": [size[1], size[0]],  # PIL sizes are (W, H); meta holds [H, W]
            "skipped_classes": sorted(empty + unreadable, key=_natural_key), "skipped_images": skipped_images}
    return _write_shards(out, items, load, meta, val_fraction, seed, shard_size)


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


def _encode_png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, "L" if array.ndim == 2 else "RGB").save(buffer, format="png")
    return buffer.getvalue()


def _write_shards(out, items: list[tuple[str, int]], load, meta: dict, val_fraction: float, seed: int,
                  shard_size: int) -> dict:
    """Shuffle `items` (key, label) with `seed`, split off the validation part and write both splits and meta.json.

    `load(i)` gives the uint8 image of item i. On an error the shards written so far are removed, so that the
    same command can run again.
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
    order = np.random.default_rng(seed).permutation(len(items))
    n_val = int(round(val_fraction * len(items)))
    n_train = len(items) - n_val
    if n_train < 1:
        raise DataError(f"no training samples left: {len(items)} images with val_fraction {val_fraction}")
    out.mkdir(parents=True, exist_ok=True)
    try:
        for split, indices in (("train", order[:n_train]), ("val", order[n_train:])):
            if len(indices) == 0:
                continue
            # mtime=0: the same inputs give byte-identical shards.
            with wds.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0, mtime=0) as sink:
                for i in indices:
                    key, label = items[i]
                    sink.write({"__key__": key, "png": _encode_png(load(int(i))), "cls": int(label)})
    except BaseException:
        for shard in out.glob("*.tar"):
            shard.unlink()
        raise
    meta = {**meta, "train": n_train, "val": n_val, "shard_size": shard_size, "seed": seed}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking shards


def list_shards(path: str | Path, split: str = "train") -> list[str]:
    """Sorted `<split>-*.tar` shard paths in the folder `path`."""
    path = Path(path)
    expected = f"expected {split}-*.tar shards {_WRITERS_HINT}"
    if not path.is_dir():
        raise DataError(f"shard folder {path} does not exist; {expected}")
    urls = sorted(str(p) for p in path.glob(f"{split}-*.tar") if p.is_file())
    if not urls:
        raise DataError(f"shard folder {path} has no {split}-*.tar shards; {expected}")
    return urls


def read_meta(path: str | Path) -> dict:
    """The meta.json of a shard folder."""
    file = Path(path) / "meta.json"
    expected = f"expected the meta.json {_WRITERS_HINT}"
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise DataError(f"missing {file}; {expected}") from None
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read {file}: {exn}; {expected}") from None
    missing = [k for k in ("num_classes", "channels", "resolution") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise DataError(f"{file} lacks {', '.join(missing)}; {expected}")
    return meta


def check_shards(urls: list[str]) -> list[str]:
    """The shards whose first sample can be read and decoded; each other one is skipped with a warning."""
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
    where = f"sample {sample.get('__key__')} of {sample.get('__url__')}"
    if "png" not in sample or "cls" not in sample:
        raise DataError(f"{where} has files {sorted(k for k in sample if not k.startswith('__'))}, "
                        f"expected png and cls")
    try:
        with Image.open(io.BytesIO(sample["png"])) as image:
            image.load()
            mode = image.mode
            pixels = np.asarray(image)
        label = int(sample["cls"])
    except (OSError, ValueError, UnidentifiedImageError) as exn:
        raise DataError(f"{where} cannot be decoded: {exn}") from exn
    if mode not in ("L", "RGB") or pixels.dtype != np.uint8:
        raise DataError(f"{where} is a {mode} image, expected 8-bit L or RGB")
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)  # (C, H, W)
    image = torch.from_numpy(np.array(pixels)).float() / 255.0 * 2.0 - 1.0
    return image, label


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.stack([image for image, _ in samples])  # (B, C, H, W)
    labels = torch.tensor([label for _, label in samples], dtype=torch.int64)  # (B,)
    return images, labels


def _reason(exn: BaseException) -> str:
    # webdataset appends " @ <file object>" to messages and the stream and url to args; keep the message only.
    message = str(exn.args[0]) if exn.args else ""
    message = message.split(" @ <")[0]
    return f"{type(exn).__name__}: {message}" if message else type(exn).__name__


def _folder_of(urls: list[str]) -> str:
    folders = sorted({os.path.dirname(os.path.abspath(u)) for u in urls})
    return folders[0] if len(folders) == 1 else os.path.commonpath(folders) if folders else "?"


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
    """Samples -> (image, label); an undecodable sample is skipped with a warning naming it and its shard."""

    def __init__(self, stats: _StreamStats):
        self.stats = stats

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int]]:
        for sample in src:
            try:
                yield decode_sample(sample)
            except DataError as exn:
                self.stats.skipped_samples += 1
                warnings.warn(f"skipping {exn}")


def iterate_split(path: str | Path, split: str = "val", batch_size: int = 256, every_rank: bool = False
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every sample of a split once, in shard order, as (images (B, C, H, W), labels (B,)); the last batch may be
    smaller. Under DDP each rank reads its own shards (split_by_node), so a rank may get nothing; with
    `every_rank` each rank reads the whole split (reference statistics that every rank must hold)."""
    urls = list_shards(path, split)
    stats = _StreamStats()
    split_stages = [] if every_rank else [wds.split_by_node, wds.split_by_worker]
    dataset = wds.DataPipeline(
        wds.SimpleShardList(urls),
        *split_stages,
        _ShardSamples(stats, max_bad_in_a_row=len(urls) + 1),  # finite: a bad shard is warned about, not fatal
        _Decode(stats),
        wds.batched(batch_size, collation_fn=_collate, partial=True),
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

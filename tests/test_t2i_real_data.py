"""benchmarks/t2i_real_data.py writes the GAN's real data for the text-to-image digits teacher as that teacher saw
its training images: each digit upsampled 8 -> 16 px by nearest neighbour (so 2x2 average pooling gives the digit
back exactly, as the digits classifier reads it) and captioned with the digit its label names."""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from t2i_real_data import write_caption_folder  # noqa: E402

from distill.data import iterate_split  # noqa: E402
from distill.metrics import DIGIT_WORDS  # noqa: E402


def test_the_caption_folder_holds_every_train_digit_at_16_px_with_its_caption(digits_shards, tmp_path):
    n = write_caption_folder(digits_shards, tmp_path)
    images, labels = zip(*iterate_split(digits_shards, "train", batch_size=10_000))
    images, labels = torch.cat(images), torch.cat(labels)
    assert n == len(labels) == len(list(tmp_path.glob("*.png"))) == len(list(tmp_path.glob("*.txt")))
    for i in (0, 1, n // 2, n - 1):
        big = np.asarray(Image.open(tmp_path / f"{i:05d}.png"), dtype=np.float64)
        assert big.shape == (16, 16)
        pooled = big.reshape(8, 2, 8, 2).mean(axis=(1, 3)) / 127.5 - 1  # 2x2 pooling, back to [-1, 1]
        assert np.abs(pooled - images[i, 0].double().numpy()).max() <= 1 / 127.5  # the digit, to 8-bit rounding
        assert (big[::2, ::2] == big[1::2, 1::2]).all()  # nearest: each 2x2 block is one value
        assert (tmp_path / f"{i:05d}.txt").read_text().strip() == f"a handwritten {DIGIT_WORDS[int(labels[i])]}"

"""The GAN term's real data for the shipped text-to-image digits teacher: the digits of data/digits (train split),
upsampled to 16 px exactly as the teacher saw them in training (nearest, configs/teacher-t2i-digits.yaml), each
captioned like the distillation's prompts ("a handwritten seven"), written as a caption folder, then shards
(`distill data captions`), then latents of the teacher's frozen VAE (`distill data latents`).

    python benchmarks/t2i_real_data.py [--out data/latents/t2i-digits]   (after `make data`; under a minute)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distill.data import iterate_split
from distill.metrics import DIGIT_WORDS
from distill.pretrain_t2i import upsample

REPO = Path(__file__).resolve().parents[1]


def write_caption_folder(digits: Path, folder: Path, resolution: int = 16) -> int:
    """Every train digit as <i>.png (nearest-upsampled, 8-bit grey) and <i>.txt ("a handwritten <word>")."""
    n = 0
    for images, labels in iterate_split(digits, "train", batch_size=512):
        big = upsample(images, resolution, "nearest")
        pixels = ((big[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for image, label in zip(pixels, labels.tolist()):
            Image.fromarray(np.ascontiguousarray(image), mode="L").save(folder / f"{n:05d}.png")
            (folder / f"{n:05d}.txt").write_text(f"a handwritten {DIGIT_WORDS[label]}\n")
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits", default=str(REPO / "data/digits"), help="digits shards [data/digits]")
    ap.add_argument("--teacher", default=str(REPO / "data/teachers/t2i-digits"), help="the pipeline whose VAE encodes")
    ap.add_argument("--out", default=str(REPO / "data/latents/t2i-digits"), help="latent shards [data/latents/t2i-digits]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, captions = Path(tmp) / "folder", Path(tmp) / "captions"
        folder.mkdir()
        n = write_caption_folder(Path(args.digits), folder)
        print(f"{n} captioned 16 px digits")
        cli = [sys.executable, "-m", "distill", "data"]
        subprocess.run(cli + ["captions", "--src", str(folder), "--out", str(captions), "--channels", "1"], check=True)
        subprocess.run(cli + ["latents", "--teacher", args.teacher, "--src", str(captions), "--out", args.out,
                              "--overwrite"], check=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

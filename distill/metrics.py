"""Fréchet distance, feature extractors and reference statistics.

    FD(N(mu1, S1), N(mu2, S2)) = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})

(Fréchet 1957; Dowson & Landau 1982; as FID: Heusel et al. 2017.) FID is FD between Gaussians fitted to feature
vectors of real and generated images. Three extractors, every one a module with `num_features` and
`extractor_id`, taking images in [-1, 1] shaped (B, C, H, W) and returning (B, num_features) float32:

    raw        the data itself, flattened (2-D mixtures)                 id "raw-<d>"
    digits     penultimate layer of the small digits CNN in data/         id "digits-cnn:<sha256[:12] of the file>"
    inception  torch-fidelity's InceptionV3 2048-d pool features         id "inception-2048:<sha256[:12]>"

The id hashes the weights file, so statistics from different weights never mix: `load_stats` refuses them.

Two ways to an FID. `fid_against_stats` (what `distill fid` uses) computes the generated samples' statistics
with `compute_stats` and compares them with a reference file through `frechet_distance`. `make_fid_metric` wraps
the same extractor in torchmetrics' FrechetInceptionDistance for the training callback, whose states DDP syncs.
What torchmetrics 1.9.0 does with a custom feature module (read from torchmetrics/image/fid.py):
  - it never rescales the input of a custom module (`normalize` only applies to its own Inception), so the
    images go in as [-1, 1] floats; we pass normalize=True to say "float images";
  - features are cast to float64 before accumulation and the states (sum, sum of outer products, count) are
    float64 from construction, no `set_dtype` needed (and `set_dtype` would cast our extractor too);
    `compute()` casts the result back to the features' dtype (float32), so it agrees with `frechet_distance`
    to about 1e-6 relative on well-conditioned features;
  - its covariance is the one-pass sum(x x^T) - n mu mu^T (cancellation when |mu| >> std) and its
    tr sqrt uses eigvals of the non-symmetric S1 S2; `frechet_distance` below is the careful version;
  - all states reduce by sum across ranks; with reset_real_features=False the real statistics survive `reset()`.

Only torch and numpy at import time; torchmetrics, torch-fidelity, tqdm and distill.data (which imports
Lightning) are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shlex
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.errors import DistillError

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_CLASSIFIER = REPO_ROOT / "data" / "classifiers" / "digits" / "classifier.pt"
INCEPTION_ENV = "DISTILL_INCEPTION_WEIGHTS"
INCEPTION_CONFIG_KEY = "eval.inception_weights"
EXTRACTORS = ("raw", "digits", "inception")
UNKNOWN_ID = "unknown"
_CLASSIFIER_FORMAT = "distill-digits-classifier/1"


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FD between N(mu1, sigma1) and N(mu2, sigma2) in float64; numpy arrays or tensors.

    tr((S1 S2)^{1/2}) = tr((S1^{1/2} S2 S1^{1/2})^{1/2}): the right side is the square root of a symmetric PSD
    matrix, so it is the sum of sqrt of its eigenvalues (eigh; round-off ones set to 0). This stays exact for
    singular and near-singular covariances, where scipy.linalg.sqrtm of the non-symmetric S1 S2 (pytorch-fid, EDM)
    needs an eps * I offset and torchmetrics' eigvals(S1 S2) can return complex pairs.
    """
    mu1, sigma1 = _as_float64(mu1, "mu1"), _as_float64(sigma1, "sigma1")
    mu2, sigma2 = _as_float64(mu2, "mu2"), _as_float64(sigma2, "sigma2")
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.ndim != 1:
            raise ValueError(f"{name} must be a vector (d,), got shape {mu.shape}")
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"mu2 must have shape ({d},) like mu1, got {mu2.shape}")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) to match mu1, got {sigma.shape}")
    sigma1 = 0.5 * (sigma1 + sigma1.T)  # round-off asymmetry only; eigh reads one triangle
    sigma2 = 0.5 * (sigma2 + sigma2.T)

    root1 = _psd_sqrt(sigma1)  # (d, d)
    inner = root1 @ sigma2 @ root1
    tr_sqrt = np.sqrt(_psd_eigenvalues(0.5 * (inner + inner.T))).sum()
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_sqrt
    # FD >= 0; identical inputs can land at -1e-15 by round-off.
    return float(max(fd, 0.0))


def _as_float64(x, name: str) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().double().numpy()
    try:
        array = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exn:
        raise ValueError(f"{name} must be a numeric array or tensor, got {type(x).__name__}") from exn
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries; expected finite statistics")
    return array


def _psd_eigenvalues(sigma: np.ndarray, vectors: bool = False):
    """Eigenvalues (and vectors) of a symmetric PSD matrix, with those at round-off level set to 0.

    Round-off level: below d * eps * the largest eigenvalue, the threshold numpy's matrix_rank uses. Keeping them
    would cost sqrt(eps) accuracy: a null direction computed as 1e-16 contributes sqrt(1e-16) = 1e-8 to a trace of
    square roots, while an eigenvalue truly that small contributes no more than that error anyway.
    """
    eigenvalues, basis = np.linalg.eigh(sigma)
    tol = sigma.shape[0] * np.finfo(np.float64).eps * max(eigenvalues.max(initial=0.0), 0.0)
    eigenvalues = np.where(eigenvalues > tol, eigenvalues, 0.0)
    return (eigenvalues, basis) if vectors else eigenvalues


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues set to 0)."""
    eigenvalues, basis = _psd_eigenvalues(sigma, vectors=True)
    return (basis * np.sqrt(eigenvalues)) @ basis.T


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor(nn.Module):
    """Frozen features: images in [-1, 1] (B, C, H, W) -> (B, num_features) float32, no grad.

    Stays in eval mode when a parent module calls .train(), like torchmetrics' NoTrainInceptionV3.
    """

    num_features: int
    extractor_id: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.features(images).float()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Raise DistillError naming the mismatch if samples of `shape` (C, H, W) are not an input of this extractor:
        one probe image, so that a run finds out before it writes anything, not at its first evaluation."""
        self(torch.zeros(1, *shape, device=next(self.parameters(), torch.zeros(())).device))


class RawFeatures(FeatureExtractor):
    """The data itself, flattened: for low-dimensional data such as the 2-D Gaussian mixtures."""

    def __init__(self, num_features: int):
        super().__init__()
        if not isinstance(num_features, (int, np.integer)) or isinstance(num_features, bool) or num_features < 1:
            raise DistillError(f"the raw extractor needs num_features, the data dimension (a positive integer), "
                               f"got {num_features!r}")
        self.num_features = int(num_features)
        self.extractor_id = f"raw-{self.num_features}"

    def features(self, images: torch.Tensor) -> torch.Tensor:
        flat = images.reshape(images.shape[0], -1)  # (B, d)
        if flat.shape[1] != self.num_features:
            raise DistillError(f"raw features: samples of shape {tuple(images.shape[1:])} have {flat.shape[1]} "
                               f"values, expected {self.num_features}")
        return flat


class DigitsClassifier(nn.Module):
    """Small CNN for 8x8 digits: conv 1->32 (8x8), conv 32->64 stride 2 (4x4), linear -> 64 features, linear -> 10.

    `features` is the penultimate (post-ReLU) layer, the analogue of Inception's pool features.
    """

    def __init__(self, channels: int = 1, resolution: tuple[int, int] = (8, 8), widths: tuple[int, int] = (32, 64),
                 num_features: int = 64, num_classes: int = 10):
        super().__init__()
        self.config = {"channels": int(channels), "resolution": [int(r) for r in resolution],
                       "widths": [int(w) for w in widths], "num_features": int(num_features),
                       "num_classes": int(num_classes)}
        height, width = resolution
        self.conv1 = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.conv2 = nn.Conv2d(widths[0], widths[1], 3, padding=1, stride=2)
        self.fc = nn.Linear(widths[1] * ((height + 1) // 2) * ((width + 1) // 2), num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x))  # (B, 32, 8, 8)
        h = F.relu(self.conv2(h))  # (B, 64, 4, 4)
        return F.relu(self.fc(h.flatten(1)))  # (B, num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes) logits


class DigitsFeatures(FeatureExtractor):
    """Penultimate features of a trained DigitsClassifier."""

    def __init__(self, classifier: DigitsClassifier, extractor_id: str):
        super().__init__()
        self.classifier = classifier.requires_grad_(False).eval()
        self.num_features = classifier.config["num_features"]
        self.extractor_id = extractor_id
        self._shape = (classifier.config["channels"], *classifier.config["resolution"])  # (C, H, W)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self._shape:
            raise DistillError(f"digits features: images of shape {tuple(images.shape[1:])}, expected "
                               f"{self._shape} (the digits classifier's input)")
        return self.classifier.features(images.float())


class InceptionFeatures(FeatureExtractor):
    """torch-fidelity's InceptionV3 (the TF-FID port) 2048-d pool features of images in [-1, 1].

    Images are quantised to uint8 as if saved to PNG, grey images repeated to RGB; torch-fidelity resizes to
    299x299 with TF1's bilinear interpolation, as in the standard protocol.
    """

    def __init__(self, network: nn.Module, extractor_id: str):
        super().__init__()
        self.network = network.requires_grad_(False).eval()
        self.num_features = 2048
        self.extractor_id = extractor_id

    def features(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DistillError(f"inception features: images of shape {tuple(images.shape)}, expected (B, 1 or 3, "
                               f"H, W)")
        pixels = ((images.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (B, C, H, W)
        if pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1)
        return self.network(pixels)[0].reshape(pixels.shape[0], -1)  # (B, 2048)


def build_extractor(name: str, path: str | Path | None = None, num_features: int | None = None) -> FeatureExtractor:
    """The feature extractor `name` ("raw", "digits" or "inception"), frozen, in eval mode, on the CPU.

    path: the weights file (digits: default data/classifiers/digits/classifier.pt; inception: default the
    environment variable DISTILL_INCEPTION_WEIGHTS). num_features: the data dimension, for "raw" only.
    """
    if name == "raw":
        return RawFeatures(num_features)
    if name == "digits":
        file = Path(path) if path is not None else DIGITS_CLASSIFIER
        classifier = load_digits_classifier(file)
        return DigitsFeatures(classifier, f"digits-cnn:{_sha12(file)}")
    if name == "inception":
        return _build_inception(path)
    raise DistillError(f"unknown feature extractor {name!r}; expected one of {', '.join(EXTRACTORS)}")


def refuse_unused_weights(name: str, source: str, features_path: str | Path | None,
                          inception_weights: str | Path | None) -> None:
    """A weights flag given for an extractor that is not the one in use is refused, not silently ignored
    (`--features-path` belongs to digits, `--inception-weights` to inception; `source` names where `name` came
    from, for the message)."""
    for flag, value, owner in (("--features-path", features_path, "digits"),
                               ("--inception-weights", inception_weights, "inception")):
        if value is not None and name != owner:
            raise DistillError(f"{flag} {str(value)!r} is for the {owner} extractor, but the features are {name} "
                               f"({source}); expected --features {owner}, or no {flag}")


def extractor_for(name: str, features_path: str | Path | None = None, inception_weights: str | Path | None = None,
                  num_features: int | None = None) -> FeatureExtractor:
    """`build_extractor` from the user's options (`eval.features`, `eval.features_path`, `eval.inception_weights`):
    the weights file that belongs to the chosen extractor."""
    return build_extractor(name, inception_weights if name == "inception" else features_path, num_features)


def _build_inception(path: str | Path | None) -> InceptionFeatures:
    try:
        import importlib

        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except Exception as exn:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        raise DistillError(
            f"the inception extractor needs the package torch-fidelity, which failed to import "
            f"({type(exn).__name__}: {exn}); expected `pip install torch-fidelity` (the optional extra "
            f"distill[inception]), which needs a torchvision matching your torch") from None
    source = path if path is not None else os.environ.get(INCEPTION_ENV) or None
    hint = (f"set the config key {INCEPTION_CONFIG_KEY} or the environment variable {INCEPTION_ENV} to a local "
            f"copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth; nothing is downloaded")
    if source is None:
        raise DistillError(f"no Inception weights file given; {hint}")
    file = Path(source).expanduser()
    if not file.is_file():
        raise DistillError(f"Inception weights file {file} does not exist; {hint}")
    try:
        network = module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                     feature_extractor_weights_path=str(file))
    except Exception as exn:
        raise DistillError(f"cannot load Inception weights {file}: {type(exn).__name__}: {exn}; expected "
                           f"torch-fidelity's InceptionV3 state dict ({hint})") from None
    return InceptionFeatures(network, f"inception-2048:{_sha12(file)}")


def _sha12(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# The digits classifier


def load_digits_classifier(path: str | Path = DIGITS_CLASSIFIER) -> DigitsClassifier:
    """A DigitsClassifier from a classifier.pt written by `train_digits_classifier`, in eval mode."""
    file = Path(path)
    expected = "expected a classifier.pt written by distill.metrics.train_digits_classifier"
    if not file.is_file():
        raise DistillError(f"digits classifier {file} does not exist; {expected}")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != _CLASSIFIER_FORMAT:
            raise ValueError(f"format is not {_CLASSIFIER_FORMAT}")
        classifier = DigitsClassifier(**{k: v for k, v in saved["config"].items()})
        classifier.load_state_dict(saved["state_dict"])
    except Exception as exn:
        raise DistillError(f"cannot load digits classifier {file}: {type(exn).__name__}: {exn}; {expected}") from None
    return classifier.eval()


def _load_split(shards: str | Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    from distill.data import iterate_split  # imports Lightning; only when reading shards

    images, labels = zip(*iterate_split(shards, split, batch_size=512))
    return torch.cat(images), torch.cat(labels)  # (N, C, H, W), (N,)


def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction, filling with the background value -1."""
    batch, channels, height, width = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, C, H+2, W+2)
    dy = torch.randint(0, 3, (batch,), generator=generator)
    dx = torch.randint(0, 3, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, None, :]  # (B, 1, 1, W)
    b = torch.arange(batch)[:, None, None, None]
    c = torch.arange(channels)[None, :, None, None]
    return padded[b, c, rows, cols]  # (B, C, H, W)


def accuracy(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of `images` whose argmax logit is the label."""
    with torch.no_grad():
        correct = sum(int((classifier(images[i:i + batch_size]).argmax(1) == labels[i:i + batch_size]).sum())
                      for i in range(0, len(images), batch_size))
    return correct / len(images)


def train_digits_classifier(shards: str | Path, out: str | Path, steps: int = 2000, batch_size: int = 128,
                            seed: int = 0, lr: float = 1e-3, command: str | None = None) -> dict:
    """Train the digits feature classifier on the train split of `shards`, evaluate it on the val split, and write
    `out/classifier.pt` (state_dict + architecture) and `out/classifier.json`; returns the json's dict.

    AdamW with cosine decay, random +-1 pixel shifts. `command` is recorded as the command that made the file
    (default: this process's command line, sys.orig_argv).
    """
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise DistillError(f"steps and batch_size must be positive and lr > 0, got steps={steps}, "
                           f"batch_size={batch_size}, lr={lr}")
    start = time.perf_counter()
    train_x, train_y = _load_split(shards, "train")
    val_x, val_y = _load_split(shards, "val")
    num_classes = int(max(train_y.max(), val_y.max())) + 1

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's global RNG
        torch.manual_seed(seed)
        classifier = DigitsClassifier(train_x.shape[1], tuple(train_x.shape[2:]), num_classes=num_classes)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    classifier.train()
    for _ in range(steps):
        index = torch.randint(0, len(train_x), (batch_size,), generator=generator)
        loss = F.cross_entropy(classifier(_random_shift(train_x[index], generator)), train_y[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    classifier.eval()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()  # saved via a buffer: the zip's inner folder name is then fixed, not the temp file's
    torch.save({"format": _CLASSIFIER_FORMAT, "config": classifier.config, "state_dict": classifier.state_dict()},
               buffer)
    _write_atomic(out / "classifier.pt", buffer.getvalue())
    if command is None:  # the command line of this process, `python -c '...'` included
        command = shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])
    info = {
        "val_accuracy": accuracy(classifier, val_x, val_y),
        "train_accuracy": accuracy(classifier, train_x, train_y),
        "train_steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "command": command,
        "extractor_id": f"digits-cnn:{_sha12(out / 'classifier.pt')}",
        "num_features": classifier.config["num_features"],
        "shards": _shards_meta(shards),
        "val_samples": len(val_x),
        "train_samples": len(train_x),
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    _write_atomic(out / "classifier.json", (json.dumps(info, indent=2) + "\n").encode())
    return info


def _shards_meta(shards: str | Path) -> dict | None:
    from distill.data import read_meta

    try:
        return read_meta(shards)
    except DistillError:
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Statistics


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def compute_stats(extractor: FeatureExtractor, batches: Iterable, max_samples: int | None = None,
                  progress: bool = False) -> dict:
    """Mean and covariance (ddof 1, float64) of the extractor's features over `batches` of images or
    (images, labels) tuples, up to `max_samples` samples.

    Accumulates sums around the first batch's mean (shifted data), so a large mean does not cancel the covariance.
    """
    if max_samples is not None and max_samples < 2:
        raise DistillError(f"max_samples must be at least 2 to estimate a covariance, got {max_samples}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_samples, desc=f"features ({extractor.extractor_id})", unit="img", file=sys.stderr)
    device = _device_of(extractor)
    d = extractor.num_features
    n, shift = 0, None
    total = torch.zeros(d, dtype=torch.float64)
    outer = torch.zeros(d, d, dtype=torch.float64)
    for batch in batches:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        if max_samples is not None:
            images = images[: max_samples - n]
        if len(images) == 0:
            break
        features = extractor(images.to(device)).double().cpu()  # (B, d)
        if features.shape != (len(images), d):
            raise DistillError(f"extractor {extractor.extractor_id} returned features of shape "
                               f"{tuple(features.shape)}, expected ({len(images)}, {d})")
        if shift is None:
            shift = features.mean(0)
        centred = features - shift
        total += centred.sum(0)
        outer += centred.T @ centred
        n += len(images)
        if bar is not None:
            bar.update(len(images))
        if max_samples is not None and n >= max_samples:
            break
    if bar is not None:
        bar.close()
    if n < 2:
        raise DistillError(f"statistics need at least 2 samples, got {n}; expected a non-empty set of images")
    mean_centred = total / n
    sigma = (outer - n * torch.outer(mean_centred, mean_centred)) / (n - 1)
    return {"mu": (shift + mean_centred).numpy(), "sigma": (0.5 * (sigma + sigma.T)).numpy(), "n": n,
            "extractor_id": extractor.extractor_id}


def stats_from_shards(extractor: FeatureExtractor, shards: str | Path, split: str = "train", batch_size: int = 256,
                      max_samples: int | None = None, progress: bool = False) -> dict:
    """`compute_stats` over every image of one split of a shard folder (what `distill stats` computes)."""
    from distill.data import iterate_split  # imports Lightning; only when reading shards

    return compute_stats(extractor, iterate_split(shards, split, batch_size), max_samples, progress)


def save_stats(path: str | Path, stats: dict) -> None:
    """Write mu, sigma, n and extractor_id to an npz file (temp file + rename)."""
    mu, sigma = np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, mu=mu, sigma=sigma, n=np.int64(stats["n"]), extractor_id=np.str_(stats["extractor_id"]))
    _write_atomic(Path(path), buffer.getvalue())


def load_stats(path: str | Path, expected_extractor_id: str | None = None, num_features: int | None = None) -> dict:
    """Reference statistics {mu, sigma, n, extractor_id, sha} from `save_stats` files or EDM-style npz (mu, sigma
    only; then extractor_id "unknown" and n 0). `sha` identifies the numbers (`stats_sha`), not the file.

    With `expected_extractor_id`, statistics of another known extractor are refused; unknown ones are accepted
    with a warning when their size equals `num_features` (when given). Statistics no extractor could have made
    (a placeholder, a sigma that is no covariance) are refused: they would give a number, not an FID.
    """
    file = Path(path)
    expected = "expected an npz file with mu (d,) and sigma (d, d), as written by `distill stats`"
    if not file.is_file():
        raise DistillError(f"reference statistics {file} do not exist; {expected}")
    try:
        with np.load(file, allow_pickle=False) as data:
            contents = {key: data[key] for key in data.files}
    except Exception as exn:
        raise DistillError(f"cannot read reference statistics {file}: {type(exn).__name__}: {exn}; "
                           f"{expected}") from None
    missing = [key for key in ("mu", "sigma") if key not in contents]
    if missing:
        raise DistillError(f"reference statistics {file} lack {', '.join(missing)} (has {sorted(contents)}); "
                           f"{expected}")
    mu, sigma = contents["mu"].astype(np.float64), contents["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise DistillError(f"reference statistics {file} have mu of shape {mu.shape} and sigma of shape "
                           f"{sigma.shape}; {expected}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise DistillError(f"reference statistics {file} have non-finite entries; {expected}")
    extractor_id = str(contents["extractor_id"][()]) if "extractor_id" in contents else UNKNOWN_ID
    n = int(contents["n"][()]) if "n" in contents else 0
    if num_features is not None and len(mu) != num_features:
        raise DistillError(f"reference statistics {file} have {len(mu)} features ({extractor_id}), the extractor "
                           f"{expected_extractor_id or ''} gives {num_features}; expected the same extractor")
    if expected_extractor_id is not None and extractor_id not in (UNKNOWN_ID, expected_extractor_id):
        raise DistillError(f"reference statistics {file} made with {extractor_id}, features are "
                           f"{expected_extractor_id}; expected the same extractor")
    _check_covariance(file, mu, sigma)
    if expected_extractor_id is not None and extractor_id == UNKNOWN_ID:
        warnings.warn(f"reference statistics {file} do not say which extractor made them; assuming "
                      f"{expected_extractor_id} ({len(mu)} features)", stacklevel=2)
    return {"mu": mu, "sigma": sigma, "n": n, "extractor_id": extractor_id, "sha": stats_sha(mu, sigma)}


# Relative tolerance of the covariance checks: far above the round-off of a covariance computed or stored in
# float32 (about sqrt(d) * 6e-8 of its largest entry), far below what a wrong matrix is off by (order 1).
_COVARIANCE_TOL = 1e-4


def _check_covariance(file: Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    """Refuse statistics that no feature extractor produced: mu = 0 with sigma = I exactly (the stub a script
    writes before the real statistics exist), a sigma that is not symmetric, or one with a clearly negative
    eigenvalue (a covariance is symmetric positive semi-definite)."""
    d = len(mu)
    if not mu.any() and np.array_equal(sigma, np.eye(d)):
        raise DistillError(f"reference statistics {file} are a placeholder (mu = 0, sigma = the identity, "
                           f"{d} features); expected statistics of real images from `distill stats` (or EDM's)")
    scale = float(np.abs(sigma).max())  # d >= 1 here: d = 0 is the placeholder above
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > _COVARIANCE_TOL * scale:
        raise DistillError(f"reference statistics {file} have a sigma that is not symmetric (max |sigma - "
                           f"sigma^T| = {asymmetry:.3g}, max |sigma| = {scale:.3g}); expected a covariance matrix")
    eigenvalues = np.linalg.eigvalsh(sigma)  # reads one triangle: symmetric up to the tolerance above
    lowest, highest = float(eigenvalues[0]), float(eigenvalues[-1])  # ascending
    if lowest < -_COVARIANCE_TOL * max(highest, 0.0):
        raise DistillError(f"reference statistics {file} have a sigma with a negative eigenvalue ({lowest:.3g}; "
                           f"largest {highest:.3g}); expected a covariance matrix (positive semi-definite)")


def stats_sha(mu, sigma) -> str:
    """First 12 hex digits of sha256 over mu and sigma as float64 bytes: the same numbers give the same id
    whatever the file's name, dtype or other entries (what `distill fid`'s results file is keyed on)."""
    mu, sigma = np.ascontiguousarray(mu, np.float64), np.ascontiguousarray(sigma, np.float64)
    return hashlib.sha256(mu.tobytes() + sigma.tobytes()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# FID


def make_fid_metric(extractor: FeatureExtractor):
    """torchmetrics' FrechetInceptionDistance over `extractor` (synced across DDP ranks by torchmetrics).

    Feed images in [-1, 1] with `update(images, real=...)` (not `metric(...)`, which also computes a per-batch
    FID); real statistics are kept across `reset()`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    # torchmetrics reads the size from `extractor.num_features` (it takes no num_features argument); without that
    # attribute it would probe the module with a 3x299x299 dummy image.
    return FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)


def fid_against_stats(extractor: FeatureExtractor, fake_batches: Iterable, ref_stats: str | Path | dict,
                      progress: bool = False, max_samples: int | None = None) -> dict:
    """FID of the images in `fake_batches` against reference statistics (a file or a `load_stats` dict):
    {fid, n, ref_n, extractor_id}."""
    if isinstance(ref_stats, dict):
        ref_id = ref_stats.get("extractor_id", UNKNOWN_ID)
        if ref_id not in (UNKNOWN_ID, extractor.extractor_id):
            raise DistillError(f"reference statistics made with {ref_id}, features are {extractor.extractor_id}; "
                               f"expected the same extractor")
        ref = ref_stats
    else:
        ref = load_stats(ref_stats, extractor.extractor_id, extractor.num_features)
    if len(ref["mu"]) != extractor.num_features:
        raise DistillError(f"reference statistics have {len(ref['mu'])} features, the extractor "
                           f"{extractor.extractor_id} gives {extractor.num_features}; expected the same extractor")
    fake = compute_stats(extractor, fake_batches, max_samples=max_samples, progress=progress)
    fid = frechet_distance(fake["mu"], fake["sigma"], ref["mu"], ref["sigma"])
    return {"fid": fid, "n": fake["n"], "ref_n": int(ref.get("n", 0)), "extractor_id": extractor.extractor_id}


# ----------------------------------------------------------------------------------------------------------------
# Prompt accuracy: does a text-to-image sample show the digit its prompt names?

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DIGIT_PHRASE = re.compile(r"\ba handwritten (" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a prompt names in the words `a handwritten <zero|one|...|nine>`, else None."""
    m = _DIGIT_PHRASE.search(prompt)
    return DIGIT_WORDS.index(m.group(1).lower()) if m else None


def prompt_digits(prompts: list[str]) -> list[int]:
    """The digit of every prompt; a prompt that names none is a DistillError (prompt accuracy is undefined)."""
    digits = [digit_of_prompt(p) for p in prompts]
    missing = [p for p, d in zip(prompts, digits) if d is None]
    if missing:
        raise DistillError(f"prompt accuracy needs prompts that name a digit as 'a handwritten <zero..nine>'; "
                           f"{len(missing)} of {len(prompts)} do not, e.g. {missing[0]!r} (set "
                           f"eval.prompt_accuracy=false)")
    return digits


class PromptAccuracy:
    """Counts samples the digits classifier assigns to the digit of their prompt, batch by batch, beside another
    consumer of the same batches (`observe` passes them through). Sample i of the protocol has prompt
    `prompts[i % len(prompts)]` (distill.evaluate.protocol_inputs); `start` is the index of the first sample."""

    def __init__(self, classifier: nn.Module, prompts: list[str], start: int = 0):
        self.classifier = classifier
        self.digits = torch.tensor(prompt_digits(prompts))
        self.next = start
        self.correct = 0
        self.n = 0

    def observe(self, batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for images in batches:
            index = torch.arange(self.next, self.next + len(images)) % len(self.digits)
            with torch.no_grad():
                predicted = self.classifier(images.float()).argmax(1).cpu()
            self.correct += int((predicted == self.digits[index]).sum())
            self.n += len(images)
            self.next += len(images)
            yield images

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.n, 1)

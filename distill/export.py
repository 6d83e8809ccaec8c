"""`distill export`: the student as a folder that stock diffusers loads and samples (docs/export.md).

The student samples at the run's timesteps t_0 > ... > t_{S-1} (generator.timesteps; one step at generator.t_init,
default T - 1, when it is null): step k gives x0_k = D_theta(x_k, t_k), the x0-prediction of the generator's UNet,
from x_0 = z and, for k > 0, x_k = alpha_{t_k} x0_{k-1} + sigma_{t_k} eps_k with fresh noise eps_k; the sample is
the last x0 (distill.teachers.Generator; docs/method.md §2, VP schedules; DMD2, Yin et al. 2024, §4.4).
diffusers' `LCMScheduler` (Luo et al. 2023, Latent Consistency Models; diffusers schedulers/scheduling_lcm.py,
`step`) samples it with custom `timesteps=[t_0, ..., t_{S-1}]`: at each t_k it converts the UNet output to x0 by the
prediction type, takes denoised = c_skip x_t + c_out x0 with c_skip = 0.25 / ((s t_k)^2 + 0.25) and
c_out = s t_k / sqrt((s t_k)^2 + 0.25) (s = `timestep_scaling`), and, before every step but the last, re-noises
denoised to t_{k+1} with one fresh randn of the sample's shape from the sampling generator; the last step adds no
noise. The exported scheduler takes the teacher's betas and prediction type, no clipping, and an s with
c_skip(t) <= 1e-8 at every timestep of the list (the smallest is the binding one), so each step is the student's
to float32 precision. `original_inference_steps` = T puts every index on LCM's "training schedule" (no warnings
about the list; with `num_inference_steps=S` alone LCM picks T - 1 - floor(j T / S), j < S: DMD2's
[999, 749, 499, 249] for S = 4, T = 1000). (`timestep_spacing` plays no part: LCMScheduler ignores it.)

Written to DIR (built in DIR.tmp-XXXX, then renamed into place):
- pipeline teachers (model_index.json: StableDiffusionPipeline, StableDiffusionXLPipeline): the teacher's
  components except unet and scheduler, copied byte for byte; unet/ (the student); scheduler/ (LCMScheduler);
  model_index.json naming LCMScheduler;
- UNet2DModel teachers: unet/ and scheduler/;
- both: distill.json with the `timesteps` to sample at (the whole list), the prediction type and where the student
  came from.

LoRA generators (peft adapter weights, `lora_A` / `lora_B` in the key names) are merged into the base weights,
W = W0 + (alpha / r) B A (Hu et al. 2021, LoRA, eq. 3; as peft's LoraLayer.get_delta_weight), so the exported UNet
is a plain UNet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from distill.errors import DistillError

EMA_PREFIX = "ema.denoiser.net.unet."  # the EMA generator: what users sample
RAW_PREFIX = "generator.denoiser.net.unet."
INFO_FILE = "distill.json"
C_SKIP_MAX = 1e-8  # LCM's c_skip at each timestep: the share of a step's input left in that step's output
LCM_SIGMA_DATA = 0.5  # fixed inside LCMScheduler.get_scalings_for_boundary_condition_discrete
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$")


def export(ckpt: str | Path, out: str | Path, *, teacher: str | None = None, raw: bool = False,
           overwrite: bool = False, progress: bool = True) -> dict:
    """Write the student of `ckpt` (a checkpoint, or the newest in a run directory or checkpoints folder) to `out`
    as a diffusers folder; `teacher` replaces the run's teacher folder; `raw` exports the raw generator instead of
    its EMA copy. Returns what distill.json holds."""
    from distill import __version__
    from distill.evaluate import list_checkpoint_files, read_checkpoint

    path = list_checkpoint_files(ckpt)[-1]
    state = read_checkpoint(path)
    cfg = _run_config(path, state)
    teacher_dir = _teacher_folder(path, cfg, teacher)
    out = Path(out)
    _check_out(out, overwrite, {"checkpoint": path, "teacher folder": teacher_dir})

    prefix = RAW_PREFIX if raw else EMA_PREFIX
    weights = {k[len(prefix):]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise DistillError(f"checkpoint {str(path)!r} holds no {prefix}* weights; expected the UNet generator of a "
                           f"`distill fit` run")
    loaded, sched_dir = _load_teacher(teacher_dir)
    denoiser = loaded.denoiser
    if denoiser.schedule.kind != "vp":
        raise DistillError(f"teacher folder {str(teacher_dir)!r} has an EDM schedule; export writes an LCMScheduler, "
                           f"which needs a DDPM-family (VP) schedule: nothing to export to diffusers")
    timesteps = student_timesteps(path, cfg, denoiser.T)
    # the student as trained, whatever dtype the frozen teacher has; .float(), not .to(torch.float32), on which
    # diffusers logs a line about fp32 modules
    unet = denoiser.net.unet.float()
    lora_alpha = (cfg.get("generator") or {}).get("lora_alpha")
    if lora_alpha is None:  # a config written before the key existed: its default
        from distill.config import GeneratorConfig

        lora_alpha = GeneratorConfig().lora_alpha
    weights = merge_lora(weights, unet.state_dict(), lora_alpha)
    try:
        unet.load_state_dict(weights)
    except RuntimeError as e:
        detail = [ln.strip() for ln in str(e).splitlines() if ln.strip()][-1][:200]
        raise DistillError(f"checkpoint {str(path)!r}: its UNet does not fit the one in teacher folder "
                           f"{str(teacher_dir)!r} ({detail}); expected the teacher the run distilled "
                           f"(--teacher FOLDER)") from None
    scheduler = lcm_scheduler(_scheduler_config(sched_dir), denoiser.schedule.alpha ** 2, denoiser.prediction_type,
                              timesteps)

    pipeline = loaded.layout != "unet"
    index = json.loads((teacher_dir / "model_index.json").read_text()) if pipeline else None
    info = {
        "timesteps": timesteps,
        "prediction_type": denoiser.prediction_type,
        "pipeline": index["_class_name"] if pipeline else "UNet2DModel",
        "num_classes": denoiser.num_classes if not pipeline else None,
        "teacher": str(teacher_dir.resolve()),
        "checkpoint": str(path),
        "step": int(state["distill"].get("step", 0)),
        "weights": "raw" if raw else "ema",
        "lcm_c_skip": max(scheduler.get_scalings_for_boundary_condition_discrete(t)[0] for t in timesteps),
        "distill_version": __version__,
    }
    components = [name for name, entry in (index or {}).items()
                  if name not in ("unet", "scheduler") and not name.startswith("_") and isinstance(entry, list)
                  and entry[0] is not None and (teacher_dir / name).is_dir()]
    from tqdm.auto import tqdm

    with _atomic_folder(out) as tmp:
        for name in tqdm([*components, "unet", "scheduler", INFO_FILE], desc="export", unit="part", file=sys.stderr,
                         disable=not progress):
            if name == "unet":
                unet.save_pretrained(tmp / "unet")
            elif name == "scheduler":
                scheduler.save_pretrained(tmp / "scheduler")
            elif name == INFO_FILE:
                if pipeline:
                    index["scheduler"] = ["diffusers", "LCMScheduler"]
                    (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
                (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
            else:  # byte for byte (links followed: a hub cache snapshot holds links to its blobs)
                shutil.copytree(teacher_dir / name, tmp / name)
    return info


def student_timesteps(path: Path, cfg: dict, T: int) -> list[int]:
    """The timesteps the run's student samples at, as distill.teachers.Generator takes them: the run's
    generator.timesteps, or [generator.t_init], or [T - 1] (a run written before either key). Each must be in
    [1, T) (at 0 LCMScheduler's boundary condition returns its input unchanged) and the list strictly decreasing."""
    generator = cfg.get("generator") or {}
    t_init, timesteps = generator.get("t_init"), generator.get("timesteps")
    if timesteps is None:
        where = f"checkpoint {str(path)!r}: generator.t_init {t_init}"
        timesteps = [T - 1 if t_init is None else t_init]
    else:
        where = f"checkpoint {str(path)!r}: generator.timesteps {timesteps}"
    if not (isinstance(timesteps, list) and timesteps
            and all(isinstance(t, int) and not isinstance(t, bool) for t in timesteps)):
        raise DistillError(f"{where}; expected integer time indices in [1, {T}) (a non-empty list of them for "
                           f"generator.timesteps)")
    if any(not 0 < t < T for t in timesteps):
        raise DistillError(f"{where}; expected indices in [1, {T}) of the teacher's {T} time steps (at 0, "
                           f"LCMScheduler's boundary condition returns its input unchanged)")
    if any(a <= b for a, b in zip(timesteps, timesteps[1:])):
        raise DistillError(f"{where}; expected strictly decreasing time indices (sampling starts at the first)")
    if generator.get("timesteps") is not None and t_init is not None and t_init != timesteps[0]:
        raise DistillError(f"checkpoint {str(path)!r}: generator.t_init {t_init} with generator.timesteps "
                           f"{timesteps}; expected t_init null or the first of the timesteps")
    return list(timesteps)


def lcm_scheduler(teacher_config: dict, alphas_cumprod: Tensor, prediction_type: str,
                  timesteps: Sequence[int] | int):
    """An LCMScheduler that samples the student at `timesteps` (one index: the one-step student's t_init) on the
    teacher's schedule: its betas (the config's, or the teacher's alphas_cumprod as trained_betas where LCMScheduler
    would compute others), its prediction type, no clipping, a `timestep_scaling` s with
    c_skip(t) = 0.25 / ((s t)^2 + 0.25) <= C_SKIP_MAX at every t of the list (10, LCM's default, when all are
    >= 500), and `original_inference_steps` = T, so that LCMScheduler.set_timesteps takes any list of indices in
    [0, T) without warning that they are off its training schedule (only a first index other than T - 1 is
    warned about)."""
    from diffusers import LCMScheduler

    timesteps = [timesteps] if isinstance(timesteps, int) else list(timesteps)
    T = alphas_cumprod.numel()
    keys = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")
    kwargs = {k: teacher_config[k] for k in keys if teacher_config.get(k) is not None}
    scaling = max(10.0, math.sqrt(LCM_SIGMA_DATA ** 2 / C_SKIP_MAX) / min(timesteps))
    kwargs.update(num_train_timesteps=T, original_inference_steps=T, prediction_type=prediction_type,
                  clip_sample=False, thresholding=False, timestep_scaling=scaling,
                  steps_offset=1)  # unused by LCMScheduler; StableDiffusionPipeline warns about any other value
    abar = alphas_cumprod.to(torch.float64)
    try:
        scheduler = LCMScheduler(**kwargs)
        same = torch.allclose(scheduler.alphas_cumprod.double(), abar, rtol=1e-6, atol=0.0)
    except NotImplementedError:  # a beta_schedule LCMScheduler does not know
        same = False
    if not same:
        betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        kwargs.update(trained_betas=betas.tolist(), rescale_betas_zero_snr=False)
        scheduler = LCMScheduler(**kwargs)
    for t in timesteps:
        c_skip, _ = scheduler.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip <= C_SKIP_MAX * (1 + 1e-6), (t, c_skip)
    return scheduler


def merge_lora(weights: dict[str, Tensor], base: dict[str, Tensor], lora_alpha: float) -> dict[str, Tensor]:
    """A plain UNet state dict from one with peft LoRA layers: W = W0 + (alpha / r) B A for every adapted module
    (Linear: B A; Conv2d: as peft's LoraLayer.get_delta_weight). Base weights the checkpoint does not hold (a run
    that saved its adapters only) are `base`'s, the teacher's. lora_alpha: the run's generator.lora_alpha.
    Weights without adapters are returned as they are."""
    pairs: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    adapters = set()
    for key, value in weights.items():
        m = _LORA_KEY.match(key)
        if m:
            pairs.setdefault(m["module"], {})[m["ab"]] = value
            adapters.add(m["adapter"])
        elif "lora_" in key:
            raise DistillError(f"the generator has adapter weights {key!r} that export cannot merge; expected LoRA "
                               f"layers (lora_A / lora_B) only")
        else:
            plain[key.replace(".base_layer.", ".")] = value
    if not pairs:
        return weights
    if len(adapters) > 1:
        raise DistillError(f"the generator has {len(adapters)} LoRA adapters ({', '.join(sorted(adapters))}); "
                           f"expected one")
    merged = {**base, **plain}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise DistillError(f"LoRA layer {module!r} has lora_{'A' if 'A' in ab else 'B'} without "
                               f"lora_{'B' if 'A' in ab else 'A'}; expected both")
        A, B = ab["A"].double(), ab["B"].double()  # (r, in[, k, k]), (out, r[, 1, 1])
        r = A.shape[0]
        scale = float(lora_alpha) / r
        W = merged[f"{module}.weight"]
        if W.dim() == 2:
            delta = B @ A
        elif W.shape[2:] == (1, 1):
            delta = (B.flatten(1) @ A.flatten(1))[:, :, None, None]
        else:
            delta = torch.nn.functional.conv2d(A.transpose(0, 1), B).transpose(0, 1)
        merged[f"{module}.weight"] = (W.double() + scale * delta).to(W.dtype)
    return merged


# --------------------------------------------------------------------------------------------------------------
# Inputs and the output folder.


def _run_config(path: Path, state: dict) -> dict:
    import yaml

    from distill.evaluate import _run_config_text

    info = state["distill"]
    text = info["config"] if "config" in info else _run_config_text(path)
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError:
        cfg = None
    if not isinstance(cfg, dict):
        raise DistillError(f"checkpoint {str(path)!r} holds no readable run config; expected a file written by "
                           f"`distill fit`")
    teacher, generator = cfg.get("teacher") or {}, cfg.get("generator") or {}
    if teacher.get("kind", "diffusers") != "diffusers" or generator.get("init", "teacher") != "teacher":
        what = (f"the {teacher.get('kind')} teacher" if teacher.get("kind", "diffusers") != "diffusers"
                else f"a generator.init={generator.get('init')} generator")
        raise DistillError(f"checkpoint {str(path)!r} distils {what}: its generator is a small MLP with no diffusers "
                           f"counterpart, so there is nothing to export to diffusers; expected a run on a diffusers "
                           f"teacher folder")
    return cfg


def _teacher_folder(path: Path, cfg: dict, teacher: str | None) -> Path:
    if teacher is not None:
        if not Path(teacher).is_dir():
            raise DistillError(f"--teacher {teacher!r} does not exist; expected the run's teacher folder (a diffusers "
                               f"UNet folder or pipeline folder)")
        return Path(teacher).resolve()
    stored = (cfg.get("teacher") or {}).get("path")
    if not (stored and Path(stored).is_dir()):
        where = "" if stored is None or os.path.isabs(stored) else f" (relative to {os.getcwd()})"
        raise DistillError(f"checkpoint {str(path)!r} was made with teacher folder {stored!r}, which does not exist"
                           f"{where}; expected the teacher there, or --teacher FOLDER naming where it is now")
    return Path(stored).resolve()


def _load_teacher(folder: Path):
    """The teacher as `distill fit` loads it, and its scheduler folder."""
    from distill.teachers import load_teacher

    loaded = load_teacher(folder)
    if loaded.layout != "unet" or (folder / "unet" / "config.json").is_file():
        return loaded, folder / "scheduler"
    return loaded, folder  # a bare model folder: config.json beside scheduler_config.json


def _scheduler_config(sched_dir: Path) -> dict:
    return json.loads((sched_dir / "scheduler_config.json").read_text())


def _check_out(out: Path, overwrite: bool, keep: dict[str, Path]) -> None:
    if out.exists() and not out.is_dir():
        raise DistillError(f"--out {str(out)!r} is a file; expected a folder to write the student into")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DistillError(f"--out {str(out)!r} already holds files; expected a new or empty folder, or "
                               f"--overwrite to replace it")
        for what, p in keep.items():
            if p.resolve().is_relative_to(out.resolve()):
                raise DistillError(f"--out {str(out)!r} holds the {what} {str(p)!r}, which --overwrite would delete; "
                                   f"expected another folder")


@contextmanager
def _atomic_folder(out: Path):
    """A fresh folder beside `out` to build in; renamed to `out` (replacing what is there) only when the block
    ends without an error, and removed otherwise."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide the folder from the user's group
        yield tmp
        old = None
        if out.is_dir() and any(out.iterdir()):
            old = out.with_name(f"{tmp.name.replace('.tmp-', '.old-', 1)}")
            os.replace(out, old)
        os.replace(tmp, out)  # onto a missing or empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The command line.


def add_export_parser(subparsers, formatter_class) -> argparse.ArgumentParser:
    """`distill export CKPT --out DIR`."""
    summary = "write the student as a diffusers folder (the teacher's pipeline, or UNet + scheduler)"
    sp = subparsers.add_parser(
        "export", help=summary, formatter_class=formatter_class,
        description=textwrap.dedent("""\
            Write the student of a `distill fit` checkpoint (the EMA generator; --raw: the raw one) as a folder
            that stock diffusers loads. For a pipeline teacher (StableDiffusionPipeline or
            StableDiffusionXLPipeline) DIR is the teacher's pipeline with the student UNet and an LCMScheduler;
            for a UNet2DModel teacher it holds unet/ and scheduler/ (LCMScheduler). DIR/distill.json names the
            `timesteps` to sample at (the run's generator.timesteps, or [generator.t_init] for a one-step student)
            and where the student came from. LCMScheduler steps at those timesteps from noise z give the student's
            sample: each step's x0, re-noised with fresh noise to the next timestep, the last step's x0 as it is
            (DMD2's multi-step sampler). LoRA weights are merged into the UNet. See docs/export.md."""),
        epilog=textwrap.dedent("""\
            examples:
              distill export runs/sd15 --out students/sd15
              distill export runs/digits/checkpoints/step=0002000.ckpt --out students/digits --overwrite
            then, in Python (t: distill.json's timesteps, e.g. [999] or [999, 749, 499, 249]):
              StableDiffusionPipeline.from_pretrained("students/sd15")(prompt, num_inference_steps=len(t),
                                                                       timesteps=t, guidance_scale=0)"""))
    sp.add_argument("ckpt", metavar="CKPT",
                    help="checkpoint file, or a run directory or its checkpoints/ folder (its newest checkpoint)")
    sp.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be new or empty)")
    sp.add_argument("--overwrite", action="store_true", help="replace DIR if it already holds files")
    sp.add_argument("--raw", action="store_true", help="export the raw generator instead of its EMA copy")
    sp.add_argument("--teacher", metavar="FOLDER",
                    help="the run's teacher folder, where it is now (a moved teacher, or a run whose config stored a "
                         "relative teacher.path) [the run's teacher.path]")
    return sp


def cmd_export(args: argparse.Namespace) -> int:
    info = export(args.ckpt, args.out, teacher=args.teacher, raw=args.raw, overwrite=args.overwrite)
    t = info["timesteps"]
    print(f"wrote {args.out}: the {info['weights']} student of step {info['step']} ({info['checkpoint']}), "
          f"{info['pipeline']}, timesteps {t}")
    steps = f"{len(t)} step{'s' if len(t) > 1 else ''}"
    if info["pipeline"] == "UNet2DModel":
        print(f"sample it: UNet2DModel + LCMScheduler from {args.out}/unet and {args.out}/scheduler, "
              f"scheduler.set_timesteps(timesteps={t}), {steps} (docs/export.md)")
    else:
        print(f"sample it: {info['pipeline']}.from_pretrained({str(args.out)!r})(prompt, "
              f"num_inference_steps={len(t)}, timesteps={t}, guidance_scale=0)")
    return 0

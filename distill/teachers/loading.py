"""Teachers from folders on disk, loaded with `from_pretrained` and nothing downloaded:

- a diffusers UNet2DModel folder (unet/ and scheduler/, or one model folder): a pixel-space teacher, class-
  conditional or not (EDM schedules included);
- a diffusers pipeline folder (model_index.json) in the Stable Diffusion 1.x/2.x layout (StableDiffusionPipeline:
  UNet2DConditionModel, AutoencoderKL, CLIPTextModel with its CLIPTokenizer, a scheduler) or the SDXL layout
  (StableDiffusionXLPipeline: two text encoders, pooled embeddings, time ids): a latent text-to-image teacher,
  epsilon- or v-prediction.

Anything else stops with one TeacherError naming what was found and what is supported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from distill.errors import TeacherError
from distill.schedules import Schedule, edm_schedule, vp_schedule
from distill.teachers.denoiser import Denoiser, TextUNetAdapter, UNetAdapter
from distill.teachers.text import LatentCodec, TextEncoder


def build_unet(sample_shape: tuple[int, int, int], num_classes: int | None, block_out_channels: list[int],
               layers_per_block: int, attention: bool) -> nn.Module:
    """A small diffusers UNet2DModel; conditional nets get num_classes + 1 label embeddings (the last is null)."""
    from diffusers import UNet2DModel

    C, H, W = sample_shape
    levels = len(block_out_channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = math.gcd(*block_out_channels, 32)
    return UNet2DModel(
        sample_size=(H, W), in_channels=C, out_channels=C, block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        num_class_embeds=None if num_classes is None else num_classes + 1, norm_num_groups=groups,
        attention_head_dim=min(8, block_out_channels[-1]),
    )


def _teacher_folders(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise TeacherError(f"teacher folder {str(path)!r} does not exist; expected a diffusers folder with "
                           f"unet/ and scheduler/ (save_pretrained layout)")
    if (path / "unet" / "config.json").is_file():
        model_dir, sched_dir = path / "unet", path / "scheduler"
    else:
        model_dir, sched_dir = path, path
    if not (model_dir / "config.json").is_file():
        raise TeacherError(f"teacher folder {str(path)!r} has no unet/config.json (nor config.json); expected a "
                           f"diffusers UNet saved with save_pretrained")
    if not (sched_dir / "scheduler_config.json").is_file():
        raise TeacherError(f"teacher folder {str(path)!r} has no scheduler_config.json in {str(sched_dir)!r}; "
                           f"expected the diffusers scheduler saved beside the model")
    return model_dir, sched_dir


def load_schedule(sched_dir: Path) -> tuple[Schedule, str, dict]:
    """Schedule and prediction type from a diffusers scheduler folder."""
    import diffusers

    config = json.loads((sched_dir / "scheduler_config.json").read_text())
    name = config.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise TeacherError(f"{sched_dir}/scheduler_config.json names an unknown scheduler class {name!r}")
    scheduler = cls.from_pretrained(sched_dir)
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if name == "EDMEulerScheduler":
        c = scheduler.config
        T = int(c.get("num_train_timesteps", 1000))
        return edm_schedule(T, c["sigma_min"], c["sigma_max"], c["rho"]), prediction_type, dict(c)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TeacherError(f"scheduler {name} in {sched_dir} has no alphas_cumprod; expected a DDPM-family "
                           f"scheduler or EDMEulerScheduler")
    return vp_schedule(scheduler.alphas_cumprod), prediction_type, dict(scheduler.config)


def load_diffusers_teacher(path: str | Path) -> Denoiser:
    """A frozen Denoiser around a UNet2DModel loaded with `from_pretrained` from a local folder (no network)."""
    from diffusers import UNet2DModel

    model_dir, sched_dir = _teacher_folders(Path(path))
    schedule, prediction_type, sched_config = load_schedule(sched_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise TeacherError(f"{model_dir}/config.json is a {config.get('_class_name')}; expected UNet2DModel (or a "
                           f"pipeline folder with model_index.json: {_SUPPORTED})")
    try:
        unet = UNet2DModel.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise TeacherError(f"cannot load the UNet in {str(model_dir)!r}: {str(e).splitlines()[0]}") from None
    n_emb = unet.config.num_class_embeds
    denoiser = Denoiser(UNetAdapter(unet), schedule, prediction_type,
                        num_classes=None if n_emb is None else n_emb - 1,
                        sigma_data=float(sched_config.get("sigma_data", 0.5)))
    return denoiser.requires_grad_(False).eval()


def sample_shape_of(denoiser: Denoiser) -> tuple[int, ...]:
    """(C, H, W) of a UNet teacher."""
    cfg = denoiser.net.unet.config
    size = cfg.sample_size
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    return (cfg.in_channels, H, W)




# --------------------------------------------------------------------------------------------------------------
# Pipeline folders: Stable Diffusion 1.x/2.x and SDXL.

PIPELINE_LAYOUTS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
_COMPONENTS = {"sd": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
               "sdxl": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")}
_SUPPORTED = ("a UNet2DModel folder (unet/ and scheduler/), or a diffusers pipeline folder in the "
              "StableDiffusionPipeline (SD 1.x/2.x) or StableDiffusionXLPipeline (SDXL) layout")


@dataclass
class Teacher:
    """A loaded teacher: its frozen denoiser and, for latent text-to-image teachers, the frozen text encoder(s)
    and VAE. `layout`: unet (pixel space), sd or sdxl."""

    denoiser: Denoiser
    layout: str
    text: TextEncoder | None = None
    codec: LatentCodec | None = None

    @property
    def latent(self) -> bool:
        return self.codec is not None


def load_teacher(path: str | Path, frozen_dtype: torch.dtype = torch.float32) -> Teacher:
    """The teacher in `path`: a UNet2DModel folder or a Stable Diffusion pipeline folder (see the module's doc).
    The denoiser is returned in float32 (the generator and fake score are copied from it); the text encoders and
    VAE in `frozen_dtype`."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, frozen_dtype)
    return Teacher(load_diffusers_teacher(path), "unet")


def _pipeline_layout(path: Path) -> tuple[str, dict]:
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as e:
        raise TeacherError(f"{path}/model_index.json cannot be read ({e}); expected {_SUPPORTED}") from None
    name = index.get("_class_name", "?")
    if name not in PIPELINE_LAYOUTS:
        raise TeacherError(f"teacher folder {str(path)!r} holds a {name}; supported: {_SUPPORTED} (transformer-based "
                           f"pipelines such as SD3 or Flux are not)")
    layout = PIPELINE_LAYOUTS[name]
    missing = [c for c in _COMPONENTS[layout] if not (isinstance(index.get(c), list) and index[c][0] is not None
                                                       and (path / c).is_dir())]
    if missing:
        raise TeacherError(f"teacher folder {str(path)!r} ({name}) lacks {', '.join(missing)}; expected the "
                           f"components {', '.join(_COMPONENTS[layout])}, each in its own subfolder")
    return layout, index


def _load_component(path: Path, name: str, cls_name: str, dtype: torch.dtype | None = None):
    import diffusers
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its per-file "Loading weights" bars, on every load
    cls = getattr(diffusers, cls_name, None) or getattr(transformers, cls_name, None)
    if cls is None:
        raise TeacherError(f"{path}/{name} is a {cls_name}, which neither diffusers nor transformers provides")
    kwargs = {"local_files_only": True} if not cls_name.endswith("Tokenizer") else {}
    if dtype is not None:
        kwargs["dtype" if cls.__module__.startswith("transformers") else "torch_dtype"] = dtype
    try:
        return cls.from_pretrained(path / name, **kwargs)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise TeacherError(f"cannot load {name} ({cls_name}) in {str(path)!r}: {str(e).splitlines()[0]}") from None


def _load_pipeline(path: Path, frozen_dtype: torch.dtype) -> Teacher:
    layout, index = _pipeline_layout(path)
    unet_class = index["unet"][1]
    if unet_class != "UNet2DConditionModel":
        raise TeacherError(f"teacher folder {str(path)!r}: its unet is a {unet_class}; expected UNet2DConditionModel")
    schedule, prediction_type, _ = load_schedule(path / "scheduler")
    if schedule.kind != "vp" or prediction_type not in ("epsilon", "v_prediction"):
        raise TeacherError(f"teacher folder {str(path)!r}: scheduler with {schedule.kind} schedule and "
                           f"prediction_type {prediction_type!r}; expected a DDPM-family (VP) scheduler with epsilon "
                           f"or v_prediction")
    unet = _load_component(path, "unet", unet_class)
    vae = _load_component(path, "vae", index["vae"][1], frozen_dtype)
    names = ["text_encoder"] + (["text_encoder_2"] if layout == "sdxl" else [])
    encoders = [_load_component(path, n, index[n][1], frozen_dtype) for n in names]
    tokenizers = [_load_component(path, n.replace("text_encoder", "tokenizer"),
                                  index[n.replace("text_encoder", "tokenizer")][1]) for n in names]
    for name, tok, enc in zip(names, tokenizers, encoders):
        vocab, positions = enc.config.vocab_size, enc.config.max_position_embeddings
        if len(tok) > vocab or tok.model_max_length > positions:
            tok_name = name.replace("text_encoder", "tokenizer")
            raise TeacherError(f"teacher folder {str(path)!r}: {tok_name} ({len(tok)} tokens, sequences of "
                               f"{tok.model_max_length}) does not match {name} ({vocab} tokens, {positions} "
                               f"positions); expected the tokenizer saved with its text encoder")
    _check_text_unet(path, layout, unet.config, encoders)
    codec = LatentCodec(vae.requires_grad_(False).eval())
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    f = codec.scale_factor
    text = TextEncoder(tokenizers, [e.requires_grad_(False).eval() for e in encoders], layout, (h * f, w * f))
    null = text.null().to(torch.float32)
    denoiser = Denoiser(TextUNetAdapter(unet), schedule, prediction_type, null=null)
    return Teacher(denoiser.requires_grad_(False).eval(), layout, text, codec)


def _check_text_unet(path: Path, layout: str, unet_config, encoders: list[nn.Module]) -> None:
    """The UNet must take what the text encoders give: the width of the prompt embeddings and, for SDXL, the
    pooled embeddings and the six time ids."""
    width = sum(e.config.hidden_size for e in encoders)
    if unet_config.cross_attention_dim != width:
        raise TeacherError(f"teacher folder {str(path)!r}: the unet attends to {unet_config.cross_attention_dim}-wide "
                           f"text embeddings; its text encoder(s) give {width}")
    xl = unet_config.addition_embed_type == "text_time"
    if xl != (layout == "sdxl"):
        raise TeacherError(f"teacher folder {str(path)!r}: a {layout} pipeline whose unet has addition_embed_type "
                           f"{unet_config.addition_embed_type!r}; expected {'text_time' if layout == 'sdxl' else None}")
    if xl:
        pooled = encoders[-1].config.projection_dim
        expected = pooled + 6 * unet_config.addition_time_embed_dim
        if unet_config.projection_class_embeddings_input_dim != expected:
            raise TeacherError(f"teacher folder {str(path)!r}: the unet expects "
                               f"{unet_config.projection_class_embeddings_input_dim} added features; the pooled "
                               f"embeddings ({pooled}) and six time ids give {expected}")

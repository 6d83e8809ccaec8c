"""Tiny random-weight text-to-image pipelines in the Stable Diffusion 1.x/2.x and SDXL folder layouts, built from
diffusers and transformers classes with nothing downloaded: a character-level CLIP tokenizer (vocab.json and
merges.txt written here), CLIP text encoder(s) of width 32, a 1-channel AutoencoderKL at 16 px with 4 latent
channels at 8 x 8, and a UNet2DConditionModel. Saved with `save_pretrained`, so stock `from_pretrained` loads them.

    from tiny_pipelines import build_pipeline
    path = build_pipeline(tmp_path / "sd", "sd15")          # or "sdxl"; prediction_type="v_prediction"
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT_WIDTH = 32
MAX_LENGTH = 24


def write_char_tokenizer(folder: Path, max_length: int = MAX_LENGTH):
    """A CLIPTokenizer over single characters (no merges): every prompt tokenizes, nothing is unknown."""
    from transformers import CLIPTokenizer

    from distill.pretrain_t2i import _byte_chars  # CLIP's byte-to-unicode table

    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # paths positionally: transformers 5.x ignores the vocab_file= / merges_file= keywords
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def _text_encoder(vocab_size: int, with_projection: bool, seed: int):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=TEXT_WIDTH,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def build_components(kind: str = "sd15", prediction_type: str = "epsilon", seed: int = 0) -> dict:
    """The pipeline's components (not saved)."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, PNDMScheduler, UNet2DConditionModel

    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind {kind!r}: expected sd15 or sdxl")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_char_tokenizer(Path(tmp) / "tok")
    vocab_size = len(tokenizer)
    xl = kind == "sdxl"
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16, scaling_factor=0.5)
    unet_kw = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, attention_head_dim=4,
                   cross_attention_dim=TEXT_WIDTH * (2 if xl else 1))
    if xl:  # pooled text embeddings (B, projection_dim) and 6 time ids, each embedded to 8 features
        unet_kw.update(addition_embed_type="text_time", addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=TEXT_WIDTH + 6 * 8)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_kw)
    sched_kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    prediction_type=prediction_type, steps_offset=1)
    scheduler = (EulerDiscreteScheduler(**sched_kw) if xl
                 else PNDMScheduler(**sched_kw, skip_prk_steps=True, set_alpha_to_one=False))
    parts = dict(unet=unet, vae=vae, scheduler=scheduler, tokenizer=tokenizer,
                 text_encoder=_text_encoder(vocab_size, False, seed + 2))
    if xl:
        parts.update(tokenizer_2=tokenizer, text_encoder_2=_text_encoder(vocab_size, True, seed + 3))
    return parts


def build_pipeline(out: str | Path, kind: str = "sd15", prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """Save a tiny pipeline of `kind` (sd15: StableDiffusionPipeline, sdxl: StableDiffusionXLPipeline) to `out`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = build_components(kind, prediction_type, seed)
    if kind == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    out = Path(out)
    pipe.save_pretrained(out)
    return out

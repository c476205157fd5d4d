"""CLIP score of images against their prompts, from a LOCAL CLIP folder (nothing is downloaded).

Convention: ``mean_i 100 * max(cos(E_img_i, E_txt_i), 0)`` with ``E`` the projected, L2-normalised CLIP embeddings
(transformers ``CLIPModel.get_image_features`` / ``get_text_features``), images prepared by the folder's
``CLIPImageProcessor`` and prompts truncated to the text model's maximum length. This is the per-sample clamp of
Hessel et al.'s CLIPScore with weight 100 instead of 2.5, i.e. torchmetrics' ``CLIPScore`` scale. Note that
torchmetrics clamps the *mean* (``max(mean(100 cos), 0)``) rather than each sample; the two agree whenever every
cosine is non-negative, which is the case for real CLIP models on almost all image/caption pairs.
"""

from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPProcessor

from stepdistill.errors import UserError, first_line

from .inception import check_uint8_nhwc, torch_threads


@lru_cache(maxsize=2)
def _load_cached(path: str, device: str):
    """CLIPModel + CLIPProcessor from a local folder, once per (folder, device)."""
    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"'{path}' is not a loadable CLIP folder (needs config, weights, tokenizer and "
                        f"preprocessor_config.json): {first_line(e)}") from None
    return model.to(device).eval(), processor


def load_clip(model_path: str | Path, device: str | torch.device = "cpu"):
    """(CLIPModel, CLIPProcessor) from a local folder; UserError if it is not one (hub ids are refused)."""
    p = Path(model_path).expanduser()
    if not p.is_dir():
        raise UserError(f"CLIP model '{model_path}' is not a local folder; download it once (e.g. "
                        "`huggingface-cli download openai/clip-vit-large-patch14 --local-dir clip`) and pass the path")
    return _load_cached(str(p.resolve()), str(torch.device(device)))


def _embedding(out) -> torch.Tensor:
    """Projected embedding from get_*_features (a tensor in transformers 4, a model output in 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clip_cosines(images: np.ndarray, prompts: list[str], model_path: str | Path,
                 device: str | torch.device = "cpu", batch_size: int = 50) -> np.ndarray:
    """Per-sample cos(E_img, E_txt) (float64, unclamped) of uint8 NHWC images and their prompts."""
    images = check_uint8_nhwc(images)
    if prompts is None or len(prompts) != len(images):
        raise UserError(f"CLIP score needs one prompt per image ({len(images)} images, "
                        f"{0 if prompts is None else len(prompts)} prompts)")
    device = torch.device(device)
    model, processor = load_clip(model_path, device)
    max_len = model.config.text_config.max_position_embeddings
    out = []
    with torch_threads() if device.type == "cpu" else contextlib.nullcontext():
        for i in range(0, len(images), batch_size):
            ims = images[i:i + batch_size]
            if ims.shape[-1] == 1:
                ims = np.repeat(ims, 3, axis=-1)
            inputs = processor(text=list(prompts[i:i + batch_size]), images=list(ims), return_tensors="pt",
                               padding=True, truncation=True, max_length=max_len)
            e_img = _embedding(model.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
            e_txt = _embedding(model.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                       attention_mask=inputs["attention_mask"].to(device)))
            e_img = e_img / e_img.norm(dim=-1, keepdim=True)
            e_txt = e_txt / e_txt.norm(dim=-1, keepdim=True)
            out.append((e_img * e_txt).sum(-1).double().cpu().numpy())
    return np.concatenate(out)


def clip_score(images: np.ndarray, prompts: list[str], model_path: str | Path, device: str | torch.device = "cpu",
               batch_size: int = 50) -> float:
    """CLIP score in [0, 100]: mean over samples of 100 * max(cos, 0) (see the module docstring)."""
    cos = clip_cosines(images, prompts, model_path, device, batch_size)
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def clip_preprocessing(model_path: str | Path) -> dict:
    """How the CLIP score was computed, to store beside the number."""
    return {
        "model": str(model_path),
        "score": "mean(100 * max(cos(image_emb, text_emb), 0)), per-sample clamp",
        "input": "uint8 NHWC (samples rounded to uint8), grayscale replicated to RGB, the folder's CLIPImageProcessor",
        "text": "the folder's tokenizer, truncated to the text model's max_position_embeddings",
    }

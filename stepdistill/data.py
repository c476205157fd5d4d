"""Data sources: the embedded digits16 set, image folders (optionally captioned), prompt files, local HF datasets.

Every dataset yields dicts: ``{"image": (C,H,W) float in [-1, 1], "label": int}`` for digits16,
``{"image": ..., "prompt": str}`` for captioned images, ``{"prompt": str}`` for prompt files. An unreadable or
empty source raises :class:`~stepdistill.errors.DataError` naming it.
"""

from __future__ import annotations

import csv
import io
import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

from .errors import DataError
from .trajectories import TrajectoryDataset, is_trajectory_folder

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DIGITS16_SIZE = 16
DIGITS16_CLASSES = 10


@lru_cache(maxsize=1)
def _digits16_arrays() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0 * 2 - 1)[:, None]  # (1797, 1, 8, 8) in [-1, 1]
    # Bilinear (align_corners=False) upsampling keeps the range and gives smooth 16x16 strokes.
    x = F.interpolate(x, size=(DIGITS16_SIZE, DIGITS16_SIZE), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).numpy(), d.target.astype(np.int64)


def load_digits16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (N, 1, 16, 16) float32 in [-1, 1] and (N,) int64 labels."""
    x, y = _digits16_arrays()
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


class Digits16(Dataset):
    """scikit-learn's 8x8 digits, scaled to [-1, 1] and upsampled to 16x16, with class labels."""

    num_classes = DIGITS16_CLASSES

    def __init__(self):
        self.images, self.labels = load_digits16()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


def _read_captions(folder: Path) -> dict[str, str]:
    """Captions from metadata.jsonl / metadata.csv (``file_name``, ``text``) or per-image ``.txt`` files."""
    caps: dict[str, str] = {}
    meta_jsonl, meta_csv = folder / "metadata.jsonl", folder / "metadata.csv"
    try:
        if meta_jsonl.is_file():
            for line in meta_jsonl.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    caps[row["file_name"]] = str(row.get("text", row.get("caption", "")))
        elif meta_csv.is_file():
            with meta_csv.open(newline="") as f:
                for row in csv.DictReader(f):
                    caps[row["file_name"]] = row.get("text", row.get("caption", ""))
    except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
        raise DataError(f"caption metadata in '{folder}' is unreadable ({type(e).__name__}: {e}); each row needs "
                        "'file_name' and 'text'") from None
    return caps


def load_image(source, resolution: int, center_crop: bool = True, random_flip: bool = False,
               channels: int = 3) -> torch.Tensor:
    """An image file (path or file object) -> (C, H, W) float in [-1, 1], short side resized then cropped."""
    try:
        with Image.open(source) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = resolution / min(w, h)
            im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.Resampling.BICUBIC)
            w, h = im.size
            if center_crop:
                left, top = (w - resolution) // 2, (h - resolution) // 2
            else:
                left = int(torch.randint(0, w - resolution + 1, ()).item())
                top = int(torch.randint(0, h - resolution + 1, ()).item())
            arr = np.asarray(im.crop((left, top, left + resolution, top + resolution)), dtype=np.float32)
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"image '{source}' is unreadable ({e})") from None
    x = torch.from_numpy(arr / 127.5 - 1)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if random_flip and torch.rand(()) < 0.5:
        x = x.flip(-1)
    return x


class ImageFolder(Dataset):
    """Images under a folder (recursively), resized on the short side and cropped to ``resolution``.

    Captions, if any, come from ``metadata.jsonl``/``metadata.csv`` (HF imagefolder layout) or a ``.txt`` file
    beside each image; with captions each item carries ``prompt``.
    """

    def __init__(self, root: str | Path, resolution: int, center_crop: bool = True, random_flip: bool = False,
                 channels: int = 3):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"image folder '{self.root}' does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise DataError(f"image folder '{self.root}' holds no images ({', '.join(IMAGE_EXTS)})")
        self.resolution, self.center_crop = resolution, center_crop
        self.random_flip, self.channels = random_flip, channels
        meta = _read_captions(self.root)
        self.captions: list[str] | None = None
        if meta:
            self.captions = [meta.get(str(p.relative_to(self.root)), meta.get(p.name, "")) for p in self.files]
        elif any(p.with_suffix(".txt").is_file() for p in self.files):
            self.captions = [p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").is_file() else ""
                             for p in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        item = {"image": load_image(self.files[i], self.resolution, self.center_crop, self.random_flip,
                                    self.channels)}
        if self.captions is not None:
            item["prompt"] = self.captions[i]
        return item


class PromptFile(Dataset):
    """One prompt per non-empty line (data-free methods)."""

    def __init__(self, path: str | Path):
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"prompt file '{p}' is unreadable ({type(e).__name__})") from None
        self.prompts = [s.strip() for s in lines if s.strip()]
        if not self.prompts:
            raise DataError(f"prompt file '{p}' holds no prompts (one per line)")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i]}


class HFDatasetFolder(Dataset):
    """A dataset saved with ``datasets.Dataset.save_to_disk`` (local only; nothing is downloaded)."""

    def __init__(self, path: str | Path, resolution: int, image_column: str = "image", caption_column: str = "text",
                 center_crop: bool = True, random_flip: bool = False):
        try:
            import datasets  # optional (the `datasets` extra): only this data source needs it
        except ImportError:
            raise DataError("reading an HF datasets folder needs the 'datasets' package: "
                            "pip install datasets") from None
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"'{path}' is not a readable HF datasets folder ({type(e).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if len(ds) == 0:
            raise DataError(f"HF datasets folder '{path}' is empty")
        if image_column not in ds.column_names:
            raise DataError(f"HF datasets folder '{path}' has no column '{image_column}' "
                            f"(columns: {', '.join(ds.column_names)}); set data.image_column")
        self.ds, self.image_column, self.caption_column = ds, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        row = self.ds[i]
        im = row[self.image_column]
        if not isinstance(im, Image.Image):
            im = Image.open(io.BytesIO(im["bytes"]) if isinstance(im, dict) else im)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        buf.seek(0)
        item = {"image": load_image(buf, self.resolution, self.center_crop, self.random_flip)}
        if self.caption_column in row:
            item["prompt"] = str(row[self.caption_column])
        return item


def dataset_prompts(dataset: Dataset) -> list[str] | None:
    """Every prompt (caption) of a dataset in index order, read without decoding images; None if it has none."""
    if isinstance(dataset, PromptFile):
        return list(dataset.prompts)
    if isinstance(dataset, ImageFolder):
        return None if dataset.captions is None else list(dataset.captions)
    if isinstance(dataset, HFDatasetFolder) and dataset.caption_column in dataset.ds.column_names:
        return [str(v) for v in dataset.ds[dataset.caption_column]]
    return None


def dataset_max_label(dataset: Dataset) -> int | None:
    """The largest class label of a labelled dataset (None without labels), told without decoding an image."""
    return int(dataset.labels.max()) if isinstance(dataset, Digits16) else None


def dataset_has_images(dataset: Dataset) -> bool:
    """Whether a dataset's items carry images (told without decoding one)."""
    return isinstance(dataset, (Digits16, ImageFolder, HFDatasetFolder))


def build_dataset(source: str, resolution: int = 16, center_crop: bool = True, random_flip: bool = False,
                  image_column: str = "image", caption_column: str = "text", channels: int = 3) -> Dataset:
    """The dataset named by ``source``: "digits16", a prompt file (.txt), an HF datasets folder, a trajectory folder
    (``stepdistill trajectories``) or an image folder."""
    if source == "digits16":
        return Digits16()
    p = Path(source)
    if not p.exists():
        raise DataError(f"data source '{source}' does not exist (use 'digits16', an image folder, a prompt .txt "
                        "file or a saved HF datasets folder)")
    if is_trajectory_folder(p):
        return TrajectoryDataset(p)
    if p.is_file():
        if p.suffix.lower() in (".txt", ".prompts"):
            return PromptFile(p)
        raise DataError(f"data source '{source}' is a file but not a prompt file (.txt, one prompt per line)")
    if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        return HFDatasetFolder(p, resolution, image_column, caption_column, center_crop, random_flip)
    return ImageFolder(p, resolution, center_crop, random_flip, channels)

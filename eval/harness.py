"""One entry point for every metric: :func:`evaluate` on uint8 samples against a reference, plus a small table printer.

References (``ref``):

- ``"digits16"``: the 1797 real digits (uint8 exactly as :func:`stepdistill.images.to_uint8` renders them). Their
  Inception features are computed once (~4 minutes on 2 CPU cores) and cached in ``$STEPDISTILL_CACHE`` (default
  ``~/.cache/stepdistill``), keyed by a hash of the preprocessing, the weight file's size/mtime and the images.
- a ``.npz`` statistics file (``mu``/``sigma`` of Inception pool3 features, see :func:`.frechet.save_stats`): FID
  only, since KID and fd_digits need the reference images themselves.
- an image folder, loaded with :class:`stepdistill.data.ImageFolder` at the samples' resolution and channel count.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from stepdistill.data import ImageFolder, load_digits16
from stepdistill.errors import UserError
from stepdistill.images import to_uint8

from .clip_score import clip_preprocessing, clip_score
from .digits_net import digits_preprocessing, load_digits_classifier
from .frechet import (
    feature_stats,
    frechet_distance,
    kid,
    load_stats,
    load_stats_meta,
    rank_deficient_message,
    save_stats,
)
from .grain import grain
from .inception import (
    INCEPTION_DIM,
    check_uint8_nhwc,
    inception_features,
    inception_preprocessing,
    inception_weights_path,
)
from .metric_names import METRICS
from .precision_recall import precision_recall

# Metrics computed in Inception feature space; they share one pass over the samples.
_INCEPTION_METRICS = {"fid", "kid", "precision", "recall"}
# Metrics computed in the digits classifier's feature space.
_DIGITS_METRICS = {"fd_digits", "accuracy", "precision_digits", "recall_digits"}
# Metrics that compare with the reference set.
_REF_METRICS = {"fid", "kid", "precision", "recall", "fd_digits", "precision_digits", "recall_digits"}
_SKIP_IN_TABLE = {"preprocessing", "warning"}


def cache_dir() -> Path:
    """``$STEPDISTILL_CACHE`` or ``~/.cache/stepdistill``."""
    return Path(os.environ.get("STEPDISTILL_CACHE") or Path.home() / ".cache" / "stepdistill").expanduser()


def parse_metrics(metrics: str | list[str]) -> list[str]:
    """Normalise "fid,kid" or a list to known metric names, in order and without duplicates."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for m in (n.strip().lower() for n in names):
        if not m:
            continue
        if m not in METRICS:
            raise UserError(f"unknown metric '{m}'; choose from {', '.join(METRICS)}")
        if m not in out:
            out.append(m)
    if not out:
        raise UserError(f"no metrics requested; choose from {', '.join(METRICS)}")
    return out


def digits16_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 real digits as uint8 NHWC (N, 16, 16, 1) and their labels."""
    x, y = load_digits16()
    return to_uint8(x), y.numpy()


def _load_folder(path: Path, resolution: int, channels: int) -> np.ndarray:
    """All images of a folder as uint8 NHWC at the samples' resolution and channel count."""
    ds = ImageFolder(path, resolution, center_crop=True, channels=channels)
    return to_uint8(torch.stack([ds[i]["image"] for i in range(len(ds))]))


def save_reference_stats(folder: str | Path, out: str | Path, resolution: int, device: str | torch.device = "cpu",
                         batch_size: int = 50, chunk: int = 500) -> Path:
    """Inception statistics (FID's mu, sigma) of an image folder, written to ``out`` (.npz) for ``--ref``.

    Images are decoded ``chunk`` at a time, so a large data set never sits in memory as pixels; they are resized and
    center-cropped to ``resolution``, the size the generated samples will have.
    """
    ds = ImageFolder(Path(folder), resolution, center_crop=True, channels=3)
    feats = []
    for start in range(0, len(ds), chunk):
        images = to_uint8(torch.stack([ds[i]["image"] for i in range(start, min(start + chunk, len(ds)))]))
        feats.append(inception_features(images, torch.device(device), batch_size,
                                        desc=f"inception ({start + len(images)}/{len(ds)})"))
    mu, sigma = feature_stats(np.concatenate(feats))
    return save_stats(out, mu, sigma, ref=str(folder), num_images=len(ds), resolution=resolution,
                      preprocessing=inception_preprocessing())


def _digits16_inception_features(device, batch_size: int) -> np.ndarray:
    """Inception features of the real digits16, from the cache or computed once and cached (float32 .npy)."""
    images, _ = digits16_uint8()
    w = inception_weights_path()
    st = w.stat()
    key = json.dumps({"ref": "digits16", "preprocessing": inception_preprocessing(), "weights": w.name,
                      "weights_size": st.st_size, "weights_mtime": int(st.st_mtime),
                      "images_sha1": hashlib.sha1(images.tobytes()).hexdigest()}, sort_keys=True)
    h = hashlib.sha1(key.encode()).hexdigest()[:16]
    folder = cache_dir()
    feats_path, stats_path = folder / f"digits16_inception_{h}.npy", folder / f"digits16_inception_{h}_stats.npz"
    if feats_path.is_file():
        try:
            feats = np.load(feats_path)
            if feats.shape == (len(images), INCEPTION_DIM):
                return feats
        except (OSError, ValueError):
            pass  # a truncated cache file: recompute below
    feats = inception_features(images, device, batch_size, desc="inception (digits16 reference, cached once)")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = feats_path.with_suffix(".tmp.npy")
    np.save(tmp, feats.astype(np.float32))
    tmp.replace(feats_path)  # atomic, so a concurrent or interrupted run never reads half a file
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # N=1797 < 2048 is reported by evaluate(), not here
        mu, sigma = feature_stats(feats)
    save_stats(stats_path, mu, sigma, ref="digits16", num_images=len(images), preprocessing=inception_preprocessing(),
               cache_key=json.loads(key))
    return feats


def _ref_kind(ref: str) -> str:
    """"digits16", "stats" or "folder"; a UserError for a reference that does not exist (nothing is loaded)."""
    if ref == "digits16":
        return "digits16"
    p = Path(ref).expanduser()
    if p.is_file() and p.suffix.lower() == ".npz":
        return "stats"
    if p.is_dir():
        return "folder"
    if p.suffix.lower() == ".npz":
        raise UserError(f"reference statistics file '{ref}' does not exist")
    raise UserError(f"reference '{ref}' is neither 'digits16', an existing stats .npz file nor an image folder")


def check_request(ref: str, metrics: list[str] | str, clip_model: str | None) -> list[str]:
    """The checks of an evaluation request that need no samples (metric names, reference, CLIP model): callers run
    them before generating or writing anything. Returns the parsed metrics."""
    metrics = parse_metrics(metrics)
    if _REF_METRICS & set(metrics):
        _ref_kind(ref)
    if "clip" in metrics:
        if not clip_model:
            raise UserError("metric 'clip' needs a local CLIP model folder: pass --clip-model PATH")
        if not Path(clip_model).expanduser().is_dir():
            raise UserError(f"--clip-model '{clip_model}' is not a local folder (hub ids are not downloaded); "
                            "download the CLIP model once and pass its folder")
    return metrics


def check_ref_size(ref: str, size: int) -> None:
    """A UserError when ``ref`` is a statistics file made at another image size than the samples' (``size`` px)."""
    if _ref_kind(ref) != "stats":
        return
    made_at = load_stats_meta(Path(ref).expanduser()).get("resolution")
    if made_at is not None and made_at != size:
        raise UserError(f"--ref '{ref}' holds statistics of {made_at} px images, the samples are {size} px: make "
                        f"statistics at the samples' size (`stepdistill stats FOLDER --resolution {size}`)")


def _resolve_ref(ref: str, samples: np.ndarray) -> tuple[str, np.ndarray | None, Path | None]:
    """Classify ``ref`` as ("digits16", images, None), ("folder", images, None) or ("stats", None, path)."""
    kind = _ref_kind(ref)
    if kind == "digits16":
        return "digits16", digits16_uint8()[0], None
    if kind == "stats":
        return "stats", None, Path(ref).expanduser()
    return "folder", _load_folder(Path(ref).expanduser(), samples.shape[1], samples.shape[-1]), None


def _small_n_warning(n: int, n_ref: int, metrics: list[str]) -> str | None:
    """A human-readable caveat when the sample counts make Fréchet numbers biased."""
    notes = []
    if "fid" in metrics and min(n, n_ref) <= INCEPTION_DIM:
        notes.append("FID: " + rank_deficient_message(min(n, n_ref), INCEPTION_DIM))
    if "fd_digits" in metrics and n <= 128:
        notes.append("fd_digits: " + rank_deficient_message(n, 128))
    if "kid" in metrics and min(n, n_ref) < 100:
        notes.append(f"KID on only {min(n, n_ref)} samples per subset has a large variance (see kid_std)")
    return "; ".join(notes) or None


def evaluate(images_uint8: np.ndarray, labels: np.ndarray | None, prompts: list[str] | None, ref: str,
             metrics: list[str] | str, device: str | torch.device = "cpu", clip_model: str | None = None,
             batch_size: int = 50, ref_classes: list[int] | None = None) -> dict:
    """Compute ``metrics`` for uint8 NHWC samples against ``ref`` (see the module docstring); ``ref_classes``
    restricts the digits16 reference to those classes (e.g. one student's part).

    Returns ``{metric: value, ..., "kid_std", "pr_num", "num_samples", "num_ref", "preprocessing": {...},
    "warning"}`` (``pr_num``: the equal set size precision / recall were computed at); ``warning`` is None unless
    the sample counts make a number unreliable.
    """
    metrics = check_request(ref, metrics, clip_model)
    device = torch.device(device or "cpu")
    images = check_uint8_nhwc(images_uint8, "samples")
    n = len(images)
    # Check every request before any expensive work, so a mistake costs no compute.
    if "accuracy" in metrics:
        if labels is None:
            raise UserError("metric 'accuracy' needs the class label of every sample (class-conditional digits)")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise UserError(f"got {len(labels)} labels for {n} samples; accuracy needs one label per sample")
    if "clip" in metrics:
        if prompts is None or len(prompts) != n:
            raise UserError(f"metric 'clip' needs one prompt per sample ({n} samples, "
                            f"{0 if prompts is None else len(prompts)} prompts)")
    digit_metrics = [m for m in metrics if m in _DIGITS_METRICS | {"grain"}]
    if digit_metrics and images.shape[1:3] != (16, 16):
        raise UserError(f"{', '.join(digit_metrics)}: digits16 metrics, need 16x16 samples, got "
                        f"{images.shape[1]}x{images.shape[2]}; drop them from --metrics for other data")
    needs_ref = [m for m in metrics if m in _REF_METRICS]
    kind, ref_images, stats_path = _resolve_ref(ref, images) if needs_ref else ("none", None, None)
    if kind == "stats":
        bad = [m for m in needs_ref if m != "fid"]
        if bad:
            raise UserError(f"{', '.join(bad)} need reference images, but --ref '{ref}' is a statistics file; "
                            "pass 'digits16' or an image folder")
        check_ref_size(ref, images.shape[1])
    ref_mask = None
    if ref_classes is not None and needs_ref:
        if kind != "digits16":
            raise UserError("a per-class reference needs --ref digits16")
        ref_mask = np.isin(digits16_uint8()[1], np.asarray(ref_classes))
        ref_images = ref_images[ref_mask]
    n_ref = len(ref_images) if ref_images is not None else None

    result: dict = {}
    prep: dict = {}
    caught: list = []
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        if _INCEPTION_METRICS & set(metrics):
            prep["inception"] = inception_preprocessing()
            feats = inception_features(images, device, batch_size, desc="inception (samples)")
            if kind == "stats":
                mu_r, sigma_r = load_stats(stats_path)
                n_ref = load_stats_meta(stats_path).get("num_images")
            elif kind == "digits16":
                feats_r = _digits16_inception_features(device, batch_size)
                feats_r = feats_r if ref_mask is None else feats_r[ref_mask]
            else:
                feats_r = inception_features(ref_images, device, batch_size, desc="inception (reference)")
            if "fid" in metrics:
                mu, sigma = feature_stats(feats)
                if kind != "stats":
                    mu_r, sigma_r = feature_stats(feats_r)
                result["fid"] = frechet_distance(mu, sigma, mu_r, sigma_r)
            if "kid" in metrics:
                result["kid"], result["kid_std"] = kid(feats, feats_r)
            if {"precision", "recall"} & set(metrics):
                result["precision"], result["recall"], result["pr_num"] = precision_recall(feats, feats_r)
        if _DIGITS_METRICS & set(metrics):
            net = load_digits_classifier(device)
            prep["digits"] = digits_preprocessing()
            if {"fd_digits", "precision_digits", "recall_digits"} & set(metrics):
                f, f_r = net.features(images), net.features(ref_images)
            if "fd_digits" in metrics:
                result["fd_digits"] = frechet_distance(*feature_stats(f), *feature_stats(f_r))
            if {"precision_digits", "recall_digits"} & set(metrics):
                p, r, result["pr_num"] = precision_recall(f, f_r)
                result["precision_digits"], result["recall_digits"] = p, r
            if "accuracy" in metrics:
                result["accuracy"] = float((net.predict(images) == labels).mean())
        if "grain" in metrics:
            prep["grain"] = {"input": "uint8 NHWC 16x16, RGB averaged to gray, x / 127.5 - 1",
                             "subspace": "span of 8x8 images upsampled bilinearly (align_corners=False) to 16x16"}
            result["grain"] = grain(images)
        if "clip" in metrics:
            prep["clip"] = clip_preprocessing(clip_model)
            result["clip"] = clip_score(images, prompts, clip_model, device, batch_size)
        caught = [x for x in w if "rank-deficient" not in str(x.message)]
    for x in caught:  # re-emit unrelated warnings; rank deficiency is folded into the warning string below
        warnings.warn(x.message, x.category, stacklevel=2)

    ordered = {m: result[m] for m in metrics if m in result}
    for extra in ("kid_std", "pr_num"):  # KID's standard error; the set size precision/recall used
        if extra in result:
            ordered[extra] = result[extra]
    ordered.update(num_samples=n, num_ref=n_ref, preprocessing=prep,
                   warning=_small_n_warning(n, n_ref if n_ref is not None else n, metrics))
    return ordered


def per_student(owners: np.ndarray, classes_of: list[list[int]] | None, images_uint8: np.ndarray,
                labels: np.ndarray | None, prompts: list[str] | None, ref: str, metrics: list[str] | str,
                device: str | torch.device = "cpu", clip_model: str | None = None) -> list[dict]:
    """The metrics of each student's samples (``owners[i]`` made sample i): against the reference images of its
    classes when ``classes_of`` (its classes, per student) is given and ``ref`` is digits16, else the whole
    ``ref``."""
    rows = []
    for k in sorted(set(np.asarray(owners).tolist())):
        idx = np.flatnonzero(np.asarray(owners) == k)
        own_ref = classes_of[k] if classes_of is not None and ref == "digits16" else None
        res = evaluate(images_uint8[idx], None if labels is None else np.asarray(labels)[idx],
                       None if prompts is None else [prompts[i] for i in idx], ref, metrics, device, clip_model,
                       ref_classes=own_ref)
        rows.append({"student": int(k), "reference": "its classes" if own_ref is not None else "all", **res})
    return rows


def _fmt(v) -> str:
    """Compact cell text: 4 significant digits for floats, '-' for missing."""
    if v is None:
        return "-"
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """An aligned text table of result dicts (nested values such as ``preprocessing`` and ``warning`` left out)."""
    if not rows:
        return ""
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items()
                 if k not in cols and k not in _SKIP_IN_TABLE and not isinstance(v, (dict, list))]
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r.get(c), (int, float, np.number)) or r.get(c) is None for r in rows) for c in cols]
    def line(vals):  # numbers right-aligned so digits line up, text left-aligned
        return "  ".join(v.rjust(wd) if num else v.ljust(wd) for v, wd, num in zip(vals, widths, numeric)).rstrip()
    out = [line(cols), line(["-" * wd for wd in widths])] + [line(row) for row in cells]
    return "\n".join(out)

"""Files read from disk are input: a JSON file's fields typed and in range, a safetensors file's tensors (names,
dtypes, shapes) read from its header alone, paths named in a file kept inside its folder. Every check fails with a
one-line :class:`~stepdistill.errors.UserError` naming the file and the field, the way the config layer names keys.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from .errors import UserError

# A safetensors header larger than this is refused before it is read (real ones hold a few hundred bytes per tensor:
# 100 MB is ~300k tensors).
MAX_HEADER_BYTES = 100 << 20
# safetensors dtype names -> torch dtype names.
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_json(path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object in ``path`` (``what`` names it in errors: "router file", ...)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise UserError(f"{what} '{p}' cannot be read ({e.strerror or type(e).__name__})") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{what} '{p}' is not valid JSON") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} '{p}' must hold a JSON object, not {type(data).__name__}")
    return data


class Fields:
    """Typed access to the fields of a JSON object read from ``path``: each getter checks the type and range and
    fails with one line naming the file and the field.

    Args:
        data: the object.
        path: where it was read from (for messages).
    """

    def __init__(self, data: dict[str, Any], path: str | Path):
        self.data, self.path = data, Path(path)

    def _fail(self, key: str, what: str) -> UserError:
        value = self.data.get(key, "<missing>")
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return UserError(f"'{self.path}': field '{key}' must be {what}, got {shown}")

    def has(self, key: str) -> bool:
        return key in self.data

    def int(self, key: str, lo: int | None = None, hi: int | None = None, default: Any = ...) -> int:
        """An integer in [lo, hi]."""
        if key not in self.data and default is not ...:
            return default
        v = self.data.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise self._fail(key, f"an integer{_range(lo, hi)}")
        return v

    def number(self, key: str, lo: float | None = None, hi: float | None = None, default: Any = ...) -> float:
        """A finite number in [lo, hi]."""
        if key not in self.data and default is not ...:
            return default
        v = self.data.get(key)
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (lo is not None and v < lo) or (hi is not None and v > hi)):
            raise self._fail(key, f"a finite number{_range(lo, hi)}")
        return float(v)

    def str(self, key: str, choices: tuple[str, ...] | None = None, default: Any = ...) -> str:
        """A string (one of ``choices``)."""
        if key not in self.data and default is not ...:
            return default
        v = self.data.get(key)
        if not isinstance(v, str) or (choices is not None and v not in choices):
            raise self._fail(key, "one of " + ", ".join(choices) if choices else "a string")
        return v

    def ints(self, key: str, lo: int | None = None, hi: int | None = None, length: int | None = None,
             default: Any = ...) -> list[int]:
        """A list of integers in [lo, hi] (of ``length`` items)."""
        if key not in self.data and default is not ...:
            return default
        v = self.data.get(key)
        ok = isinstance(v, list) and (length is None or len(v) == length) and all(
            isinstance(x, int) and not isinstance(x, bool) and (lo is None or x >= lo) and (hi is None or x <= hi)
            for x in v)
        if not ok:
            n = f" of {length} items" if length is not None else ""
            raise self._fail(key, f"a list{n} of integers{_range(lo, hi)}")
        return list(v)

    def numbers(self, key: str, lo: float | None = None, hi: float | None = None, default: Any = ...) -> list[float]:
        """A list of finite numbers in [lo, hi]."""
        if key not in self.data and default is not ...:
            return default
        v = self.data.get(key)
        ok = isinstance(v, list) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
            and (lo is None or x >= lo) and (hi is None or x <= hi) for x in v)
        if not ok:
            raise self._fail(key, f"a list of finite numbers{_range(lo, hi)}")
        return [float(x) for x in v]


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f" in [{lo}, {hi}]"
    if lo is not None:
        return f" >= {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def inside(folder: str | Path, name: Any, what: str) -> Path:
    """``folder / name`` for a relative path ``name`` read from a file, refused unless it stays inside ``folder``
    (no absolute path, no ``..``). Checked on the path as written, so the symlinks of the Hugging Face cache layout
    (files linking into ``../../blobs``) keep working."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"{what}: {name!r} is not a path inside '{folder}' (relative, without '..')")
    return Path(folder) / name


def safetensors_header(path: str | Path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (torch dtype name, shape) of every tensor in a safetensors file, from its header alone (its size is
    checked against the file before it is read), so nothing is allocated for a tampered file."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
                raise UserError(f"{what} '{p}' is not a safetensors file (its header size {n} does not fit the "
                                f"{size}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{what} '{p}' cannot be read ({e.strerror or type(e).__name__})") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{what} '{p}' has a damaged safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{what} '{p}' has a damaged safetensors header")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        ok = (isinstance(info, dict) and info.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(info.get("shape"), list) and all(isinstance(d, int) and d >= 0 for d in info["shape"]))
        if not ok:
            raise UserError(f"{what} '{p}': tensor '{name}' has a damaged entry in the header")
        out[name] = (SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
    return out


def specs(tensors: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype name, shape) of torch tensors, in the form :func:`safetensors_header` gives."""
    return {k: (str(t.dtype).removeprefix("torch."), tuple(t.shape)) for k, t in tensors.items()}


def check_tensors(found: dict[str, tuple[str, tuple[int, ...]]], expected: dict[str, tuple[str, tuple[int, ...]]],
                  what: str, optional: set[str] | None = None) -> None:
    """UserError unless ``found`` (from :func:`safetensors_header`) holds exactly the ``expected`` tensors (those in
    ``optional`` may be missing) with their dtypes and shapes."""
    missing = [k for k in expected if k not in found and k not in (optional or set())]
    unexpected = [k for k in found if k not in expected]
    if missing or unexpected:
        raise UserError(f"{what} does not fit (missing {', '.join(missing[:3]) or 'none'}; unexpected "
                        f"{', '.join(unexpected[:3]) or 'none'})")
    for k, (dtype, shape) in found.items():
        if (dtype, shape) != expected[k]:
            raise UserError(f"{what}: tensor '{k}' is {dtype} {list(shape)}, expected {expected[k][0]} "
                            f"{list(expected[k][1])}")

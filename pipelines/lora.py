"""LoRA adapters on diffusers networks: adding them (peft), switching them off (a LoRA fake score or student is the
teacher with its adapters off), merging them in, and the files of LoRA exports.

The file a family writes is ``pytorch_lora_weights.safetensors``: diffusers' own format through the pipeline class's
``save_lora_weights`` (loaded back with ``load_lora_weights``), or for class-conditional ``UNet2DModel`` pipelines,
for which diffusers has no LoRA loader, peft's state dict (``unet.<module>.lora_A/B.weight``) with the LoRA config in
the safetensors metadata. Every export records its base model (name, weight fingerprint, pipeline class) in the
metadata key ``stepdistill_base``; loading checks every key and shape against the network before touching it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from stepdistill.errors import ConfigError, UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
# safetensors metadata key of our class-conditional LoRA files.
META_KEY = "stepdistill_lora"
# safetensors metadata key (every LoRA export) of the base model: {"base": id or path, "fingerprint": ...}.
BASE_KEY = "stepdistill_base"


class BaseMismatchWarning(UserWarning):
    """A LoRA export is being loaded onto another base network than the one it was trained on."""


# --- adapters on a network -------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[nn.Module]:
    """The peft LoRA layers of ``model``."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_max_rank(model: nn.Module, targets: Sequence[str]) -> int:
    """The smallest in/out dimension over the layers a LoRA with ``targets`` would adapt (0: none)."""
    dims = []
    for name, m in model.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(m, nn.Linear):
            dims += [m.in_features, m.out_features]
        elif isinstance(m, nn.Conv2d):
            dims += [m.in_channels, m.out_channels]
    return min(dims) if dims else 0


def add_lora(network: nn.Module, rank: int, alpha: float, targets: Sequence[str], key: str) -> LoraConfig:
    """Add LoRA adapters (those of ``targets`` present in ``network``) and make them its only trainable parameters.

    ``key`` is the config key of ``rank``, named in the error when the rank exceeds a layer dimension. Returns the
    peft ``LoraConfig``; alpha 0 means alpha = rank (scale 1).
    """
    names = [n for n, _ in network.named_modules()]
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    max_rank = lora_max_rank(network, present)
    if rank > max_rank:
        raise ConfigError(f"{key}={rank} exceeds the smallest adapted layer dimension of the teacher network "
                          f"(max {max_rank})")
    # B = 0 at init: the adapted network starts as the teacher.
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=present, init_lora_weights=True)
    if hasattr(network, "add_adapter"):  # diffusers PeftAdapterMixin (UNet2DConditionModel, transformers)
        network.add_adapter(config)
    else:  # UNet2DModel has no adapter mixin: peft's own injection does the same
        inject_adapter_in_model(config, network)
    for n, p in network.named_parameters():
        p.requires_grad_("lora_" in n)
    return config


@contextmanager
def adapters(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Switch the LoRA adapters of ``model`` on or off for the block, and always back on after it.

    Back on because the adapter weights are a training phase's parameters, and peft freezes them while they are off.
    """
    for m in lora_layers(model):
        m.enable_adapters(enabled)
    try:
        yield
    finally:
        if not enabled:
            for m in lora_layers(model):
                m.enable_adapters(True)


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge peft LoRA adapters into their base layers and put the base layers back (in place)."""
    if hasattr(model, "unload_lora"):  # diffusers' PeftAdapterMixin: its own merge and removal
        model.fuse_lora()
        model.unload_lora()
    else:
        for name, m in list(model.named_modules()):
            if isinstance(m, BaseTunerLayer) and name:
                m.merge()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
        # A later injection must not think adapters are still there.
        if "peft_config" in vars(model):
            del model.peft_config
    model.requires_grad_(False)
    return model


def base_fingerprint(network: nn.Module) -> str:
    """A short fingerprint of a network's base weights (LoRA adapters left out, peft's ``base_layer`` names folded).

    sha256 over every tensor's name, shape and a strided sample of at most 4096 of its values in float16, so it
    takes well under a second even for an SD-size UNet, tells fine-tunes of one architecture apart, and does not
    depend on whether the weights are fp32 or fp16 (a base loaded in bf16 may differ).
    """
    h = hashlib.sha256()
    for name, t in sorted(network.state_dict().items()):
        if "lora_" in name:
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096].to("cpu", torch.float16).contiguous()
        h.update(f"{name.replace('.base_layer', '')}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# --- files -----------------------------------------------------------------------------------------------------------
def adapter_state(network: nn.Module, lora_config: LoraConfig) -> tuple[dict[str, torch.Tensor], dict]:
    """(peft state dict of ``network``'s adapters, the LoRA config as JSON-able adapter metadata)."""
    meta = lora_config.to_dict()
    return get_peft_model_state_dict(network), {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}


def save_class_lora(network: nn.Module, out_dir: Path, lora_config: LoraConfig) -> Path:
    """Our format (see the module docstring) for networks without a diffusers LoRA loader."""
    state, meta = adapter_state(network, lora_config)
    info = {"r": meta["r"], "lora_alpha": meta["lora_alpha"], "target_modules": meta["target_modules"],
            "network": type(network).__name__}
    path = Path(out_dir) / LORA_FILE
    save_file({f"unet.{k}": v.detach().contiguous().cpu() for k, v in state.items()}, str(path),
              metadata={META_KEY: json.dumps(info)})
    return path


def record_base(out_dir: str | Path, base: str, fingerprint: str, pipeline: str) -> Path:
    """Add the base model record (``stepdistill_base``) to the metadata of the LoRA file in ``out_dir``."""
    path = Path(out_dir) / LORA_FILE
    with safe_open(str(path), framework="pt") as h:
        tensors, metadata = {k: h.get_tensor(k) for k in h.keys()}, dict(h.metadata() or {})
    metadata[BASE_KEY] = json.dumps({"base": base, "fingerprint": fingerprint, "pipeline": pipeline})
    save_file(tensors, str(path), metadata=metadata)
    return path


def lora_file(path: str | Path) -> Path:
    """The LoRA weights file of an export folder (or the file itself); a UserError if there is none."""
    p = Path(path)
    f = p / LORA_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"no LoRA weights at '{path}' (expected {LORA_FILE} in a folder, or the file itself)")
    return f


def _metadata(path: str | Path) -> dict[str, str]:
    f = lora_file(path)
    try:
        with safe_open(str(f), framework="pt") as h:
            return dict(h.metadata() or {})
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"'{f}' is not a readable safetensors LoRA file ({type(e).__name__})") from None


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(tensors, our class-conditional metadata or None) of a LoRA export."""
    f = lora_file(path)
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = (h.metadata() or {}).get(META_KEY)
            state = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"'{f}' is not a readable safetensors LoRA file ({type(e).__name__})") from None
    return state, json.loads(meta) if meta else None


def lora_base(path: str | Path) -> dict | None:
    """The base model a LoRA export records (``{"base", "fingerprint", "pipeline"}``), or None."""
    text = _metadata(path).get(BASE_KEY)
    return json.loads(text) if text else None


def check_base(pipe, network: nn.Module, path: str | Path) -> None:
    """Refuse a LoRA of another pipeline class; warn (BaseMismatchWarning) when ``network`` is not the base network
    the LoRA at ``path`` recorded."""
    info = lora_base(path)
    if info and info.get("pipeline") and info["pipeline"] != type(pipe).__name__:
        raise UserError(f"the LoRA '{path}' was trained on a {info['pipeline']} ('{info.get('base')}'); it cannot be "
                        f"loaded into a {type(pipe).__name__}")
    if info and info.get("fingerprint") and base_fingerprint(network) != info["fingerprint"]:
        warnings.warn(f"the LoRA '{path}' was trained on '{info.get('base')}' (fingerprint {info['fingerprint']}); "
                      "this pipeline's network has other weights, so its outputs are not the trained student's",
                      BaseMismatchWarning, stacklevel=4)


def check_shapes(network: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """UserError unless every ``<module>.lora_A/B.weight`` of ``state`` fits a Linear / Conv2d of ``network``."""
    r = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    shapes = {}
    for name in {k.rsplit(".lora_", 1)[0] for k in state}:
        try:
            m = network.get_submodule(name)
        except AttributeError:
            raise UserError(f"LoRA file adapts '{name}', which this pipeline's {type(network).__name__} does not "
                            "have: the LoRA was trained for a different network") from None
        if isinstance(m, nn.Linear):
            shapes[f"{name}.lora_A.weight"], shapes[f"{name}.lora_B.weight"] = (r, m.in_features), (m.out_features, r)
        elif isinstance(m, nn.Conv2d):
            shapes[f"{name}.lora_A.weight"] = (r, m.in_channels, *m.kernel_size)
            shapes[f"{name}.lora_B.weight"] = (m.out_channels, r, 1, 1)
        else:
            raise UserError(f"LoRA file adapts '{name}' ({type(m).__name__}), which is not a Linear/Conv2d layer here")
    for k, v in state.items():
        if k not in shapes:
            raise UserError(f"unexpected LoRA key '{k}'")
        if tuple(v.shape) != shapes[k]:
            raise UserError(f"LoRA weight '{k}' has shape {tuple(v.shape)} but this network needs {shapes[k]} (rank "
                            f"{r}): the LoRA was trained for a different network")


def load_class_lora(pipe, network: nn.Module, path: str | Path, fuse: bool = True) -> None:
    """Inject and load a LoRA export of our class-conditional format into ``pipe``'s ``network`` (every key and shape
    checked first), merged if ``fuse``."""
    state, meta = read_lora_file(path)
    check_base(pipe, network, path)
    if meta is None:
        raise UserError(f"'{lora_file(path)}' is not a class-conditional stepdistill LoRA (no '{META_KEY}' metadata; "
                        "SD-type LoRAs load with the SD pipeline's load_lora_weights)")
    if meta.get("network") != type(network).__name__:
        raise UserError(f"LoRA was trained for a {meta.get('network')} but the pipeline's network is a "
                        f"{type(network).__name__}")
    peft_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not peft_state or len(peft_state) != len(state):
        raise UserError("LoRA file holds keys outside the UNet ('unet.' prefix expected)")
    check_shapes(network, peft_state)
    config = LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]), target_modules=meta["target_modules"])
    dtype = next(network.parameters()).dtype
    inject_adapter_in_model(config, network)
    result = set_peft_model_state_dict(network, peft_state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise UserError(f"LoRA file lacks weights for {len(missing)} adapted layers (e.g. '{missing[0]}')")
    network.to(dtype=dtype)
    if fuse:
        fuse_lora(network)

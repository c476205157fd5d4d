"""LoRA export and loading for distilled students.

- SD-type (``UNet2DConditionModel``) students are saved with diffusers' own ``save_lora_weights`` (peft key
  format with the ``unet.`` prefix, and the LoRA config as adapter metadata so that alpha != rank survives), so
  ``pipe.load_lora_weights(folder)`` on the teacher pipeline accepts them.
- Class-conditional ``UNet2DModel`` students (no diffusers LoRA loader exists for them) are saved as
  ``pytorch_lora_weights.safetensors`` holding peft's state dict (``unet.<module>.lora_A/B.weight``) with the LoRA
  config in the safetensors metadata; :func:`load_lora` (and ``ClassConditionalPipeline.load_lora_weights``) validates
  every key and shape against the network before touching it, so a mismatched file is a one-line UserError.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from stepdistill.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
# safetensors metadata key of our class-conditional LoRA files.
META_KEY = "stepdistill_lora"
# safetensors metadata key (every LoRA export) of the base model: {"base": id or path, "fingerprint": ...}.
BASE_KEY = "stepdistill_base"


class BaseMismatchWarning(UserWarning):
    """A LoRA export is being loaded onto another base network than the one it was trained on."""


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


def lora_base(path: str | Path) -> dict | None:
    """The base model a LoRA export records (``{"base", "fingerprint"}``), or None for files without the record."""
    from safetensors import safe_open

    try:
        with safe_open(str(_lora_file(path)), framework="pt") as h:
            text = (h.metadata() or {}).get(BASE_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"'{_lora_file(path)}' is not a readable safetensors LoRA file ({type(e).__name__})") from None
    return json.loads(text) if text else None


def check_base(pipe, path: str | Path) -> None:
    """Refuse a LoRA of another pipeline family; warn (BaseMismatchWarning) when ``pipe``'s network is not the base
    network the LoRA at ``path`` recorded."""
    info = lora_base(path)
    if info and info.get("pipeline") and info["pipeline"] != type(pipe).__name__:
        raise UserError(f"the LoRA '{path}' was trained on a {info['pipeline']} ('{info.get('base')}'); it cannot be "
                        f"loaded into a {type(pipe).__name__}")
    unet = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if info and info.get("fingerprint") and base_fingerprint(unet) != info["fingerprint"]:
        warnings.warn(f"the LoRA '{path}' was trained on '{info.get('base')}' (fingerprint {info['fingerprint']}); "
                      "this pipeline's network has other weights, so its outputs are not the trained student's",
                      BaseMismatchWarning, stacklevel=3)


def _lora_file(path: str | Path) -> Path:
    p = Path(path)
    f = p / LORA_FILE if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"no LoRA weights at '{path}' (expected {LORA_FILE} in a folder, or the file itself)")
    return f


def save_lora(unet: nn.Module, out_dir: str | Path, lora_config, text: bool, base: str | None = None,
              base_pipeline: str | None = None, fingerprint: str | None = None, pipeline_cls: type | None = None,
              network_attr: str = "unet") -> Path:
    """Write the LoRA adapters of ``unet`` to ``out_dir/pytorch_lora_weights.safetensors``.

    Args:
        unet: a network with peft LoRA adapters (one adapter, "default").
        out_dir: the export folder.
        lora_config: the ``peft.LoraConfig`` the adapters were made with.
        text: True for SD-type pipelines (diffusers' format), False for ``ClassConditionalPipeline`` (ours).
        base: the base pipeline the adapters belong on (hub id or path); recorded with the base network's
            fingerprint and ``base_pipeline`` (its pipeline class) in the file's metadata (``stepdistill_base``).
        fingerprint: the base network's :func:`base_fingerprint`, taken before its weights were cast for training
            (``train.teacher_dtype``); computed from ``unet`` if not given.
        pipeline_cls: the text pipeline class whose ``save_lora_weights`` writes the file (its
            ``load_lora_weights`` reads it back); StableDiffusionPipeline by default.
        network_attr: the pipeline's name of the network ("unet", or "transformer" for SD3 / Flux), the prefix of
            the file's keys.
    """
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    state = get_peft_model_state_dict(unet)
    meta = lora_config.to_dict()
    meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in meta.items()}
    if text:
        if pipeline_cls is None:
            from diffusers import StableDiffusionPipeline as pipeline_cls

        # peft's keys as they are (diffusers' LCM-LoRA script does the same): convert_state_dict_to_diffusers would
        # rewrite only the attention keys to the old "lora.down/up" names, which the peft-based loader then drops
        # (caught by tests/test_consistency.py::test_sd_lora_file_reproduces_the_student).
        pipeline_cls.save_lora_weights(
            save_directory=str(out_dir), safe_serialization=True,
            **{f"{network_attr}_lora_layers": state, f"{network_attr}_lora_adapter_metadata": meta})
    else:
        info = {"r": meta["r"], "lora_alpha": meta["lora_alpha"], "target_modules": meta["target_modules"],
                "network": type(unet).__name__}
        save_file({f"unet.{k}": v.detach().contiguous().cpu() for k, v in state.items()}, str(out_dir / LORA_FILE),
                  metadata={META_KEY: json.dumps(info)})
    if base is not None:
        # Added to the metadata of the file as written (diffusers writes its own keys for SD-type files).
        path = out_dir / LORA_FILE
        with safe_open(str(path), framework="pt") as h:
            tensors, metadata = {k: h.get_tensor(k) for k in h.keys()}, dict(h.metadata() or {})
        metadata[BASE_KEY] = json.dumps({"base": base, "fingerprint": fingerprint or base_fingerprint(unet),
                                         "pipeline": base_pipeline})
        save_file(tensors, str(path), metadata=metadata)
    return out_dir / LORA_FILE


def _read(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open

    f = _lora_file(path)
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = (h.metadata() or {}).get(META_KEY)
            state = {k: h.get_tensor(k) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise UserError(f"'{f}' is not a readable safetensors LoRA file ({type(e).__name__})") from None
    return state, json.loads(meta) if meta else None


def _expected_shapes(unet: nn.Module, module_names: set[str], r: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in module_names:
        try:
            m = unet.get_submodule(name)
        except AttributeError:
            raise UserError(f"LoRA file adapts '{name}', which this pipeline's {type(unet).__name__} does not have: "
                            "the LoRA was trained for a different network") from None
        if isinstance(m, nn.Linear):
            shapes[f"{name}.lora_A.weight"] = (r, m.in_features)
            shapes[f"{name}.lora_B.weight"] = (m.out_features, r)
        elif isinstance(m, nn.Conv2d):
            shapes[f"{name}.lora_A.weight"] = (r, m.in_channels, *m.kernel_size)
            shapes[f"{name}.lora_B.weight"] = (m.out_channels, r, 1, 1)
        else:
            raise UserError(f"LoRA file adapts '{name}' ({type(m).__name__}), which is not a Linear/Conv2d layer here")
    return shapes


def load_lora(pipe, path: str | Path, fuse: bool = True):
    """Load a stepdistill LoRA export into ``pipe`` (checked first; a mismatch is a one-line UserError).

    Args:
        pipe: a ``ClassConditionalPipeline`` (our format) or a diffusers pipeline with ``load_lora_weights`` (SD-type).
        path: the export folder or the ``.safetensors`` file.
        fuse: for ``ClassConditionalPipeline``, merge the adapters into the weights (a plain ``UNet2DModel`` again).

    Returns:
        ``pipe``.
    """
    state, meta = _read(path)
    check_base(pipe, path)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UserError(f"{type(pipe).__name__} has no UNet: stepdistill LoRA exports are for UNet pipelines")
    if not hasattr(pipe, "load_lora_weights") or type(pipe).__name__ == "ClassConditionalPipeline":
        if meta is None:
            raise UserError(f"'{_lora_file(path)}' is not a class-conditional stepdistill LoRA (no '{META_KEY}' "
                            "metadata; SD-type LoRAs load with the SD pipeline's load_lora_weights)")
        if meta.get("network") != type(unet).__name__:
            raise UserError(f"LoRA was trained for a {meta.get('network')} but the pipeline's network is a "
                            f"{type(unet).__name__}")
        return _load_class_conditional(pipe, state, meta, fuse)
    if meta is not None:
        raise UserError(f"'{_lora_file(path)}' is a LoRA for a class-conditional {meta.get('network')}; it cannot be "
                        f"loaded into a {type(pipe).__name__}")
    # SD-type: check the keys against the UNet before diffusers loads (it may ignore unknown ones silently).
    peft_keys = {}
    for k, v in state.items():
        if not k.startswith("unet."):
            continue
        k = k[len("unet."):].replace(".lora.down.weight", ".lora_A.weight")
        peft_keys[k.replace(".lora.up.weight", ".lora_B.weight")] = v
    if not peft_keys:
        raise UserError(f"'{_lora_file(path)}' holds no UNet LoRA weights")
    r = next(v.shape[0] for k, v in peft_keys.items() if k.endswith("lora_A.weight"))
    _check_shapes(unet, peft_keys, r)
    f = _lora_file(path)
    pipe.load_lora_weights(str(f.parent), weight_name=f.name)
    return pipe


def _check_shapes(unet: nn.Module, state: dict[str, torch.Tensor], r: int) -> None:
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    want = _expected_shapes(unet, names, r)
    for k, v in state.items():
        if k not in want:
            raise UserError(f"unexpected LoRA key '{k}'")
        if tuple(v.shape) != want[k]:
            raise UserError(f"LoRA weight '{k}' has shape {tuple(v.shape)} but this network needs {want[k]} (rank "
                            f"{r}): the LoRA was trained for a different network")


def _load_class_conditional(pipe, state: dict[str, torch.Tensor], meta: dict, fuse: bool):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    unet = pipe.unet
    peft_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if not peft_state or len(peft_state) != len(state):
        raise UserError("LoRA file holds keys outside the UNet ('unet.' prefix expected)")
    _check_shapes(unet, peft_state, int(meta["r"]))
    config = LoraConfig(r=int(meta["r"]), lora_alpha=float(meta["lora_alpha"]), target_modules=meta["target_modules"])
    inject_adapter_in_model(config, unet)
    result = set_peft_model_state_dict(unet, peft_state)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise UserError(f"LoRA file lacks weights for {len(missing)} adapted layers (e.g. '{missing[0]}')")
    unet.to(dtype=pipe.unet.dtype)
    if fuse:
        fuse_lora(unet)
    return pipe


def fuse_lora(model: nn.Module) -> nn.Module:
    """Merge peft LoRA adapters into their base layers and put the base layers back (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer) and name:
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.get_base_layer())
    # A later injection (or diffusers' save_pretrained) must not think adapters are still there.
    if "peft_config" in vars(model):
        del model.peft_config
    if getattr(model, "_hf_peft_config_loaded", False):
        model._hf_peft_config_loaded = False
    model.requires_grad_(False)
    return model

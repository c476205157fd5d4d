"""Sharded data parallelism (``train.sharding: fsdp2``): torch's ``fully_shard`` on the trainable networks.

accelerate's FSDP integration only starts on GPUs (a CPU run with its FSDP config silently falls back to DDP) and
would shard the whole method as one model, frozen teacher included, saving checkpoints in its own format. The loop
therefore shards through this module on every device: the same code path runs in the CPU tests and on GPUs.

What is sharded: every outermost diffusers network of the method that holds trainable parameters (the student, a
full fake score, a network carrying LoRA adapters), one FSDP unit per block of its ``ModuleList`` s (UNet down/up
blocks, transformer blocks) and one for the rest of it; then every other module of the method whose trainable
parameters are all outside those networks (e.g. DMD2's GAN head, sCM's log-variance head). Parameters, gradients and
AdamW states of those are split over the processes; frozen networks that carry no trainable parameter (the teacher,
VAE, text encoders) stay replicated, as under DDP, and can be made smaller with ``train.teacher_dtype``.

Checkpoints hold the same ``model.safetensors`` as unsharded runs (the trained tensors in full, gathered on the
main process), plus each phase's optimizer state in full as ``sharded_optimizer_<i>.safetensors`` (tensors) with
its scalars as JSON metadata; the export swaps full weights in on the main process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import ModelMixin
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from stepdistill.errors import UserError

OPTIMIZER_FILE = "sharded_optimizer_{}.safetensors"


def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def shard_units(method: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to shard, outermost first: diffusers networks with trainable parameters, then
    the method's other children holding trainable parameters outside them."""
    units: list[tuple[str, nn.Module]] = []
    covered: set[int] = set()  # parameters inside a unit
    inside: set[int] = set()  # modules inside a unit (a diffusers network nested in another is not a unit)
    for name, m in method.named_modules():
        if isinstance(m, ModelMixin) and id(m) not in inside and any(p.requires_grad for p in m.parameters()):
            units.append((name, m))
            covered |= {id(p) for p in m.parameters()}
            inside |= {id(x) for x in m.modules()}

    def rest(module: nn.Module, prefix: str) -> None:
        # A child whose trainable parameters are all outside the networks is a unit of its own (DMD2's GAN head); a
        # child that also holds a network (sCM's student with its log-variance head) is searched further down.
        for name, child in module.named_children():
            trainable = [p for p in child.parameters() if p.requires_grad]
            loose = [p for p in trainable if id(p) not in covered]
            if not loose:
                continue
            if len(loose) == len(trainable) and not any(id(x) in inside for x in child.modules()):
                units.append((prefix + name, child))
                covered.update(id(p) for p in child.parameters())
            else:
                rest(child, f"{prefix}{name}.")

    rest(method, "")
    return units


def _blocks(unit: nn.Module) -> list[nn.Module]:
    """The elements of the outermost ModuleLists inside ``unit`` (its repeated blocks)."""
    found: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        for child in m.children():
            if isinstance(child, nn.ModuleList):
                found.extend(c for c in child if any(True for _ in c.parameters()))
            else:
                visit(child)

    visit(unit)
    return found


def shard(method: nn.Module, device: torch.device, world: int) -> list[nn.Module]:
    """Apply FSDP2 to ``method``'s trainable networks in place (on every process, after the process group is up)
    and return the top-level units. The method's parameters are replaced: ask it for its phases afterwards."""
    if world == 1 and not torch.distributed.is_initialized():
        # One process (a debugging run of a sharded recipe): a one-rank group, so the run keeps the sharded
        # checkpoint format and resumes on more processes.
        torch.distributed.init_process_group(store=torch.distributed.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(device.type, (world,))
    units = shard_units(method)
    for _, unit in units:
        for block in _blocks(unit):
            fully_shard(block, mesh=mesh)
        fully_shard(unit, mesh=mesh)
    loose = [n for n, p in method.named_parameters() if p.requires_grad and not _is_dtensor(p)]
    if loose:
        raise RuntimeError(f"train.sharding=fsdp2 left trainable parameters unsharded: {loose[:3]}")
    return [u for _, u in units]


@contextmanager
def no_gradient_sync(units: list[nn.Module]) -> Iterator[None]:
    """Accumulate gradients locally (no reduce-scatter) inside the block: FSDP2's counterpart of DDP's no_sync."""
    for u in units:
        u.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for u in units:
            u.set_requires_gradient_sync(True)


def _full_options(**kw):
    return StateDictOptions(full_state_dict=True, **kw)


def gather_units(method: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the sharded units in full, under the method's names; collective (every
    process calls it), the tensors land on the main process's CPU (the other processes get an empty dict)."""
    full: dict[str, torch.Tensor] = {}
    for name, unit in shard_units_of(method):
        part = get_model_state_dict(unit, options=_full_options(cpu_offload=True))
        full.update({f"{name}.{k}" if name else k: v for k, v in part.items()})
    return full


def shard_units_of(method: nn.Module) -> list[tuple[str, nn.Module]]:
    """The units ``shard`` sharded, found again by their FSDP2 type (outermost only)."""
    units, inside = [], set()
    for name, m in method.named_modules():
        if isinstance(m, FSDPModule) and id(m) not in inside:
            units.append((name, m))
            inside |= {id(x) for x in m.modules()}
    return units


def load_full_state(method: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (the same dict on every process) into the sharded method; names it lacks are left."""
    set_model_state_dict(method, state, options=_full_options(strict=False))


def gather_optimizers(method: nn.Module, optimizers: list) -> list[dict]:
    """Each optimizer's state in full (collective); returns what the main process writes with
    :func:`write_optimizers` (empty dicts elsewhere)."""
    return [get_optimizer_state_dict(method, o, options=_full_options(cpu_offload=True)) for o in optimizers]


def write_optimizers(states: list[dict], folder: Path) -> None:
    """Write full optimizer states as safetensors: tensors as ``state.<param>.<key>``, the rest as JSON metadata."""
    for i, osd in enumerate(states):
        tensors, scalars = {}, {}
        for pname, st in osd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"state.{pname}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{pname}.{k}"] = v
        meta = {"param_groups": json.dumps(osd["param_groups"]), "scalars": json.dumps(scalars)}
        save_file(tensors, str(folder / OPTIMIZER_FILE.format(i)), metadata=meta)


def load_optimizers(method: nn.Module, optimizers: list, folder: Path) -> None:
    """Load what :func:`write_optimizers` wrote into the sharded optimizers (every process reads the files)."""
    for i, opt in enumerate(optimizers):
        path = folder / OPTIMIZER_FILE.format(i)
        if not path.is_file():
            raise UserError(f"it holds no {path.name} (was it written by a run without train.sharding=fsdp2?)")
        state: dict[str, dict] = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                pname, k = key[len("state."):].rsplit(".", 1)
                state.setdefault(pname, {})[k] = f.get_tensor(key)
        for key, v in json.loads(meta["scalars"]).items():
            pname, k = key.rsplit(".", 1)
            state.setdefault(pname, {})[k] = v
        osd = {"state": state, "param_groups": json.loads(meta["param_groups"])}
        set_optimizer_state_dict(method, opt, optim_state_dict=osd, options=_full_options())


def replicated_state(method: nn.Module, frozen: set[str], have: dict) -> dict[str, torch.Tensor]:
    """The entries of ``method``'s state dict outside the sharded units (plain tensors: buffers of replicated
    networks) that are not frozen parameters and not in ``have``, on the CPU."""
    return {k: v.detach().cpu() for k, v in method.state_dict().items()
            if k not in frozen and k not in have and not _is_dtensor(v)}


@contextmanager
def full_weights(method: nn.Module, full: dict[str, torch.Tensor]) -> Iterator[None]:
    """On the main process: put plain full tensors (from :func:`gather_units`) in place of the sharded parameters
    and give the sharded modules back their own class (``fully_shard`` swaps in a generated ``FSDP<Class>``, whose
    name ``save_pretrained`` would write into the export) for the block; then restore both. Nothing may run the
    sharded networks' forward inside the block."""
    swapped = []
    for name, p in list(method.named_parameters()):
        if _is_dtensor(p):
            mod_name, _, attr = name.rpartition(".")
            mod = method.get_submodule(mod_name)
            swapped.append((mod, attr, p))
            setattr(mod, attr, nn.Parameter(full[name], requires_grad=p.requires_grad))
    classes = []
    for m in method.modules():
        if isinstance(m, FSDPModule):
            classes.append((m, type(m)))
            m.__class__ = next(b for b in type(m).__bases__ if b is not FSDPModule)
    try:
        yield
    finally:
        for m, cls in classes:
            m.__class__ = cls
        for mod, attr, p in swapped:
            setattr(mod, attr, p)


def full_ema(shadow: list[torch.Tensor]) -> list[torch.Tensor]:
    """EMA shadow tensors (DTensors like the parameters they follow) in full, on the CPU; collective."""
    return [t.full_tensor().cpu() if _is_dtensor(t) else t.cpu() for t in shadow]


def shard_like(full: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full EMA tensors cut into this process's shards of the parameters they follow."""
    return [distribute_tensor(f.to(p.device, p.dtype), p.device_mesh, p.placements) if _is_dtensor(p) else f
            for f, p in zip(full, params)]

"""``stepdistill average``: the mean of several snapshots of one student's network (a post-hoc EMA)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from diffusers import AutoModel

from stepdistill.errors import UserError, first_line
from stepdistill.files import check_out_dir, prepare_out_dir

from .families import FAMILIES
from .folders import read_model_index, resolve_pipeline_path
from .guidance import AdapterGuidancePipeline
from .lora import LORA_FILE
from .multi_student import MultiStudentPipeline


def average_pipelines(sources: list[str], out: str | Path, overwrite: bool = False) -> Path:
    """Write a pipeline whose denoiser (``unet`` or ``transformer``) is the mean of the ``sources``' denoisers.

    Averaging snapshots of one run (a post-hoc EMA, as in EDM2 or stochastic weight averaging) smooths the
    oscillation of adversarial / distribution-matching training. Only the denoisers are loaded (one at a time, the
    running sum in float32); every other file is copied from the last source, so recorded sampling schedules and the
    model card survive (re-saving the scheduler through diffusers would drop the keys it does not know). Nothing is
    written unless every source loads and matches.
    """
    if len(sources) < 2:
        raise UserError("average needs at least two pipeline folders")
    paths = [Path(resolve_pipeline_path(s)).resolve() for s in sources]
    for src, path in zip(sources, paths):
        if not path.is_dir():  # e.g. "runs/snap", which the resolver takes for a hub id
            raise UserError(f"pipeline folder '{src}' does not exist (average needs local folders: download hub "
                            "pipelines first)")
    target = Path(out).resolve()
    if any(target == p or target in p.parents or p in target.parents for p in paths):
        raise UserError(f"--out '{out}' is, holds or lies inside one of the pipelines to average; choose another "
                        "output folder")
    check_out_dir(out, overwrite)  # before the (possibly long) loading
    total, net_name, ref, net, state = None, None, None, None, {}
    for src, path in zip(sources, paths):
        if MultiStudentPipeline.is_multi_student(path) or AdapterGuidancePipeline.is_guided(path):
            raise UserError(f"pipeline '{src}' is a multi-student or guidance-adapter export; average averages one "
                            "denoising network (a student's snapshots), not routers or adapters")
        index = read_model_index(path / "model_index.json")
        # The denoiser is the component a family names as its network (read from model_index.json: the text
        # encoders and VAE are never loaded).
        name = next((a for a in dict.fromkeys(f.network_attr for f in FAMILIES) if a in index), None)
        if name is None:
            raise UserError(f"pipeline '{src}' has no denoising network to average "
                            f"({' / '.join(dict.fromkeys(f.network_attr for f in FAMILIES))})")
        try:
            net = AutoModel.from_pretrained(str(path), subfolder=name)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the {name} of pipeline '{src}': {first_line(e)}") from None
        config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        if ref is None:
            net_name, ref = name, (type(net).__name__, config)
        elif (name, (type(net).__name__, config)) != (net_name, ref):
            raise UserError(f"pipeline '{src}' has another network than '{sources[0]}' (architecture or config): only "
                            "snapshots of one network can be averaged")
        state = net.state_dict()
        if total is None:
            total = {k: v.float() if v.is_floating_point() else v.clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                if v.is_floating_point():
                    total[k] += v.float()
    mean = {k: (v / len(paths)).to(state[k].dtype) if v.is_floating_point() else state[k] for k, v in total.items()}
    with torch.no_grad():
        net.load_state_dict(mean)
    out = prepare_out_dir(out, overwrite)
    shutil.copytree(paths[-1], out, dirs_exist_ok=True)
    shutil.rmtree(out / net_name)  # the source's weight files (any format) give way to the averaged ones
    net.save_pretrained(str(out / net_name), safe_serialization=True)
    # A LoRA student's folder also holds its adapter weights; they would contradict the averaged (fused) network.
    (out / LORA_FILE).unlink(missing_ok=True)
    card = out / "README.md"
    note = ("\n\nThe network's weights are the mean of these pipelines' (`stepdistill average`): "
            + ", ".join(f"`{s}`" for s in sources) + ".\n")
    card.write_text((card.read_text() if card.is_file() else "") + note)
    return out

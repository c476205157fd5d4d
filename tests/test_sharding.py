"""train.sharding=fsdp2 (stepdistill/loop/sharding.py): a 2-process FSDP2 run of DMD2 on the tiny SD pipeline
(full student, full fake score and GAN head sharded, EMA on) reaches the losses and weights of the same run under
DDP, resumes from its half-way checkpoint exactly, and exports a stock pipeline; what cannot be sharded is
refused."""

from __future__ import annotations

import shutil

import pytest
import torch
from _tiny import log_rows, save_captioned, train_two_processes
from _tiny_sd import build_tiny_sd
from safetensors.torch import load_file

from stepdistill.errors import ConfigError
from stepdistill.loop import train
from stepdistill.trainers import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> str:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    return save_captioned(tmp_path_factory.mktemp("captioned"), 8)


def _overrides(sd_dir: str, data: str, *extra: str) -> list[str]:
    return [f"teacher={sd_dir}", f"data.source={data}", "data.resolution=16", "data.batch_size=2",
            "train.tracker=none", "train.log_every=1", "train.sample_every=0", "train.max_steps=4",
            "train.checkpoint_every=2", "optim.student.lr=0.001", "optim.fake_score.lr=0.001",
            "method_args.gan_weight_student=0.01", "method_args.gan_weight_critic=0.01", "train.ema_decay=0.9", *extra]


def _losses(run) -> list[dict]:
    return [{k: v for k, v in r.items() if "/" in k and not k.startswith("lr/")} for r in log_rows(run)]


def test_fsdp2_equals_ddp_resumes_exactly_and_exports(sd_dir, captioned, tmp_path):
    config = "configs/digits16_dmd2.yaml"
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for run, extra in ((ddp, []), (fsdp, ["train.sharding=fsdp2"])):
        res = train_two_processes(config, run, _overrides(sd_dir, captioned, *extra))
        assert res.returncode == 0, res.stderr[-4000:]

    # Same losses and weights as DDP, up to the order of float additions (reduce-scatter vs all-reduce).
    a, b = _losses(ddp), _losses(fsdp)
    assert [r.keys() for r in a] == [r.keys() for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    wa, wb = (load_file(r / "checkpoints" / "step-4" / "model.safetensors") for r in (ddp, fsdp))
    assert wa.keys() == wb.keys() and any(k.startswith("gan_head.") for k in wa)
    assert not any(k.startswith("teacher.") for k in wb)  # the trained state only, as unsharded
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    sharded_files = {p.name for p in (fsdp / "checkpoints" / "step-4").iterdir()}
    assert {"sharded_optimizer_0.safetensors", "sharded_optimizer_1.safetensors", "ema.safetensors"} <= sharded_files

    # Resume from the half-way checkpoint: bit for bit the uninterrupted sharded run.
    res_run = tmp_path / "resumed"
    shutil.copytree(fsdp, res_run)
    shutil.rmtree(res_run / "checkpoints" / "step-4")
    shutil.rmtree(res_run / "pipeline")
    (res_run / "checkpoints" / "latest").write_text("step-2\n")
    res = train_two_processes(config, res_run, _overrides(sd_dir, captioned, "train.sharding=fsdp2"))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "resuming from" in res.stderr
    assert _losses(res_run) == b
    for name in ("model.safetensors", "ema.safetensors", "sharded_optimizer_0.safetensors",
                 "sharded_optimizer_1.safetensors"):
        x, y = (load_file(r / "checkpoints" / "step-4" / name) for r in (fsdp, res_run))
        assert x.keys() == y.keys() and x, name
        for k in x:
            assert torch.equal(x[k], y[k]), (name, k)

    # The export holds the EMA weights in full, as the DDP run's export does.
    from diffusers import UNet2DConditionModel

    ua, ub = (UNet2DConditionModel.from_pretrained(str(r / "pipeline"), subfolder="unet") for r in (ddp, fsdp))
    for (n, p), q in zip(ua.named_parameters(), ub.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)
    ema = load_file(fsdp / "checkpoints" / "step-4" / "ema.safetensors")
    assert torch.equal(next(iter(ub.parameters())), ema["shadow.0"])  # the EMA, not the raw student
    from stepdistill.pipelines import load_pipeline

    pipe = load_pipeline(str(fsdp / "pipeline"))  # the whole export loads: no FSDP class names written into it
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    assert "FSDP" not in (fsdp / "pipeline" / "model_index.json").read_text()


def test_what_cannot_be_sharded_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.sharding"):
        load_config("digits16_lcm", ["train.sharding=zero3"])
    cfg = load_config("digits16_lcm", ["train.sharding=fsdp2", "train.max_steps=1", "train.tracker=none"])
    with pytest.raises(ConfigError, match="method 'consistency' cannot be sharded"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    cfg = load_config("digits16_scm", ["train.sharding=fsdp2", "method_args.jvp=exact", "train.tracker=none"])
    with pytest.raises(ConfigError, match="method_args.jvp=finite_difference"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_rcm_fsdp2_equals_ddp(sd_dir, captioned, tmp_path):
    """rCM (sCM's finite-difference time derivative, the log-variance head, a full fake score, a 2-step student whose
    DMD term draws its backward-simulation step count on each process) sharded over two processes reaches the losses
    and weights of the same run under DDP."""
    extra = ["optim.student.lr=0.001", "optim.fake_score.lr=0.001", "method_args.jvp=finite_difference",
             "method_args.fd_step=0.01", "method_args.tangent_warmup=2", "method_args.fake_updates_per_student=1",
             "train.checkpoint_every=0", "train.ema_decay=0.9", "method_args.sample_steps=2"]
    runs = {}
    for name, shard in (("ddp", []), ("fsdp", ["train.sharding=fsdp2"])):
        runs[name] = tmp_path / name
        over = [o for o in _overrides(sd_dir, captioned, *extra, *shard) if "gan_weight" not in o]
        res = train_two_processes("configs/digits16_rcm.yaml", runs[name], over)
        assert res.returncode == 0, res.stderr[-4000:]
    a, b = _losses(runs["ddp"]), _losses(runs["fsdp"])
    assert len(a) == 4 and "student/scm_mse" in a[0] and "fake_score/denoise_loss" in a[0]
    assert [r.keys() for r in a] == [r.keys() for r in b]
    for ra, rb in zip(a, b):
        for k in ra:
            assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), k
    from diffusers import UNet2DConditionModel

    ua, ub = (UNet2DConditionModel.from_pretrained(str(r / "pipeline"), subfolder="unet") for r in runs.values())
    for (n, p), q in zip(ua.named_parameters(), ub.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=n)

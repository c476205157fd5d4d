"""The teacher method trains through the loop, its loss falls, and its exported pipeline loads and samples."""

import json

import numpy as np
import pytest
import torch
from _tiny import digits_batch, export, fixed_loss_descent, grid

from stepdistill.loop import build_method, train
from stepdistill.pipelines import ClassConditionalPipeline, load_pipeline
from stepdistill.trainers import load_config

TINY = ["method_args.block_out_channels=[8,16]", "method_args.layers_per_block=1",
        "method_args.down_block_types=[DownBlock2D,DownBlock2D]", "method_args.up_block_types=[UpBlock2D,UpBlock2D]",
        "method_args.norm_num_groups=4", "method_args.attention_head_dim=8", "method_args.sample_steps=2"]


# Every test runs with one torch thread (the one_thread fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def test_teacher_trains_and_exports(tmp_path):
    cfg = load_config("configs/digits16_teacher.yaml", TINY + [
        "train.max_steps=40", "train.log_every=5", "train.checkpoint_every=0", "train.sample_every=0",
        "train.tracker=none", "data.batch_size=32", "optim.main.warmup_steps=0", "optim.main.lr=0.003"])
    run = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "logs.jsonl").read_text().splitlines()]
    first, last = rows[0]["main/loss"], np.mean([r["main/loss"] for r in rows[-3:]])
    assert last < 0.8 * first, (first, last)
    pipe = load_pipeline(str(run / "pipeline"))
    assert isinstance(pipe, ClassConditionalPipeline) and pipe.num_classes == 10
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    img = pipe([3, 7], num_inference_steps=2, guidance_scale=2.0, output_type="np").images
    assert img.shape == (2, 16, 16, 1) and np.isfinite(img).all()
    assert (run / "samples").is_dir() and (run / "config.yaml").is_file()


def test_teacher_loss_moves_the_network_toward_the_target():
    """A few optimizer steps on one fixed batch reduce that batch's loss (the gradient points the right way)."""
    cfg = load_config("configs/digits16_teacher.yaml", TINY)
    method = build_method(cfg)
    opt = torch.optim.Adam(method.unet.parameters(), lr=3e-3)
    before, after = fixed_loss_descent(method, "main", digits_batch(64), opt, 15)
    assert after < 0.7 * before


def test_unconditional_teacher_exports_ddim_pipeline(tmp_path):
    cfg = load_config("configs/digits16_teacher.yaml", TINY + ["method_args.num_classes=0"])
    method = build_method(cfg)
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert type(pipe).__name__ == "DDIMPipeline"
    assert grid(method, 2, 0).shape == (2, 16, 16, 1)


def test_flow_teacher_trains_on_the_rectified_flow_target_and_exports_a_flow_pipeline(tmp_path):
    """prediction_type flow_prediction: x_t = (1 - s) x0 + s eps with the target eps - x0 at t = s T (checked against
    the formula, not the Denoiser), a falling loss, and a pipeline with FlowMatchEulerDiscreteScheduler."""
    cfg = load_config("digits16_flow_teacher", TINY)
    method = build_method(cfg)
    assert method.denoiser.is_flow
    x0, eps, t = torch.randn(3, 1, 16, 16), torch.randn(3, 1, 16, 16), torch.tensor([100.0, 500.0, 1000.0])
    s = (t / 1000).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(method.denoiser.add_noise(x0, eps, t), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(method.denoiser.training_target(x0, eps, t), eps - x0)
    opt = torch.optim.Adam(method.unet.parameters(), lr=3e-3)
    before, after = fixed_loss_descent(method, "main", digits_batch(64), opt, 15)
    assert after < 0.7 * before
    export(method, tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"))
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    img = pipe([3, 7], num_inference_steps=4, guidance_scale=2.0, output_type="np").images
    assert img.shape == (2, 16, 16, 1) and np.isfinite(img).all()

"""GAN features as values: every family returns its network's intermediate features from the call that computes the
output (no hook left behind), so DMD2's GAN term trains on the transformer families (SD3, Flux) as on UNets, and the
exports still load in stock diffusers without stepdistill."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from _stock import run_without_stepdistill
from _tiny import log_rows, save_captioned, save_class_teacher
from _tiny_sd import build_tiny_flux, build_tiny_sd, build_tiny_sd3

from stepdistill.loop import build_method, train
from stepdistill.pipelines import family_of, load_pipeline
from stepdistill.trainers import load_config

pytestmark = pytest.mark.usefixtures("one_thread")

STOCK = """
import json, sys, torch
import diffusers

args = json.loads(sys.argv[1])
index = json.load(open(args["path"] + "/model_index.json"))
absent = {k: None for k, v in index.items() if v == [None, None]}  # saved as absent (SD3 without its T5)
pipe = diffusers.DiffusionPipeline.from_pretrained(args["path"], **absent)
assert type(pipe).__name__ == args["cls"], type(pipe).__name__
pipe.set_progress_bar_config(disable=True)
z = torch.load(args["noise"])
b, c, h, w = z.shape
if args["packed"]:  # Flux's token layout: 2x2 latent patches, row-major, channels fastest within a patch
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
out = pipe(["a picture 1"], guidance_scale=args["guidance"], latents=z, height=16, width=16, output_type="latent",
           sigmas=[1.0]).images
if args["packed"]:
    out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
torch.save(out, args["out"])
"""


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gan")
    return {"class": save_class_teacher(root / "class", attention=True), "sd": build_tiny_sd(root / "sd"),
            "sd3": build_tiny_sd3(root / "sd3"), "flux": build_tiny_flux(root / "flux")}


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    return save_captioned(tmp_path_factory.mktemp("captioned"), 4)


@pytest.mark.parametrize("kind", ["class", "sd", "sd3", "flux"])
def test_features_are_the_feature_block_output_of_the_same_call(pipes, kind):
    family = family_of(load_pipeline(pipes[kind]), kind, resolution=16)
    net = family.network
    torch.manual_seed(0)
    x = torch.randn(family.noise_shape(2))
    t = torch.tensor([700, 300])
    cond = family.classes.cond(torch.tensor([1, 2])) if family.classes is not None else family.prompt_cond(
        ["a picture 1", "a red cat"])[0]
    if family.guidance_input is not None:  # Flux-dev takes its guidance scale as an input
        cond = replace(cond, guidance=torch.full((2,), family.guidance_input))
    # The block's output caught by a hook of the test's own, on a separate call.
    seen = []
    handle = family.feature_block(net).register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        plain = family.call(net, x, t, cond)
    handle.remove()
    with torch.no_grad():
        out, feats = family.call(net, x, t, cond, features=True)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)  # returning the features changes nothing
    block_out = seen[0]
    if kind in ("sd3", "flux"):  # image tokens (B, N, C) in raster order over the h x w grid of patches
        tokens = block_out[1]
        side = x.shape[-1] // (2 if kind == "flux" else net.config.patch_size)
        assert tokens.shape[1] == side * side
        expected = tokens.reshape(2, side, side, -1).permute(0, 3, 1, 2)
    else:  # a UNet's bottleneck
        expected = block_out[0] if isinstance(block_out, tuple) else block_out
    torch.testing.assert_close(feats, expected, rtol=0, atol=0)
    assert feats.shape[1] == family.feature_channels(net)
    # No hook stays behind on the block.
    seen.clear()
    with torch.no_grad():
        family.call(net, x, t, cond)
    assert not seen


def _gan_overrides(teacher: str, source: str, *extra: str) -> list[str]:
    return [f"teacher={teacher}", f"data.source={source}", "data.resolution=16", "data.batch_size=2",
            "train.max_steps=3", "train.tracker=none", "train.checkpoint_every=0", "train.log_every=1",
            "method_args.gan_weight_student=0.01", "method_args.gan_weight_critic=0.1",
            "method_args.fake_updates_per_student=1", "method_args.sample_prompts=[a picture 1]",
            "method_args.gan_head_channels=8", *extra]


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_dmd2_gan_term_trains_on_transformers_and_the_export_loads_in_stock_diffusers(pipes, captioned, kind,
                                                                                      tmp_path):
    cfg = load_config("digits16_dmd2", _gan_overrides(pipes[kind], captioned, "method_args.student_timesteps=[1000]"))
    run = train(cfg, tmp_path / "run")
    rows = log_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["student/gan_g_loss"] > 0 and r["fake_score/gan_d_loss"] > 0 for r in rows)
    export = run / "pipeline"
    # Our sampler (the exported network in the method) from fixed noise, against the stock pipeline in a process
    # that never imports stepdistill, at the recorded sigma.
    method = build_method(cfg)
    net = method.student.model
    net.load_state_dict(type(net).from_pretrained(export, subfolder="transformer").state_dict())
    z = torch.randn(method.family.noise_shape(1), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cond, _ = method.family.prompt_cond(["a picture 1"])
        ours = method.context().generate(method.student, cond, 1, steps=0, noise=z.clone())
    torch.save(z, tmp_path / "z.pt")
    args = {"path": str(export), "noise": str(tmp_path / "z.pt"), "out": str(tmp_path / "out.pt"),
            "cls": {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[kind], "packed": kind == "flux",
            "guidance": method.family.distilled_guidance_scale}
    run_without_stepdistill(STOCK, args)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours, atol=1e-4, rtol=1e-4)
    assert json.loads((export / "scheduler" / "scheduler_config.json").read_text())["student_sigmas"] == [1.0]


def test_gan_head_sees_the_features_the_family_returns(pipes, captioned):
    """The critic loss equals softplus(-D(real)) + softplus(D(fake)) computed by hand from the head on features the
    family returns for the same noised inputs."""
    from stepdistill.trainers import dmd2

    cfg = load_config("digits16_dmd2", _gan_overrides(pipes["sd3"], captioned, "method_args.student_timesteps=[1000]",
                                                     "method_args.dm_weight=1"))
    method = build_method(cfg)
    ctx, nets = method.context(), dmd2.StudentNets(method.student, method.fake(), method.gan_head)
    cond, _ = method.family.prompt_cond(["a picture 1", "a red cat"])
    real = torch.randn(method.family.noise_shape(2))
    torch.manual_seed(5)
    loss, logs = dmd2.fake_score_loss(method.cfg, ctx, nets, cond, 2, real)
    # The same draws by hand: student samples, t, the denoising noise, then the real data's noise.
    torch.manual_seed(5)
    with torch.no_grad():
        x0_s = ctx.generate(method.student, cond, 2)
        t = ctx.draw_timesteps(2, 0.0, 1.0, x0_s.device)
        eps = torch.randn_like(x0_s)
        fake = method.fake()
        _, f_fake = fake.raw(fake.add_noise(x0_s, eps, t), t, cond, features=True)
        _, f_real = fake.raw(fake.add_noise(real, torch.randn_like(real), t), t, cond, features=True)
        head = method.gan_head
        by_hand = (torch.nn.functional.softplus(-head(f_real)).mean()
                   + torch.nn.functional.softplus(head(f_fake)).mean())
    assert logs["gan_d_loss"] == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["denoise_loss"] + 0.1 * logs["gan_d_loss"], rel=1e-5)

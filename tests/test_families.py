"""Model families beyond SD1.x: SDXL (two text encoders, pooled embeddings and time ids) with DMD2 and consistency
distillation, SD3 and Flux (flow-matching transformers; Flux packed into tokens and guidance-distilled) with DMD2,
on tiny pipelines built in code.

Each export is loaded in a process that never imports stepdistill, with the family's stock diffusers class (or
``load_lora_weights`` on the base pipeline), and its one-step output at the recorded timesteps must equal our own
sampler's output for the same noise (tolerance 1e-4: the exported LCMScheduler's c_skip at t = 999 is ~2.5e-9, the
rest is float32 round-off of the same network calls).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _stock import run_without_stepdistill
from _tiny import export as save_export
from _tiny import loss as phase_loss
from _tiny import randomize_lora, save_captioned, typed
from _tiny_sd import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl

from stepdistill.errors import ConfigError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import load_pipeline
from stepdistill.pipelines.families import FluxFamily, SD3Family, SDXLFamily, family_of
from stepdistill.trainers import load_config

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red 1"
STOCK = """
import json, torch
import diffusers

args = json.loads(sys.argv[1])
cls = getattr(diffusers, args["cls"])
pipe = cls.from_pretrained(args["path"], **{k: None for k in args.get("absent", [])})
if args.get("lora"):
    pipe.load_lora_weights(args["lora"])
    sched = json.load(open(args["lora"] + "/scheduler/scheduler_config.json"))["_class_name"]
    pipe.scheduler = getattr(diffusers, sched).from_pretrained(args["lora"], subfolder="scheduler")
pipe.set_progress_bar_config(disable=True)
assert "stepdistill" not in sys.modules
z = torch.load(args["noise"])
b, c, h, w = z.shape
if args.get("packed"):  # Flux takes and returns latents packed into 2x2-patch tokens, row-major
    z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
out = pipe([args["prompt"]], guidance_scale=args["guidance"], latents=z, height=16, width=16, output_type="latent",
           **args["when"]).images
if args.get("packed"):
    out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
torch.save(out, args["out"])
"""


def _stock_latent(tmp_path: Path, z: torch.Tensor, **args) -> torch.Tensor:
    """The one-step latent of a stock diffusers pipeline, computed in a process without stepdistill."""
    torch.save(z, tmp_path / "z.pt")
    args.update(noise=str(tmp_path / "z.pt"), out=str(tmp_path / "out.pt"), prompt=PROMPT)
    run_without_stepdistill(STOCK, args)
    return torch.load(tmp_path / "out.pt")


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> str:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red 1\na blue 2\na green 3\n")
    return str(path)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory) -> str:
    return save_captioned(tmp_path_factory.mktemp("captioned"), 4)


def _overrides(sdxl_dir: str, source: str, *extra: str) -> list[str]:
    return [f"teacher={sdxl_dir}", f"data.source={source}", "data.resolution=16", "data.batch_size=2",
            "train.max_steps=2", "train.tracker=none", "train.checkpoint_every=0", "train.log_every=1", *extra]


def _noise(seed: int = 3) -> torch.Tensor:
    return torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed))


def test_sdxl_is_its_own_family(sdxl_dir):
    family = family_of(load_pipeline(sdxl_dir), "tiny-sdxl", resolution=16)
    assert isinstance(family, SDXLFamily)
    cond, uncond = family.prompt_cond([PROMPT, "a blue 2"])
    assert cond.encoder_hidden_states.shape[-1] == 32  # both encoders' hidden states, concatenated
    assert cond.added_cond_kwargs["text_embeds"].shape == (2, 16)
    assert cond.added_cond_kwargs["time_ids"][0].tolist() == [16, 16, 0, 0, 16, 16]
    assert float(uncond.encoder_hidden_states.abs().sum()) == 0.0  # force_zeros_for_empty_prompt, as the pipeline


def test_sdxl_dmd2_trains_and_exports_a_stock_sdxl_pipeline(sdxl_dir, prompts, tmp_path):
    cfg = load_config("digits16_dmd2", _overrides(sdxl_dir, prompts, "method_args.gan_weight_student=0",
                                                  "method_args.gan_weight_critic=0",
                                                  "method_args.fake_score_lora_rank=2"))
    run = train(cfg, tmp_path / "run")
    rows = [json.loads(s) for s in (run / "logs.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["fake_score/loss"])) for r in rows)
    export = run / "pipeline"
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"

    # Our sampler: the exported student network in the method, generating from the same noise.
    method = build_method(cfg)
    from diffusers import UNet2DConditionModel

    method.student.model.load_state_dict(UNet2DConditionModel.from_pretrained(export, subfolder="unet").state_dict())
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        ours = method.context().generate(method.student, cond, 1, steps=0, noise=z.clone())
    stock = _stock_latent(tmp_path, z, cls="StableDiffusionXLPipeline", path=str(export), when={"timesteps": [999]},
                          guidance=1.0)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)


def test_sdxl_dmd2_gan_term_on_vae_latents(sdxl_dir, captioned):
    """The GAN term on SDXL's VAE latents of real images: the critic loss equals softplus(-D(real)) + softplus(D(fake))
    computed here from the head on the UNet bottleneck features that ``family.call(..., features=True)`` returns
    (the phase's draws replayed), and one step on the GAN-only student loss raises the head's logits on the student's
    samples."""
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a picture 0", "a picture 1"]}
    # dm_weight=0, gan_weight_student=1: the student loss is the GAN generator term alone.
    method = build_method(load_config("digits16_dmd2", _overrides(sdxl_dir, captioned, "method_args.dm_weight=0",
                                                                  "method_args.gan_weight_student=1")))
    family, teacher, fake, head, c = method.family, method.teacher, method.fake(), method.gan_head, method.cfg
    T = teacher.num_train_timesteps
    assert isinstance(family, SDXLFamily) and teacher.prediction_type == "epsilon" and c.gan_weight_critic == 0.01
    assert head.net[0].num_channels == 16  # the UNet's last block width (its mid_block output)

    def noised(x0, eps, t):
        a = teacher.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    # 1. The critic: the phase's draws are the VAE posterior, G's noise, t in [0, T), the noise of G's samples and
    # the noise of the real latents.
    torch.manual_seed(0)
    loss, logs = phase_loss(method, "fake_score", batch, 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    method.zero_grad()
    torch.manual_seed(0)
    b = typed(method, "fake_score", batch)
    assert b.real.shape == (2, 4, 8, 8)
    with torch.no_grad():
        x0_s = method.student(torch.randn(2, 4, 8, 8), torch.full((2,), 999), b.cond, "x0")
        t = torch.randint(0, T, (2,))
        eps = torch.randn_like(x0_s)
        eps_f, feats_fake = family.call(fake.model, noised(x0_s, eps, t).float(), t, b.cond, features=True)
        _, feats_real = family.call(fake.model, noised(b.real, torch.randn_like(b.real), t).float(), t, b.cond,
                                    features=True)
        assert feats_fake.shape == feats_real.shape == (2, 16, 4, 4)
        d_real, d_fake = head(feats_real), head(feats_fake)
    critic = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
    denoise = F.mse_loss(eps_f, eps)
    assert logs["gan_d_loss"] == pytest.approx(critic.item(), rel=1e-5)
    assert logs["denoise_loss"] == pytest.approx(denoise.item(), rel=1e-5)
    assert loss.item() == pytest.approx((denoise + 0.01 * critic).item(), rel=1e-5)

    # 2. The generator: the head's logits on G's re-noised samples (G's noise, t in [min_t T, max_t T], the
    # re-noising noise, all fixed by the seed) before and after one SGD step on the student loss.
    def logits() -> torch.Tensor:
        torch.manual_seed(1)
        b = typed(method, "student", batch)
        with torch.no_grad():
            x0 = method.student(torch.randn(2, 4, 8, 8), torch.full((2,), 999), b.cond, "x0")
            t = torch.randint(int(c.min_t * T), min(int(c.max_t * T) + 1, T), (2,))
            x_t = noised(x0, torch.randn_like(x0), t)
            return head(family.call(fake.model, x_t.float(), t, b.cond, features=True)[1])

    before = logits()
    torch.manual_seed(1)
    loss, logs = phase_loss(method, "student", batch, 0)
    assert logs["gan_g_loss"] == pytest.approx(F.softplus(-before).mean().item(), rel=1e-5)
    assert loss.item() == pytest.approx(logs["gan_g_loss"], rel=1e-6)  # the DM term weighs 0
    params = [p for p in method.student.parameters() if p.requires_grad]
    loss.backward()
    norm = torch.cat([p.grad.flatten() for p in params]).norm()
    assert norm > 0
    with torch.no_grad():
        for p in params:  # a step of length 0.01 in parameter space, down the gradient
            p.sub_(0.01 / norm * p.grad)
    after = logits()
    assert after.mean() > before.mean()
    assert F.softplus(-after).mean() < F.softplus(-before).mean()


def test_sdxl_lcm_full_student_with_guidance_embedding(sdxl_dir, captioned, tmp_path):
    cfg = load_config("digits16_lcm", _overrides(sdxl_dir, captioned, "method_args.guidance_min=2",
                                                 "method_args.guidance_max=6", "method_args.w_embedding_dim=8",
                                                 "method_args.sample_timesteps=[]", "train.ema_decay=0"))
    run = train(cfg, tmp_path / "run")
    export = run / "pipeline"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(export, subfolder="unet")
    assert unet.config.time_cond_proj_dim == 8
    method = build_method(cfg)
    method.student.model.load_state_dict(unet.state_dict())
    z, w = _noise(), 4.0
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        ours = method.consistency_fn(method.student, z, torch.tensor([999]), torch.tensor([-1]),
                                     method._student_cond(cond, torch.tensor([w])))
    stock = _stock_latent(tmp_path, z, cls="StableDiffusionXLPipeline", path=str(export), when={"timesteps": [999]},
                          guidance=w)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)


def test_sdxl_lcm_lora_loads_onto_the_stock_base(sdxl_dir, captioned, tmp_path):
    cfg = load_config("digits16_lcm_lora", _overrides(sdxl_dir, captioned, "method_args.lora_rank=2",
                                                      "method_args.lora_alpha=4"))
    method = build_method(cfg)
    randomize_lora(method.student.model, 0.2)
    export = tmp_path / "lora"
    save_export(method, export)
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        ours = method.consistency_fn(method.student, z, torch.tensor([999]), torch.tensor([-1]), cond)
    stock = _stock_latent(tmp_path, z, cls="StableDiffusionXLPipeline", path=sdxl_dir, lora=str(export),
                          when={"timesteps": [999]}, guidance=1.0)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)
    # Onto a pipeline of another family: one line naming both.
    from _tiny_sd import build_tiny_sd

    from stepdistill.errors import UserError

    sd_dir = build_tiny_sd(tmp_path / "sd")
    with pytest.raises(UserError, match="trained on a StableDiffusionXLPipeline .*cannot be loaded into a "
                                        "StableDiffusionPipeline"):
        load_pipeline(str(export), base=sd_dir)
    # A short training run of the same recipe on SDXL.
    run = train(cfg, tmp_path / "run")
    assert (run / "pipeline" / "pytorch_lora_weights.safetensors").is_file()


def test_unsupported_family_names_the_supported_ones(tmp_path):
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, LDMPipeline, UNet2DModel, VQModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    vqvae = VQModel(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                    up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=1,
                    norm_num_groups=4, num_vq_embeddings=16, vq_embed_dim=1)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=DDIMScheduler()).save_pretrained(str(tmp_path / "ldm"))
    with pytest.raises(ConfigError, match=r"'.*ldm' is a LDMPipeline, which no supported family matches \(supported: "
                                          r".*SDXL"):
        build_method(load_config("digits16_dmd2", [f"teacher={tmp_path / 'ldm'}"]))
    # An unconditional pixel pipeline is a family (sampled and evaluated), but no teacher to distil: one line, before
    # the run folder exists.
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    for method in ("digits16_dmd2", "digits16_vsd", "digits16_lcm"):
        with pytest.raises(ConfigError, match=r"teacher '.*ddpm' is an unconditional DDPMPipeline: distillation "
                                              "needs a class-conditional or text-to-image teacher"):
            train(load_config(method, [f"teacher={tmp_path / 'ddpm'}", "train.tracker=none"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # Any other method asking its batches for conditioning gets the same reason, not a text teacher's.
    family = family_of(load_pipeline(str(tmp_path / "ddpm")), "ddpm")
    assert family.kind == "none" and family.batch({"image": torch.zeros(2, 1, 8, 8)}, cond=False, real=True).size == 2
    with pytest.raises(ConfigError, match=r"teacher 'ddpm' \(DDPMPipeline\) is unconditional: this method needs a "):
        family.batch({"image": torch.zeros(2, 1, 8, 8)}, cond=True, real=False)


# --- SD3: a flow-matching transformer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory) -> str:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "pipe")


def _flow_dmd2_run(teacher_dir: str, prompts: str, tmp_path: Path):
    """A 2-step DMD2 run of a flow-matching transformer teacher (one step from t = 1000, LoRA fake score, no GAN):
    its config, export folder and exported scheduler config."""
    cfg = load_config("digits16_dmd2", _overrides(teacher_dir, prompts, "method_args.gan_weight_student=0",
                                                  "method_args.gan_weight_critic=0",
                                                  "method_args.fake_score_lora_rank=2",
                                                  "method_args.student_timesteps=[1000]"))
    export = train(cfg, tmp_path / "run") / "pipeline"
    return cfg, export, json.loads((export / "scheduler" / "scheduler_config.json").read_text())


def _exported_student_one_step(cfg, export: Path):
    """The method with the exported student network loaded, and its one-step x0 for the test noise and PROMPT."""
    method = build_method(cfg)
    net = type(method.student.model).from_pretrained(export, subfolder="transformer")
    method.student.model.load_state_dict(net.state_dict())
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        return method, z, method.context().generate(method.student, cond, 1, steps=0, noise=z.clone())


def test_sd3_dmd2_trains_and_exports_a_stock_sd3_pipeline(sd3_dir, prompts, tmp_path):
    cfg, export, sched = _flow_dmd2_run(sd3_dir, prompts, tmp_path)
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "StableDiffusion3Pipeline"
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["student_sigmas"] == [1.0]
    assert sched["shift"] == 1.0 and not sched["stochastic_sampling"]

    method, z, ours = _exported_student_one_step(cfg, export)
    assert isinstance(method.family, SD3Family) and method.teacher.is_flow
    stock = _stock_latent(tmp_path, z, cls="StableDiffusion3Pipeline", path=str(export),
                          absent=["text_encoder_3", "tokenizer_3"], when={"sigmas": [1.0]}, guidance=1.0)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)


def test_flow_teacher_refusals(sd3_dir, captioned, prompts):
    no_gan = ["method_args.gan_weight_student=0", "method_args.gan_weight_critic=0"]
    with pytest.raises(ConfigError, match=r"student_timesteps must be non-empty integers in \[1, 1000\] .*flow"):
        build_method(load_config("digits16_dmd2", _overrides(sd3_dir, prompts, *no_gan,
                                                                   "method_args.student_timesteps=[0]")))
    with pytest.raises(ConfigError, match="cannot be conditioned on the guidance scale"):
        build_method(load_config("digits16_lcm", _overrides(sd3_dir, captioned,
                                                                          "method_args.guidance_min=1")))
    # The GAN term works on a transformer (no mid_block): its features are the image tokens after the middle joint
    # block, token i * 8 + j at latent position (i, j) of the 8x8 grid (patch size 1), read here by our own hook.
    method = build_method(load_config("digits16_dmd2", _overrides(sd3_dir, captioned,
                                                                  "method_args.student_timesteps=[1000]")))
    net = method.fake().model
    assert len(net.transformer_blocks) == 1 and method.gan_head.net[0].num_channels == 2 * 8  # heads x head dim
    seen = []
    hook = net.transformer_blocks[0].register_forward_hook(lambda module, args, out: seen.append(out[1]))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300.0, 800.0])
    cond, _ = method.family.prompt_cond([PROMPT, "a blue 2"])
    with torch.no_grad():
        out, feats = method.family.call(net, x, t, cond, features=True)
        plain = method.family.call(net, x, t, cond)
    hook.remove()
    assert seen[0].shape == (2, 64, 16) and feats.shape == (2, 16, 8, 8)
    for i, j in ((0, 0), (2, 5), (7, 3)):
        torch.testing.assert_close(feats[:, :, i, j], seen[0][:, i * 8 + j])
    torch.testing.assert_close(out, plain, atol=0, rtol=0)  # asking for features changes nothing
    loss, logs = phase_loss(method, "fake_score", {"image": torch.rand(2, 3, 16, 16) * 2 - 1,
                                                   "prompt": ["a picture 0", "a picture 1"]}, 0)
    loss.backward()
    assert "gan_d_loss" in logs and all(p.grad.abs().sum() > 0 for p in method.gan_head.parameters())


# --- memory: frozen parts in bf16, gradient checkpointing ----------------------------------------------------------
def test_teacher_dtype_bf16_keeps_trainable_weights_fp32(sdxl_dir, prompts, tmp_path):
    cfg = load_config("digits16_dmd2", _overrides(sdxl_dir, prompts, "method_args.gan_weight_student=0",
                                                  "method_args.gan_weight_critic=0",
                                                  "method_args.fake_score_lora_rank=2", "train.teacher_dtype=bfloat16",
                                                  "train.gradient_checkpointing=true"))
    torch.manual_seed(0)  # the same LoRA initialisation as the fp32 reference below
    method = build_method(cfg)
    teacher = method.teacher.model
    frozen = {p.dtype for p in teacher.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in teacher.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    pipe = method.family.pipe
    assert {p.dtype for p in pipe.text_encoder_2.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in method.student.parameters()} == {torch.float32}
    # Both phases run, and their losses are close to those of the same method in fp32 with the same draws (the
    # fake score's denoising loss within 0.5%; the student's DM loss, a difference of two scores, within 10%).
    torch.manual_seed(0)
    ref = build_method(load_config("digits16_dmd2", _overrides(sdxl_dir, prompts,
                                                               "method_args.gan_weight_student=0",
                                                               "method_args.gan_weight_critic=0",
                                                               "method_args.fake_score_lora_rank=2")))
    batch = {"prompt": ["a red 1", "a blue 2"]}
    for phase, rel in (("student", 0.1), ("fake_score", 5e-3)):
        losses = []
        for m in (method, ref):
            torch.manual_seed(0)
            loss, _ = phase_loss(m, phase, batch, 0)
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=rel) and losses[0] != losses[1], (phase, losses)
    # The real score in bf16 is close to the fp32 teacher's.
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    with torch.no_grad():
        cond, uncond = method.family.prompt_cond(batch["prompt"])
        low = method.context().real_score(x, t, cond, uncond, method.cfg.real_guidance)
        cond, uncond = ref.family.prompt_cond(batch["prompt"])
        high = ref.context().real_score(x, t, cond, uncond, ref.cfg.real_guidance)
    assert low.dtype == torch.float32
    assert (low - high).abs().max() < 0.05 * high.abs().max() and not torch.equal(low, high)
    # Gradient checkpointing reaches every network with trainable weights (student; teacher network with adapters):
    # the loop switches it on when it checks the method.
    from stepdistill.loop.loop import check_method
    from stepdistill.loop.setup import open_dataset

    check_method(method, cfg, open_dataset(cfg.data))
    assert method.student.model.is_gradient_checkpointing and teacher.is_gradient_checkpointing
    # A short run with both options trains and exports the frozen parts as published (fp32 originals).
    run = train(cfg, tmp_path / "run")
    exported = load_pipeline(str(run / "pipeline"))
    original = load_pipeline(sdxl_dir)
    for name in ("vae", "text_encoder_2"):
        a, b = getattr(exported, name).state_dict(), getattr(original, name).state_dict()
        assert all(a[k].dtype == torch.float32 and torch.equal(a[k], b[k]) for k in b), name
    assert {p.dtype for p in exported.unet.parameters()} == {torch.float32}


def test_memory_options_refused_where_they_cannot_work(sdxl_dir, prompts, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="'train.teacher_dtype' is 'float16', which needs a GPU"):
        train(load_config("digits16_dmd2", _overrides(sdxl_dir, prompts, "train.teacher_dtype=float16")), out)
    with pytest.raises(ConfigError, match="'train.teacher_dtype' must be float32 / bfloat16 / float16"):
        load_config("digits16_dmd2", ["train.teacher_dtype=int8"])
    assert not out.exists()


# --- Flux: packed latents, guidance as an input -------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> str:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "pipe")


def test_flux_dmd2_trains_and_exports_a_stock_flux_pipeline(flux_dir, prompts, tmp_path):
    cfg, export, sched = _flow_dmd2_run(flux_dir, prompts, tmp_path)
    assert json.loads((export / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    assert sched["student_sigmas"] == [1.0] and not sched["use_dynamic_shifting"]

    method, z, ours = _exported_student_one_step(cfg, export)
    assert isinstance(method.family, FluxFamily) and method.teacher.guidance_input == 3.5
    # The stock pipeline's default guidance_scale (3.5) is the guidance input the student was trained with.
    stock = _stock_latent(tmp_path, z, cls="FluxPipeline", path=str(export), when={"sigmas": [1.0]},
                          guidance=3.5, packed=True)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)


def test_flux_guidance_is_one_pass_with_the_scale_as_input(flux_dir):
    """For a guidance-distilled network, CFG at w is the network called once with guidance = w (no uncond pass)."""
    family = family_of(load_pipeline(flux_dir), "tiny-flux", resolution=16)
    den = family.denoiser(family.network)
    calls = []
    orig = den.call
    den.call = lambda *a, **k: calls.append(a[3].guidance.tolist()) or orig(*a, **k)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([300, 800])
    cond, uncond = family.prompt_cond([PROMPT, "a blue 2"])
    with torch.no_grad():
        guided = den(x, t, cond, "x0", guidance_scale=5.0, uncond=uncond)
        plain = den(x, t, cond, "x0")
    assert calls == [[5.0, 5.0], [3.5, 3.5]]  # one pass each: w as the input, else the pipeline's default
    assert not torch.allclose(guided, plain)


def test_lora_export_of_a_bf16_run_records_the_full_precision_base(sdxl_dir, captioned, tmp_path):
    """The fingerprint is the base as published (taken before the frozen weights are cast), so the correct base
    loads without a mismatch warning."""
    import warnings

    from stepdistill.pipelines.lora import BaseMismatchWarning, base_fingerprint, lora_base

    cfg = load_config("digits16_lcm_lora", _overrides(sdxl_dir, captioned, "method_args.lora_rank=2",
                                                      "train.teacher_dtype=bfloat16"))
    method = build_method(cfg)
    save_export(method, tmp_path / "lora")
    assert lora_base(tmp_path / "lora")["fingerprint"] == base_fingerprint(load_pipeline(sdxl_dir).unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseMismatchWarning)
        load_pipeline(str(tmp_path / "lora"))


# --- LCM / LCM-LoRA of the flow-matching transformers (SD3, Flux) ---------------------------------------------------
@pytest.mark.parametrize("family,lora", [("sd3", False), ("sd3", True), ("flux", False), ("flux", True)])
def test_lcm_of_flow_transformers_loads_in_their_stock_pipelines(family, lora, sd3_dir, flux_dir, captioned,
                                                                   tmp_path):
    """A short LCM (full) or LCM-LoRA run of SD3 / Flux; the export (a full pipeline, or a LoRA file plus scheduler
    for load_lora_weights on the stock base) run by the stock pipeline at the recorded sigmas in a process without
    stepdistill gives the student's one-step consistency function (the boundary scaling c_skip(999) ~ 3e-9 left
    out), within 1e-4."""
    teacher = sd3_dir if family == "sd3" else flux_dir
    recipe = "digits16_lcm_lora" if lora else "digits16_lcm"
    extra = ["method_args.lora_rank=2", "method_args.lora_alpha=4"] if lora else [
        "method_args.guidance_min=3", "method_args.guidance_max=3", "method_args.sample_timesteps=[]",
        "train.ema_decay=0"]
    cfg = load_config(recipe, _overrides(teacher, captioned, *extra))
    run = train(cfg, tmp_path / "run")
    export = run / "pipeline"
    sched = json.loads((export / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["stochastic_sampling"]
    assert sched["student_sigmas"] == [0.999] and sched["shift"] == 1.0
    assert "student_sigmas" in (export / "README.md").read_text()
    if not lora:  # what stepdistill sample/eval/bench pass for one step
        from stepdistill.pipelines import recorded_schedule

        assert recorded_schedule(load_pipeline(str(export)), 1) == {"sigmas": [0.999]}

    method = build_method(cfg)
    if lora:  # the trained adapters would be tiny after 2 steps: random ones tell a wrong load from a right one
        randomize_lora(method.student.model, 0.2)
        export = tmp_path / "lora"
        save_export(method, export)
    else:
        attr = method.family.network_attr
        net = type(method.student.model).from_pretrained(export, subfolder=attr)
        method.student.model.load_state_dict(net.state_dict())
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        ours = method.consistency_fn(method.student, z, torch.tensor([999]), torch.tensor([-1]), cond)
    cls = "StableDiffusion3Pipeline" if family == "sd3" else "FluxPipeline"
    where = {"path": teacher, "lora": str(export)} if lora else {"path": str(export)}
    stock = _stock_latent(tmp_path, z, cls=cls, when={"sigmas": [0.999]}, packed=family == "flux",
                          guidance=method.family.distilled_guidance_scale,
                          absent=["text_encoder_3", "tokenizer_3"] if family == "sd3" else [], **where)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)
    if lora:  # stepdistill's own loader: the base the export records, the adapters loaded by its family
        loaded = load_pipeline(str(export))
        fam = family_of(loaded, "loaded", resolution=16)
        t = torch.tensor([999])
        with torch.no_grad():
            torch.testing.assert_close(fam.denoiser(fam.network).raw(z, t, cond), method.student.raw(z, t, cond),
                                       atol=1e-5, rtol=1e-5)


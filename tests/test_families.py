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
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _tiny import randomize_lora, save_captioned
from _tiny_sd import build_tiny_flux, build_tiny_sd3, build_tiny_sdxl

from stepdistill.config import load_config
from stepdistill.errors import ConfigError
from stepdistill.families import SDXLFamily, family_of
from stepdistill.pipelines import load_pipeline
from stepdistill.trainers import get_method
from stepdistill.trainers.loop import train

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a red 1"
STOCK = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stepdistill":
            raise ImportError("stepdistill must not be needed to load an export")

sys.meta_path.insert(0, Block())
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
if args.get("packed"):  # Flux takes and returns latents packed into tokens
    z = pipe._pack_latents(z, *z.shape)
out = pipe([args["prompt"]], guidance_scale=args["guidance"], latents=z, height=16, width=16, output_type="latent",
           **args["when"]).images
if args.get("packed"):
    out = pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)
torch.save(out, args["out"])
"""


def _stock_latent(tmp_path: Path, z: torch.Tensor, **args) -> torch.Tensor:
    """The one-step latent of a stock diffusers pipeline, computed in a process without stepdistill."""
    torch.save(z, tmp_path / "z.pt")
    args.update(noise=str(tmp_path / "z.pt"), out=str(tmp_path / "out.pt"), prompt=PROMPT)
    res = subprocess.run([sys.executable, "-c", STOCK, json.dumps(args)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
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
    method = get_method("dmd2")(cfg)
    from diffusers import UNet2DConditionModel

    method.student.model.load_state_dict(UNet2DConditionModel.from_pretrained(export, subfolder="unet").state_dict())
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        ours = method.generate(cond, 1, steps=0, noise=z.clone())
    stock = _stock_latent(tmp_path, z, cls="StableDiffusionXLPipeline", path=str(export), when={"timesteps": [999]},
                          guidance=1.0)
    torch.testing.assert_close(stock, ours, atol=1e-4, rtol=1e-4)


def test_sdxl_dmd2_gan_term_on_vae_latents(sdxl_dir, captioned):
    method = get_method("dmd2")(load_config("digits16_dmd2", _overrides(sdxl_dir, captioned)))
    batch = {"image": torch.rand(2, 3, 16, 16) * 2 - 1, "prompt": ["a picture 0", "a picture 1"]}
    for phase in ("student", "fake_score"):
        loss, logs = method.loss(phase, batch, 0)
        loss.backward()
        assert torch.isfinite(loss)
    assert "gan_d_loss" in logs


def test_sdxl_lcm_full_student_with_guidance_embedding(sdxl_dir, captioned, tmp_path):
    cfg = load_config("digits16_lcm", _overrides(sdxl_dir, captioned, "method_args.guidance_min=2",
                                                 "method_args.guidance_max=6", "method_args.w_embedding_dim=8",
                                                 "method_args.sample_timesteps=[]", "train.ema_decay=0"))
    run = train(cfg, tmp_path / "run")
    export = run / "pipeline"
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(export, subfolder="unet")
    assert unet.config.time_cond_proj_dim == 8
    method = get_method("consistency")(cfg)
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
    method = get_method("consistency")(cfg)
    randomize_lora(method.student.model, 0.2)
    export = tmp_path / "lora"
    method.export(export)
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
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(str(tmp_path / "ddpm"))
    with pytest.raises(ConfigError, match="DDPMPipeline, which no supported family matches .*SDXL"):
        get_method("dmd2")(load_config("digits16_dmd2", [f"teacher={tmp_path / 'ddpm'}"]))


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
    method = get_method("dmd2")(cfg)
    net = type(method.student.model).from_pretrained(export, subfolder="transformer")
    method.student.model.load_state_dict(net.state_dict())
    z = _noise()
    with torch.no_grad():
        cond, _ = method.family.prompt_cond([PROMPT])
        return method, z, method.generate(cond, 1, steps=0, noise=z.clone())


def test_sd3_dmd2_trains_and_exports_a_stock_sd3_pipeline(sd3_dir, prompts, tmp_path):
    from stepdistill.families import SD3Family

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
        get_method("dmd2")(load_config("digits16_dmd2", _overrides(sd3_dir, prompts, *no_gan,
                                                                   "method_args.student_timesteps=[0]")))
    with pytest.raises(ConfigError, match="cannot be conditioned on the guidance scale"):
        get_method("consistency")(load_config("digits16_lcm", _overrides(sd3_dir, captioned,
                                                                          "method_args.guidance_min=1")))
    with pytest.raises(ConfigError, match="mid_block"):
        get_method("dmd2")(load_config("digits16_dmd2", _overrides(sd3_dir, captioned,
                                                                   "method_args.student_timesteps=[1000]")))


# --- memory: frozen parts in bf16, gradient checkpointing ----------------------------------------------------------
def test_teacher_dtype_bf16_keeps_trainable_weights_fp32(sdxl_dir, prompts, tmp_path):
    cfg = load_config("digits16_dmd2", _overrides(sdxl_dir, prompts, "method_args.gan_weight_student=0",
                                                  "method_args.gan_weight_critic=0",
                                                  "method_args.fake_score_lora_rank=2", "train.teacher_dtype=bfloat16",
                                                  "train.gradient_checkpointing=true"))
    method = get_method("dmd2")(cfg)
    teacher = method.teacher.model
    frozen = {p.dtype for p in teacher.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in teacher.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    assert {p.dtype for p in method.text_encoder_2.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in method.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in method.student.parameters()} == {torch.float32}
    # Both phases run and their losses are finite; the real score in bf16 is close to the fp32 teacher's.
    batch = {"prompt": ["a red 1", "a blue 2"]}
    for phase in ("student", "fake_score"):
        loss, _ = method.loss(phase, batch, 0)
        loss.backward()
        assert torch.isfinite(loss)
    ref = get_method("dmd2")(load_config("digits16_dmd2", _overrides(sdxl_dir, prompts,
                                                                     "method_args.gan_weight_student=0",
                                                                     "method_args.gan_weight_critic=0",
                                                                     "method_args.fake_score_lora_rank=2")))
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([300, 700])
    with torch.no_grad():
        cond, uncond = method.family.prompt_cond(batch["prompt"])
        low = method.real_score(x, t, cond, uncond)
        cond, uncond = ref.family.prompt_cond(batch["prompt"])
        high = ref.real_score(x, t, cond, uncond)
    assert low.dtype == torch.float32
    assert (low - high).abs().max() < 0.05 * high.abs().max() and not torch.equal(low, high)
    # Gradient checkpointing reaches every network with trainable weights (student; teacher network with adapters).
    from stepdistill.trainers.loop import _enable_gradient_checkpointing

    _enable_gradient_checkpointing(method)
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
    from stepdistill.families import FluxFamily

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
    den.call = lambda *a: calls.append(a[3].guidance.tolist()) or orig(*a)
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
    method = get_method("consistency")(cfg)
    method.export(tmp_path / "lora")
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

    method = get_method("consistency")(cfg)
    if lora:  # the trained adapters would be tiny after 2 steps: random ones tell a wrong load from a right one
        randomize_lora(method.student.model, 0.2)
        export = tmp_path / "lora"
        method.export(export)
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

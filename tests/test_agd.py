"""Adapter guidance distillation: the trajectory writer (resume after a kill, 2 processes), adapters that start at
the conditional model and never touch the base weights, a short run whose one-pass output moves towards CFG's, the
export round trip, adapters on a fine-tuned copy of the base, the tiny SD pipeline, and the bad inputs. Teachers are
built in code."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from _tiny import ROOT, export, loss, save_class_teacher
from _tiny_sd import build_tiny_flux, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl
from safetensors.torch import load_file

from stepdistill.cli import main as cli
from stepdistill.errors import ConfigError, DataError, UserError
from stepdistill.loop import build_method, train
from stepdistill.pipelines import AdapterGuidancePipeline, family_of, load_pipeline
from stepdistill.pipelines.guidance import GuidanceAdapters, load_guidance_adapter
from stepdistill.pipelines.trajectories import write_trajectories
from stepdistill.trainers import load_config
from stepdistill.trajectories import TrajectoryDataset, cond_from_tensors, shard_name

pytestmark = pytest.mark.usefixtures("one_thread")
TRAJ = dict(num_trajectories=6, steps=4, w_min=1.0, w_max=4.0, shard_size=2, batch_size=2, seed=3)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> str:
    return save_class_teacher(tmp_path_factory.mktemp("teacher") / "pipe", attention=True)


@pytest.fixture(scope="module")
def traj_dir(tmp_path_factory, teacher_dir) -> str:
    return str(write_trajectories(teacher_dir, tmp_path_factory.mktemp("traj") / "t", progress=False, **TRAJ))


def run_overrides(teacher: str, *extra: str) -> list[str]:
    """A short, quiet AGD run on ``teacher`` (no checkpoints, samples or tracker)."""
    return [f"teacher={teacher}", "data.batch_size=8", "train.tracker=none", "train.log_every=1",
            "train.checkpoint_every=0", "train.sample_every=0", *extra]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                       "")]))


def _writer_args(teacher: str, out) -> list[str]:
    return ["trajectories", "--teacher", teacher, "--out", str(out), "--num", "6", "--steps", "4", "--shard-size", "2",
            "--batch-size", "2", "--seed", "3"]


def _writer_cmd(teacher: str, out) -> list[str]:
    return [sys.executable, "-m", "stepdistill", *_writer_args(teacher, out)]


# Runs the CLI (argv[2:]) with a trajectory writer that is killed while it writes its argv[1]-th shard (0-based) of
# this process: half of the shard's temporary file is on disk when the process exits with 137 (as after SIGKILL).
DYING_WRITER_SCRIPT = """
import os
import sys
from pathlib import Path

from safetensors.torch import save

import stepdistill.pipelines.trajectories as writer
from stepdistill.cli import main

die_at, written, save_file = int(sys.argv[1]), [0], writer.save_file


def dying_save_file(tensors, filename, metadata=None):
    if written[0] == die_at:
        data = save(tensors, metadata=metadata)
        Path(filename).write_bytes(data[: len(data) // 2])
        os._exit(137)
    written[0] += 1
    return save_file(tensors, filename, metadata=metadata)


writer.save_file = dying_save_file
sys.exit(main(sys.argv[2:]))
"""


def _shards(folder) -> list[dict[str, torch.Tensor]]:
    return [load_file(os.path.join(folder, shard_name(k))) for k in range(3)]


def _same(a: list[dict], b: list[dict]) -> bool:
    """Shards with the same trajectories: identical conditions, w, t and order; states and targets equal up to float
    rounding (a fresh process may sum in another order than pytest's)."""
    def close(k: str, x: torch.Tensor, y: torch.Tensor) -> bool:
        return torch.allclose(x, y, atol=1e-4, rtol=1e-4) if k in ("x_t", "target") else torch.equal(x, y)

    return len(a) == len(b) and all(x.keys() == y.keys() and all(close(k, x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


# --- trajectories ---------------------------------------------------------------------------------------------------
def test_trajectories_follow_the_guided_sampler(teacher_dir, traj_dir):
    ds = TrajectoryDataset(traj_dir)
    assert len(ds) == 6 * 4
    teacher = load_pipeline(teacher_dir)
    fam = family_of(teacher, teacher_dir)
    den = fam.denoiser(fam.network)
    # Trajectory 1 (shard 0, second): each stored target is the teacher's CFG output at the stored state, and each
    # next state is the DDIM step from it.
    items = [ds[4 + j] for j in range(4)]
    assert len({float(it["w"]) for it in items}) == 1 and 1.0 <= float(items[0]["w"]) <= 4.0
    assert int(items[0]["cond.class_labels"]) == 1
    ts = [float(it["t"]) for it in items]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == 4
    for j, it in enumerate(items):
        cond = cond_from_tensors({k: v[None] for k, v in it.items()})
        x, t, w = it["x_t"][None], it["t"][None], it["w"][None]
        with torch.no_grad():
            cfg = den.raw(x, t, cond, guidance_scale=w, uncond=fam.classes.uncond(1))
            cond_only = den.raw(x, t, cond)
        torch.testing.assert_close(cfg, it["target"][None], atol=1e-5, rtol=1e-5)
        assert (cond_only - cfg).abs().max() > 1e-3  # the target really is guided
        if j < 3:
            with torch.no_grad():
                nxt = den.solver_step(x, t, items[j + 1]["t"][None], cond, guidance_scale=w,
                                      uncond=fam.classes.uncond(1))
            torch.testing.assert_close(nxt, items[j + 1]["x_t"][None], atol=1e-5, rtol=1e-5)


def test_writer_resumes_after_a_kill(teacher_dir, traj_dir, tmp_path):
    out, script = tmp_path / "t", tmp_path / "dying_writer.py"
    script.write_text(DYING_WRITER_SCRIPT)
    killed = subprocess.run([sys.executable, str(script), "1", *_writer_args(teacher_dir, out)], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-4000:]
    assert (out / shard_name(0)).is_file() and not (out / shard_name(1)).is_file()
    assert (out / f".{shard_name(1)}.tmp").is_file()  # killed while writing shard 1
    with pytest.raises(DataError, match=shard_name(1)):
        TrajectoryDataset(out)  # an unfinished folder names its first missing shard
    first = load_file(str(out / shard_name(0)))
    done = subprocess.run(_writer_cmd(teacher_dir, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "4 trajectories to write" in done.stderr  # the finished shard was kept, not redone
    assert torch.equal(load_file(str(out / shard_name(0)))["x_t"], first["x_t"])
    assert _same(_shards(out), _shards(traj_dir))  # nothing lost, nothing twice: as the uninterrupted run
    assert not list(out.glob(".*.tmp"))  # the half-written file gave way to the finished shard


def test_two_processes_write_their_own_shards(teacher_dir, traj_dir, tmp_path):
    out = tmp_path / "t"
    procs = [subprocess.Popen(_writer_cmd(teacher_dir, out), env={**_env(), "RANK": str(r), "WORLD_SIZE": "2"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert _same(_shards(out), _shards(traj_dir))


def test_bad_trajectory_folders(teacher_dir, traj_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(traj_dir, bad)
    other = write_trajectories(teacher_dir, tmp_path / "other", progress=False, **{**TRAJ, "seed": 4})
    shutil.copyfile(other / shard_name(2), bad / shard_name(2))
    with pytest.raises(DataError, match=f"{shard_name(2)} does not belong"):
        TrajectoryDataset(bad)
    # Other settings into an existing folder: refused, nothing replaced.
    before = (tmp_path / "other" / shard_name(0)).read_bytes()
    assert cli(["trajectories", "--teacher", teacher_dir, "--out", str(tmp_path / "other"), "--num", "6", "--steps",
                "5"]) == 2
    assert (tmp_path / "other" / shard_name(0)).read_bytes() == before


# --- adapters -------------------------------------------------------------------------------------------------------
def test_adapters_start_at_the_conditional_model_and_never_touch_the_base(teacher_dir):
    pipe = load_pipeline(teacher_dir)
    fam, net = family_of(pipe, teacher_dir), pipe.unet
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, t, labels = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900]), torch.tensor([1, 2, 3])
    base = net(x, t, class_labels=labels).sample
    for kind in ("attention", "additive"):
        adapters = GuidanceAdapters.for_network(fam, net, kind=kind, hidden=8, num_tokens=2)
        assert set(adapters.config.layers) == {"down_blocks.1.attentions.0", "up_blocks.0.attentions.0",
                                               "up_blocks.0.attentions.1", "mid_block.attentions.0"}
        adapters.attach(fam, net)
        with adapters.guidance(torch.tensor([1.0, 2.5, 4.0])):
            assert torch.equal(net(x, t, class_labels=labels).sample, base)  # zero-initialised outputs
            with torch.no_grad():
                for p in adapters.parameters():
                    p.normal_()
            assert (net(x, t, class_labels=labels).sample - base).abs().max() > 1e-2
        assert torch.equal(net(x, t, class_labels=labels).sample, base)  # guidance off: the base network
        assert set(net.state_dict()) == set(before)  # the adapters live outside the network's state dict
        adapters.detach()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_short_run_moves_one_pass_towards_cfg_and_round_trips(teacher_dir, traj_dir, tmp_path):
    overrides = run_overrides(teacher_dir, f"data.source={traj_dir}", "data.batch_size=8", "train.max_steps=60",
                              "optim.adapter.lr=0.003", "optim.adapter.warmup_steps=0", "method_args.hidden=16",
                              "optim.adapter.lr_schedule=constant")
    cfg = load_config("digits16_agd", overrides)
    method = build_method(cfg)
    ds = TrajectoryDataset(traj_dir)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ds[0]}
    base_before = {k: v.clone() for k, v in method.family.network.state_dict().items()}

    def mse(adapted: bool) -> float:
        cond = cond_from_tensors(batch)
        with torch.no_grad():
            if adapted:
                with method.adapters.guidance(batch["w"]):
                    pred = method.teacher.raw(batch["x_t"], batch["t"], cond)
            else:
                pred = method.teacher.raw(batch["x_t"], batch["t"], cond)
        return float(((pred - batch["target"]) ** 2).mean())

    start = mse(True)
    assert start == pytest.approx(mse(False))  # zero init: the conditional model's error
    opt = torch.optim.Adam(method.adapters.parameters(), lr=1e-2)
    for step in range(60):
        idx = torch.randint(0, len(ds), (8,), generator=torch.Generator().manual_seed(step))
        value, _ = loss(method, "adapter", {k: v[idx] for k, v in batch.items()}, step)
        opt.zero_grad()
        value.backward()
        opt.step()
    # On this random tiny teacher the gap closes slowly (about 0.74x after 60 steps, 0.66x after 120); an adapter
    # that got no gradient, or the wrong target, stays at 1.0x.
    assert mse(True) < 0.85 * start, (start, mse(True))
    assert all(torch.equal(v, base_before[k]) for k, v in method.family.network.state_dict().items())

    # The loop's own run, then the export: loaded back it samples exactly as the in-memory adapters do, with one
    # network call per step at guidance_scale = w.
    run = tmp_path / "run"
    train(load_config("digits16_agd", [*overrides, "train.max_steps=20"]), run)
    exported = load_pipeline(str(run / "pipeline"))
    assert isinstance(exported, AdapterGuidancePipeline)
    calls = []
    exported.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    images = exported([0, 1, 2, 3], num_inference_steps=5, guidance_scale=3.0, generator=gens, output_type="pt").images
    assert calls == [4] * 5
    again = GuidanceAdapters.load(run / "pipeline")
    ref = load_pipeline(teacher_dir)
    guided = AdapterGuidancePipeline(ref, again)
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    torch.testing.assert_close(guided([0, 1, 2, 3], num_inference_steps=5, guidance_scale=3.0, generator=gens,
                                      output_type="pt").images, images)
    # The export holds the adapters as the run trained them (its final checkpoint's).
    trained = load_file(run / "checkpoints" / "step-20" / "model.safetensors")
    state = again.state_dict()
    assert {f"adapters.{k}" for k in state} == {k for k in trained if k.startswith("adapters.")}
    assert all(torch.equal(v, trained[f"adapters.{k}"]) for k, v in state.items())
    # Their correction is exactly zero at init: fresh adapters give the plain one-pass sampler's images.
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    plain = ref([0, 1, 2, 3], num_inference_steps=5, guidance_scale=1.0, generator=gens, output_type="pt").images
    fresh = AdapterGuidancePipeline(load_pipeline(teacher_dir), GuidanceAdapters(again.config))
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert torch.equal(fresh([0, 1, 2, 3], num_inference_steps=5, guidance_scale=3.0, generator=gens,
                             output_type="pt").images, plain)
    # Trained, the exported adapters' one pass at each state's w moves towards the recorded CFG output: measured
    # 0.895x the conditional pass's MSE after these 20 steps (0.973x after 3, 0.868x after 30); untrained, 1.0x.
    fam = family_of(exported.base_pipeline)
    den, cond = fam.denoiser(fam.network), cond_from_tensors(batch)
    with torch.no_grad():
        one_pass = den.raw(batch["x_t"], batch["t"], cond)
        with exported.adapters.guidance(batch["w"]):
            adapted = den.raw(batch["x_t"], batch["t"], cond)
    gap, closed = (float(((p - batch["target"]) ** 2).mean()) for p in (one_pass, adapted))
    assert closed < 0.95 * gap, (closed, gap)
    # Outside the trained range: one warning, then it samples.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported([0], num_inference_steps=2, guidance_scale=6.0)
        exported([0], num_inference_steps=2, guidance_scale=7.0)
    assert len([w for w in caught if "outside the range" in str(w.message)]) == 1


def test_adapters_load_onto_a_fine_tuned_copy_not_another_architecture(teacher_dir, traj_dir, tmp_path):
    cfg = load_config("digits16_agd", run_overrides(teacher_dir, f"data.source={traj_dir}", "method_args.hidden=8"))
    method = build_method(cfg)
    with torch.no_grad():
        for p in method.adapters.parameters():
            p.normal_(0, 0.1)
    export(method, tmp_path / "agd")
    # A fine-tuned copy: the teacher's weights perturbed (as a LoRA-merged teacher or a distilled student would be).
    tuned = load_pipeline(teacher_dir)
    with torch.no_grad():
        for p in tuned.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    guided = load_guidance_adapter(tuned, tmp_path / "agd")
    out = guided([5, 6], num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()
    other = load_pipeline(save_class_teacher(tmp_path / "wide", channels=(8, 24), attention=True))
    with pytest.raises(UserError, match="same base architecture"):
        load_guidance_adapter(other, tmp_path / "agd")


def test_run_refuses_trajectories_of_another_teacher(teacher_dir, traj_dir, tmp_path):
    other = save_class_teacher(tmp_path / "other", attention=True)
    with torch.no_grad():  # same architecture, other weights
        pipe = load_pipeline(other)
        pipe.unet.conv_in.weight.add_(1.0)
        pipe.save_pretrained(other)
    with pytest.raises(ConfigError, match="sampled from teacher"):
        build_method(load_config("digits16_agd", run_overrides(other, f"data.source={traj_dir}")))
    with pytest.raises(ConfigError, match="not a trajectory folder"):
        build_method(load_config("digits16_agd", run_overrides(teacher_dir, "data.source=digits16")))
    out = tmp_path / "run"
    assert cli(["train", "agd", "--config", "digits16_agd", "--out", str(out),
                *run_overrides(other, f"data.source={traj_dir}")]) == 2
    assert not out.exists()


def test_tiny_sd_trajectories_train_and_load_in_diffusers(tmp_path):
    from diffusers import DiffusionPipeline

    sd = build_tiny_sd(tmp_path / "sd")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\na blue circle\n")
    traj = write_trajectories(sd, tmp_path / "traj", 2, steps=2, shard_size=2, batch_size=2, prompts_file=str(prompts),
                              progress=False)
    ds = TrajectoryDataset(traj)
    assert ds[0]["cond.encoder_hidden_states"].ndim == 2
    run = tmp_path / "run"
    train(load_config("sd15_agd", [*run_overrides(sd, f"data.source={traj}", "data.batch_size=2",
                                                  "train.max_steps=2", "data.resolution=16",
                                                  "method_args.default_guidance=3.0")]), run)
    adapters = GuidanceAdapters.load(run / "pipeline")
    assert all(name.endswith("attn2") for name in adapters.config.layers)  # cross-attention only
    assert all(ctx > 0 for _, ctx in adapters.config.layers.values())
    # Stock diffusers loads the folder (the base); the adapters go on through load_guidance_adapter.
    stock = DiffusionPipeline.from_pretrained(str(run / "pipeline"))
    guided = load_guidance_adapter(stock, run / "pipeline")
    calls = []
    stock.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    img = guided(["a red square"], num_inference_steps=2, guidance_scale=3.0, height=16, width=16,
                 output_type="np").images
    assert img.shape == (1, 16, 16, 3) and calls == [1, 1]


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_adapters_on_every_family(family, tmp_path):
    """Cross-attention (SDXL), joint attention (SD3, Flux dual and single blocks): zero init, then a change."""
    build = {"sdxl": build_tiny_sdxl, "sd3": build_tiny_sd3,
             "flux": lambda p: build_tiny_flux(p, guidance_embeds=False)}[family]
    path = build(tmp_path / family)
    fam = family_of(load_pipeline(path), path, resolution=16)
    net = fam.network
    cond, _ = fam.prompt_cond(["a cat", "a dog"])
    x, t = torch.randn(fam.noise_shape(2, 16)), torch.tensor([500.0, 200.0])
    base = fam.call(net, x, t, cond)
    for kind in ("attention", "additive"):
        adapters = GuidanceAdapters.for_network(fam, net, kind=kind, hidden=8,
                                                timestep_scale=fam.network_timestep_scale)
        assert adapters.config.layers and all(out > 0 for out, _ in adapters.config.layers.values())
        adapters.attach(fam, net)
        with adapters.guidance(torch.tensor([2.0, 3.0])):
            assert torch.equal(fam.call(net, x, t, cond), base)
            with torch.no_grad():
                for p in adapters.parameters():
                    p.normal_()
            assert (fam.call(net, x, t, cond) - base).abs().max() > 1e-3
        adapters.detach()
    assert torch.equal(fam.call(net, x, t, cond), base)


def test_flow_teacher_trajectories_and_guidance_distilled_refusal(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square\n")
    sd3 = build_tiny_sd3(tmp_path / "sd3")
    traj = write_trajectories(sd3, tmp_path / "traj", 1, steps=3, prompts_file=str(prompts), resolution=16,
                              progress=False)
    ds = TrajectoryDataset(traj)
    ts = [float(ds[j]["t"]) for j in range(3)]
    assert ts[0] == pytest.approx(1000.0) and ts == sorted(ts, reverse=True)  # sigma * 1000, from pure noise
    flux_dev = build_tiny_flux(tmp_path / "flux", guidance_embeds=True)
    with pytest.raises(UserError, match="guidance-distilled"):
        write_trajectories(flux_dev, tmp_path / "t2", 1, prompts_file=str(prompts), progress=False)
    assert not (tmp_path / "t2").exists()

"""The class-conditional pipeline round trip, sampling independent of batch size, and CLI one-line errors."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from stepdistill.cli import main
from stepdistill.eval.generation import generate, load_samples, save_samples
from stepdistill.pipelines import ClassConditionalPipeline, load_pipeline


def tiny_pipeline():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=4)
    sched = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False,
                          timestep_spacing="trailing")
    pipe = ClassConditionalPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "p"
    tiny_pipeline().save_pretrained(str(path))
    return path


def test_round_trip_gives_identical_samples(saved_pipeline):
    pipe = tiny_pipeline()
    loaded = load_pipeline(str(saved_pipeline))
    assert isinstance(loaded, ClassConditionalPipeline)
    assert loaded.num_classes == 3 and loaded.null_class == 3
    g = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    a = pipe([0, 1, 2], num_inference_steps=3, guidance_scale=2.0, generator=g(), output_type="np").images
    b = loaded([0, 1, 2], num_inference_steps=3, guidance_scale=2.0, generator=g(), output_type="np").images
    np.testing.assert_array_equal(a, b)
    assert a.shape == (3, 8, 8, 1) and 0 <= a.min() and a.max() <= 1


def test_guidance_and_labels_change_the_output(saved_pipeline):
    pipe = load_pipeline(str(saved_pipeline))
    g = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    base = pipe([1], num_inference_steps=2, generator=g(), output_type="pt").images
    assert not torch.equal(base, pipe([2], num_inference_steps=2, generator=g(), output_type="pt").images)
    assert not torch.equal(base, pipe([1], num_inference_steps=2, guidance_scale=4.0, generator=g(),
                                      output_type="pt").images)
    with pytest.raises(ValueError, match="class labels must be in"):
        pipe([3], num_inference_steps=1)


def _dpm_solver_2m_by_hand(unet, x_T: torch.Tensor, labels: list[int], steps: int) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2: data prediction, midpoint multistep update)
    written from the paper in float64. The first step has no previous prediction and the last one ends at sigma = 0
    (h infinite, where the correction is undefined): both are first order, so the last step returns x0 itself.

    Schedule from its definition, not from diffusers: Nichol & Dhariwal's cosine alpha-bar with betas capped at
    0.999 ("squaredcos_cap_v2"), "trailing" timesteps round(1000 - i * 1000 / steps) - 1, v-prediction
    x0 = alpha_t x - sigma_t v. Only the UNet is shared with the pipeline."""
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    alpha_bar = np.cumprod([1 - min(1 - f((i + 1) / 1000) / f(i / 1000), 0.999) for i in range(1000)])
    ts = [round(1000 - i * 1000 / steps) - 1 for i in range(steps)]
    alpha = lambda t: math.sqrt(alpha_bar[t]) if t >= 0 else 1.0  # t = -1: the clean end, sigma 0
    sigma = lambda t: math.sqrt(1 - alpha_bar[t]) if t >= 0 else 0.0
    lam = lambda t: math.log(alpha(t) / sigma(t))  # half log-SNR
    x, prev_x0, cls = x_T.double(), None, torch.tensor(labels)
    for i, t in enumerate(ts):
        with torch.no_grad():
            v = unet(x.float(), t, class_labels=cls).sample.double()
        x0 = alpha(t) * x - sigma(t) * v
        s = ts[i + 1] if i + 1 < steps else -1
        if s < 0:
            x = x0
        else:
            h = lam(s) - lam(t)
            # D = x0 + (x0 - x0_prev) / (2 r), r = h_prev / h: the midpoint correction from the previous prediction
            d = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * h / (2 * (lam(t) - lam(ts[i - 1])))
            x = sigma(s) / sigma(t) * x + alpha(s) * (1 - math.exp(-h)) * d
        prev_x0 = x0
    return x


@pytest.mark.usefixtures("one_thread")
def test_other_scheduler_matches_dpm_solver_by_hand(saved_pipeline):
    from diffusers import DPMSolverMultistepScheduler

    pipe = load_pipeline(str(saved_pipeline))
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    x_T = torch.randn((3, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    out = pipe([0, 1, 2], num_inference_steps=4, latents=x_T, output_type="pt").images
    # Expected value from the paper's update and the schedule's formula (see the helper), not from diffusers.
    expected = _dpm_solver_2m_by_hand(pipe.unet, x_T, [0, 1, 2], steps=4)
    assert (expected.abs() < 1).float().mean() > 0.5  # most pixels are inside the output clamp: a real comparison
    torch.testing.assert_close(out, expected.clamp(-1, 1).float(), rtol=0, atol=1e-5)  # seen: 5e-7
    # The second-order corrections matter: DDIM (= first-order DPM-Solver++) at 4 steps is ~0.1 away.
    ddim = load_pipeline(str(saved_pipeline))([0, 1, 2], num_inference_steps=4, latents=x_T, output_type="pt").images
    assert (ddim - out).abs().max() > 0.01


def test_generate_does_not_depend_on_batch_size(saved_pipeline, tmp_path):
    pipe = load_pipeline(str(saved_pipeline))
    a = generate(pipe, 5, steps=2, guidance=2.0, seed=3, batch_size=2, progress=False)
    b = generate(pipe, 5, steps=2, guidance=2.0, seed=3, batch_size=5, progress=False)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["images"].dtype == np.uint8 and a["images"].shape == (5, 8, 8, 1)
    assert a["labels"].tolist() == [0, 1, 2, 0, 1]
    save_samples(tmp_path / "s.npz", a, steps=2)
    back = load_samples(tmp_path / "s.npz")
    np.testing.assert_array_equal(back["images"], a["images"])
    assert back["labels"].tolist() == [0, 1, 2, 0, 1]


def test_cli_sample_writes_npz_and_grid(saved_pipeline, tmp_path):
    out = tmp_path / "s"
    assert main(["sample", str(saved_pipeline), "--steps", "2", "--num-samples", "6", "--guidance", "2",
                 "--out", str(out)]) == 0
    z = load_samples(out / "samples.npz")
    assert z["images"].shape == (6, 8, 8, 1) and (out / "grid.png").is_file()
    # an existing output folder is never overwritten without --overwrite
    before = (out / "samples.npz").read_bytes()
    assert main(["sample", str(saved_pipeline), "--steps", "1", "--num-samples", "2", "--out", str(out)]) == 2
    assert (out / "samples.npz").read_bytes() == before


def test_cli_explicit_timesteps(saved_pipeline, tmp_path):
    # LCMScheduler's own 4-step schedule on its 50-point grid (19, 39, ..., 999) is 999, 759, 499, 259 (diffusers
    # takes grid indices floor(linspace(0, 50, 4, endpoint=False)) from the top), so passing those explicitly must
    # give the same images; other grid points give other images.
    def sample(name, *extra):
        assert main(["sample", str(saved_pipeline), "--scheduler", "LCMScheduler", "--num-samples", "4",
                     "--out", str(tmp_path / name), *extra]) == 0
        return load_samples(tmp_path / name / "samples.npz")["images"]

    by_steps = sample("steps", "--steps", "4")
    explicit = sample("explicit", "--timesteps", "999,759,499,259")
    other = sample("other", "--timesteps", "999,499,199,19")
    np.testing.assert_array_equal(by_steps, explicit)
    assert np.abs(other.astype(int) - by_steps.astype(int)).mean() > 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "stepdistill", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,match", [
    (["sample", "/nonexistent/pipe", "--steps", "1", "--out", "{tmp}/o"], "does not exist"),
    (["train", "nosuchmethod", "--config", "x.yaml", "--out", "{tmp}/o"], "unknown method 'nosuchmethod'"),
    (["train", "teacher", "--config", "{tmp}/missing.yaml", "--out", "{tmp}/o"], "config file"),
    (["eval", "{tmp}/missing.npz", "--out", "{tmp}/o"], "does not exist"),
    (["eval", "digits16", "--metrics", "fid,bogus", "--out", "{tmp}/o"], "unknown metric"),
    (["sample", "digits16", "--out", "{tmp}/o"], "needs --steps N"),
    (["sample", "digits16", "--timesteps", "999,500", "--out", "{tmp}/o"], "does not accept explicit timesteps"),
    (["sample", "digits16", "--scheduler", "LCMScheduler", "--timesteps", "279,999", "--out", "{tmp}/o"],
     "distinct and descending"),
    (["sample", "digits16", "--scheduler", "LCMScheduler", "--timesteps", "999,5OO", "--out", "{tmp}/o"],
     "comma list of integers"),
    (["eval", "digits16", "--steps", "3", "--timesteps", "999,759,519,279", "--out", "{tmp}/o"], "disagrees"),
])
def test_cli_user_errors_are_one_line_exit_2(tmp_path, args, match):
    res = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.returncode == 2, res.stderr
    # diffusers' "Loading pipeline components" progress bar may precede the error; nothing else may
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip() and "Loading pipeline components" not in ln]
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_config_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: teacher\ntrain:\n  max_steps: 2\n")
    for override, match in (["train.bogus=1", "unknown config key 'train.bogus'"],
                            ["train.max_steps=lots", "'train.max_steps' expects an integer"]):
        res = run_cli("train", "teacher", "--config", str(cfg), "--out", str(tmp_path / "o"), override)
        assert res.returncode == 2 and match in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_cli_help():
    for sub in ("train", "sample", "eval", "bench"):
        res = run_cli(sub, "--help")
        assert res.returncode == 0 and "usage" in res.stdout


def test_cli_eval_on_samples_file(tmp_path):
    """eval on a samples.npz: real digits score high accuracy and a small domain FD; shuffled labels do not."""
    import json

    from stepdistill.data import load_digits16
    from stepdistill.images import to_uint8

    x, y = load_digits16()
    res = {"images": to_uint8(x[:300]), "labels": y[:300].numpy()}
    save_samples(tmp_path / "real.npz", res)
    assert main(["eval", str(tmp_path / "real.npz"), "--metrics", "fd_digits,accuracy", "--out",
                 str(tmp_path / "e1")]) == 0
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["num_samples"] == 300 and m["accuracy"] > 0.95 and m["fd_digits"] < 10
    assert "preprocessing" in m and (tmp_path / "e1" / "grid.png").is_file()
    res["labels"] = np.roll(res["labels"], 1)
    save_samples(tmp_path / "wrong.npz", res)
    assert main(["eval", str(tmp_path / "wrong.npz"), "--metrics", "accuracy", "--out", str(tmp_path / "e2")]) == 0
    assert json.loads((tmp_path / "e2" / "metrics.json").read_text())["accuracy"] < 0.2


def test_cli_eval_degrain(tmp_path, capsys):
    """--degrain removes grain added to real digits (and nothing else); non-digits16 samples are refused unwritten."""
    import json

    from stepdistill.data import load_digits16
    from stepdistill.images import to_uint8

    x, y = load_digits16()
    noisy = x[:200] + 0.1 * torch.randn(x[:200].shape, generator=torch.Generator().manual_seed(0))
    save_samples(tmp_path / "noisy.npz", {"images": to_uint8(noisy), "labels": y[:200].numpy()})
    args = ["eval", str(tmp_path / "noisy.npz"), "--metrics", "grain,fd_digits"]
    assert main(args + ["--out", str(tmp_path / "raw")]) == 0
    assert main(args + ["--degrain", "--out", str(tmp_path / "clean")]) == 0
    raw = json.loads((tmp_path / "raw" / "metrics.json").read_text())
    clean = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    # (what is left is the uint8 rounding and the clipping at -1 of the projected noise in the black background)
    assert raw["grain"] > 0.04 and clean["grain"] < 0.1 * raw["grain"] and clean["degrain"] is True
    real = to_uint8(x[:200])
    # projecting onto a subspace that holds the clean digits (then clipping into their range) brings samples closer:
    # a quarter of white noise's energy lies in the 64-dim subspace, so the distance shrinks to about half
    from stepdistill.eval.grain import degrain

    noisy_u8 = to_uint8(noisy).astype(float)
    assert np.linalg.norm(degrain(to_uint8(noisy)) - real.astype(float)) < 0.6 * np.linalg.norm(noisy_u8 - real)
    # the projection keeps what is on the subspace: degraining real digits changes pixels by at most one level
    assert np.abs(degrain(real).astype(int) - real.astype(int)).max() <= 1
    save_samples(tmp_path / "big.npz", {"images": np.zeros((4, 32, 32, 3), np.uint8), "labels": np.zeros(4, int)})
    assert main(["eval", str(tmp_path / "big.npz"), "--metrics", "fid", "--degrain", "--out",
                 str(tmp_path / "e3")]) == 2
    assert "16x16" in capsys.readouterr().err and not (tmp_path / "e3").exists()
    tiny_pipeline().save_pretrained(str(tmp_path / "p8"))  # an 8x8 pipeline: refused before sampling or writing
    assert main(["eval", str(tmp_path / "p8"), "--steps", "1", "--metrics", "fid", "--degrain", "--num-samples", "4",
                 "--out", str(tmp_path / "e4")]) == 2
    assert "16x16" in capsys.readouterr().err and not (tmp_path / "e4").exists()


def test_cli_average_snapshots(tmp_path, capsys):
    """`stepdistill average`: the network is the element-wise mean, everything else comes from the last pipeline."""
    paths = []
    for i, shift in enumerate((0.0, 0.3, 0.9)):
        pipe = tiny_pipeline()
        with torch.no_grad():
            for p in pipe.unet.parameters():
                p.add_(shift)
        pipe.save_pretrained(str(tmp_path / f"s{i}"))
        paths.append(tmp_path / f"s{i}")
    # A key diffusers' scheduler would drop on a re-save (like a student's recorded schedules) must survive.
    cfg_file = paths[-1] / "scheduler" / "scheduler_config.json"
    cfg_file.write_text(cfg_file.read_text().replace("{", '{\n  "sample_timesteps": [[999, 499]],', 1))
    assert main(["average", *map(str, paths), "--out", str(tmp_path / "avg")]) == 0
    avg = load_pipeline(str(tmp_path / "avg")).unet.state_dict()
    nets = [load_pipeline(str(p)).unet.state_dict() for p in paths]
    for k, v in avg.items():
        torch.testing.assert_close(v, (nets[0][k] + nets[1][k] + nets[2][k]) / 3)
    assert not torch.equal(avg["conv_in.weight"], nets[2]["conv_in.weight"])
    assert '"sample_timesteps": [[999, 499]]' in (tmp_path / "avg" / "scheduler" / "scheduler_config.json").read_text()
    assert "stepdistill average" in (tmp_path / "avg" / "README.md").read_text()
    # Bad input: one line, exit 2, nothing written or lost.
    other = tmp_path / "other"
    ClassConditionalPipeline(unet=UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                              layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4,
                                              num_class_embeds=4),
                             scheduler=DDIMScheduler()).save_pretrained(str(other))
    for args, match in (([str(paths[0]), str(other)], "another network"), ([str(paths[0])], "at least two"),
                        ([str(paths[0]), str(tmp_path / "missing")], "does not exist"),
                        ([str(paths[0]), "runs/missing"], "pipeline folder 'runs/missing' does not exist")):
        capsys.readouterr()
        assert main(["average", *args, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.strip().splitlines() if ln.strip() and "Loading pipeline" not in ln]
        assert len(lines) == 1 and match in lines[0], err
        assert not (tmp_path / "bad").exists()
    for out in (paths[1], tmp_path, paths[1] / "avg"):  # never a source, above one (emptied first) or inside one
        assert main(["average", str(paths[0]), str(paths[1]), "--out", str(out), "--overwrite"]) == 2
        assert "one of the pipelines to average" in capsys.readouterr().err
        assert (paths[1] / "model_index.json").is_file() and not (paths[1] / "avg").exists()
    assert main(["average", str(paths[0]), str(paths[1]), "--out", str(tmp_path / "avg")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_export_loads_in_stock_diffusers_without_stepdistill(saved_pipeline, tmp_path):
    """The saved folder ships its pipeline code (pipeline.py): stock diffusers loads it with custom_pipeline in a
    process where stepdistill cannot be imported, and samples the same images."""
    assert (saved_pipeline / "pipeline.py").is_file()
    script = tmp_path / "load.py"
    out = tmp_path / "images.npy"
    script.write_text(f"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "stepdistill":
            raise ImportError("stepdistill is not installed here")

sys.meta_path.insert(0, Block())
import numpy as np, torch
from diffusers import DiffusionPipeline

path = {str(saved_pipeline)!r}
pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=path, trust_remote_code=True)
assert type(pipe).__name__ == "ClassConditionalPipeline" and "stepdistill" not in type(pipe).__module__
pipe.set_progress_bar_config(disable=True)
g = [torch.Generator().manual_seed(i) for i in range(3)]
np.save({str(out)!r}, pipe([0, 1, 2], num_inference_steps=3, guidance_scale=2.0, generator=g, output_type="np").images)
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    ours = load_pipeline(str(saved_pipeline))([0, 1, 2], num_inference_steps=3, guidance_scale=2.0, generator=g,
                                              output_type="np").images
    np.testing.assert_array_equal(np.load(out), ours)

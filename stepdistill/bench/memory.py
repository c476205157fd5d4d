"""``stepdistill bench memory``: peak memory of one DMD2 and one LCM training step with the frozen parts (teacher
network, VAE, text encoder) in float32 vs bfloat16 (``train.teacher_dtype``), side by side in one run.

The teacher is a small Stable-Diffusion-type pipeline built in code (random weights, ~90 MB of UNet in float32),
saved once to a temporary folder. Each configuration runs in a fresh process, so the numbers do not share an
allocator: on a GPU the peak of ``torch.cuda.max_memory_allocated`` during the step, on the CPU the growth of the
process's peak resident memory (``ru_maxrss``) from just after the imports to the end of the step. Both include the
trainable copies, their gradients and AdamW states, which teacher_dtype does not touch, so the ratio shows what the
option saves on a whole step, not on the frozen parts alone.

A second table sets the score-distillation methods side by side, on the small SD pipeline and on the shipped
digits16 teacher: DMD2 with a full fake score, DMD2 with a LoRA fake score and VSD (LoRA fake score of the same
rank), each with its trainable parameters and AdamW state counted after the step, and its peak.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

from stepdistill.files import prepare_out_dir
from stepdistill.loop import build_method
from stepdistill.trainers import load_config

NO_GAN = ["method_args.gan_weight_student=0", "method_args.gan_weight_critic=0"]
CONFIGS = [("dmd2", "digits16_dmd2", NO_GAN),
           ("lcm", "digits16_lcm", ["method_args.sample_timesteps=[]", "method_args.w_embedding_dim=0"])]
DTYPES = ("float32", "bfloat16")
# (label, method, recipe, overrides given the LoRA rank) of the score-distillation table; the LoRA rank is the VSD
# reference's 64 on the small SD pipeline and the digits16 recipe's 8 on the digits16 teacher.
SCORE_CONFIGS = [
    ("dmd2, full fake score", "dmd2", "digits16_dmd2", lambda r: [*NO_GAN, "method_args.fake_score_lora_rank=0"]),
    ("dmd2, LoRA fake score", "dmd2", "digits16_dmd2",
     lambda r: [*NO_GAN, f"method_args.fake_score_lora_rank={r}", f"method_args.fake_score_lora_alpha={r}"]),
    ("vsd (LoRA fake score)", "vsd", "digits16_vsd",
     lambda r: [f"method_args.fake_score_lora_rank={r}", f"method_args.fake_score_lora_alpha={r}"]),
]


def build_small_sd(out: Path) -> str:
    """A small SD-type pipeline (64x64 images, 8x8x4 latents): a UNet with 320/640 channels and cross attention, a
    4-layer CLIP text encoder over a word-level vocabulary of 18 tokens, a 4-level VAE; random weights, seeded."""
    torch.manual_seed(0)
    words = ["<|startoftext|>", "<|endoftext|>", "a", "red", "blue", "cat", "dog", "picture", *"0123456789"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=32)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=256, intermediate_size=1024,
                                       num_attention_heads=4, num_hidden_layers=4, max_position_embeddings=32,
                                       bos_token_id=0, eos_token_id=1)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(320, 640),
                                layers_per_block=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
                                attention_head_dim=8).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                        latent_channels=4, sample_size=64)
    sched = DDIMScheduler(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tokenizer, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def one_step(method: str, recipe: str, overrides: list[str], teacher: str, dtype: str, data: str) -> dict:
    """Build the method and run one update of every phase; return the memory it took, the trainable parameters
    and the AdamW state (MiB)."""
    name = {"lcm": "consistency"}.get(method, method)
    digits = teacher == "digits16"
    size = 16 if digits else 64
    cfg = load_config(recipe, [f"teacher={teacher}", f"train.teacher_dtype={dtype}", f"data.resolution={size}",
                               "data.batch_size=4", f"data.source={data}", *overrides], method=name)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    base = torch.cuda.memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    m = build_method(cfg).to(device)
    for module in m.family.frozen_modules().values():
        module.to(device)
    if digits:
        raw = {"image": torch.rand(4, 1, 16, 16, device=device) * 2 - 1, "label": torch.tensor([0, 3, 5, 9])}
    else:
        raw = {"image": torch.rand(4, 3, 64, 64, device=device) * 2 - 1,
               "prompt": ["a red 1", "a blue 2", "a cat", "a dog"]}
    trainable, state = 0, 0
    for phase in m.phases():
        opt = torch.optim.AdamW(phase.params, lr=1e-6)
        loss, _ = m.loss(phase.name, m.family.batch(raw, phase.cond, phase.real, device), 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        trainable += sum(p.numel() * p.element_size() for p in phase.params)
        state += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                     if torch.is_tensor(t) and t.ndim > 0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "teacher_dtype": dtype, "peak_mib": (peak - base) / 2**20, "device": device.type,
            "trainable_mib": trainable / 2**20, "optimizer_mib": state / 2**20}


def _run(args: list) -> dict:
    res = subprocess.run([sys.executable, "-m", "stepdistill.bench.memory", json.dumps(args)],
                         capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"memory bench {args[0]} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _data_folder(root: Path) -> str:
    folder = root / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a picture {i}")
    return str(folder)


def run_memory_bench(out: str | Path, overwrite: bool = False) -> list[dict]:
    """Every (method, teacher_dtype) in a fresh process; writes OUT/memory.md and memory.json, prints the table."""
    out = prepare_out_dir(out, overwrite)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        teacher = build_small_sd(Path(tmp) / "small_sd")
        data = _data_folder(Path(tmp))
        for method, recipe, overrides in CONFIGS:
            for dtype in DTYPES:
                rows.append(_run([method, recipe, overrides, teacher, dtype, data]))
        score = []
        for where, path, src, rank in (("small SD", teacher, data, 64), ("digits16", "digits16", "digits16", 8)):
            for label, method, recipe, overrides in SCORE_CONFIGS:
                score.append({"teacher": where, "label": label,
                              **_run([method, recipe, overrides(rank), path, "float32", src])})
    lines = ["| method | frozen parts | peak MiB of one step | vs float32 |", "|---|---|---|---|"]
    for r in rows:
        ref = next(x for x in rows if x["method"] == r["method"] and x["teacher_dtype"] == "float32")
        lines.append(f"| {r['method']} | {r['teacher_dtype']} | {r['peak_mib']:.0f} | "
                     f"{r['peak_mib'] / ref['peak_mib']:.2f}x |")
    table2 = ["| teacher | method | trainable MiB | AdamW state MiB | trainable + state vs DMD2 full | peak MiB | "
              "peak vs DMD2 full |", "|---|---|---|---|---|---|---|"]
    for r in score:
        ref = next(x for x in score if x["teacher"] == r["teacher"] and x["label"].startswith("dmd2, full"))
        held, ref_held = r["trainable_mib"] + r["optimizer_mib"], ref["trainable_mib"] + ref["optimizer_mib"]
        # On the CPU the peak is the growth of the process's peak RSS, which is 0 when the step stays below what
        # the imports already took (the small digits16 network): no ratio then.
        peak_ratio = f"{r['peak_mib'] / ref['peak_mib']:.2f}x" if ref["peak_mib"] > 0 else "-"
        table2.append(f"| {r['teacher']} | {r['label']} | {r['trainable_mib']:.1f} | {r['optimizer_mib']:.1f} | "
                      f"{held / ref_held:.2f}x | {r['peak_mib']:.0f} | {peak_ratio} |")
    text = ("One training step (every phase: loss, backward, AdamW update) on a small SD-type pipeline built in "
            f"code, batch 4 at 64 px, device {rows[0]['device']}; each row in a fresh process.\n\n"
            + "\n".join(lines) + "\n\nScore distillation side by side (float32 frozen parts; the small SD pipeline "
            "at 64 px with LoRA rank 64, the digits16 teacher at 16 px with LoRA rank 8; batch 4; no GAN head):\n\n"
            + "\n".join(table2) + "\n")
    rows += score
    (out / "memory.md").write_text(text)
    (out / "memory.json").write_text(json.dumps(rows, indent=2))
    print(text)
    return rows


if __name__ == "__main__":
    print(json.dumps(one_step(*json.loads(sys.argv[1]))))

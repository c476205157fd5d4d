"""Text conditioning of the SD family (tiny pipeline built in code): the pipeline's own encode_prompt, the bounded
CPU cache of per-prompt embeddings, and the Denoiser's CFG on a text UNet."""

import pytest
import torch
from _tiny_sd import build_tiny_sd

from stepdistill.conditioning import Cond, PromptCache
from stepdistill.denoiser import Denoiser
from stepdistill.pipelines import load_pipeline
from stepdistill.pipelines.families import SDFamily, family_of


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return load_pipeline(build_tiny_sd(tmp_path_factory.mktemp("sd") / "pipe"))


def test_prompt_embeddings_match_the_text_encoder_and_are_cached(sd):
    family = family_of(sd, "tiny-sd")
    assert isinstance(family, SDFamily)
    calls = []
    encode = family.prompts.encode
    family.prompts.encode = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    cond, uncond = family.prompt_cond(["a cat", "a dog", "a cat"])
    h = cond.encoder_hidden_states
    assert h.shape == (3, sd.tokenizer.model_max_length, 16) and h.device.type == "cpu"
    assert torch.equal(h[0], h[2]) and not torch.equal(h[0], h[1])
    # The same numbers as tokenizer + text encoder called directly (what the pipeline conditions on).
    ids = sd.tokenizer(["a dog", ""], padding="max_length", max_length=sd.tokenizer.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        direct = sd.text_encoder(ids)[0]
    torch.testing.assert_close(h[1], direct[0])
    torch.testing.assert_close(uncond.encoder_hidden_states[0], direct[1])
    family.prompt_cond(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # the second call hit the cache only


def test_prompt_cache_is_bounded_in_bytes():
    def encode(prompts):
        x = torch.stack([torch.full((4,), float(len(p))) for p in prompts])  # 16 bytes per prompt and Cond
        return Cond(encoder_hidden_states=x), Cond(encoder_hidden_states=-x)

    cache = PromptCache(encode, max_bytes=3 * 32)  # room for three prompts (cond + uncond)
    cache(["a", "bb", "ccc", "dddd"])
    assert list(cache.entries) == ["bb", "ccc", "dddd"] and cache.nbytes == 96
    cond, uncond = cache(["a", "dddd"])
    assert cond.encoder_hidden_states[:, 0].tolist() == [1.0, 4.0] and uncond.encoder_hidden_states[0, 0] == -1
    assert list(cache.entries) == ["ccc", "a", "dddd"]  # "a" came back, the least recently used left
    assert PromptCache(encode, max_bytes=0)(["a"])[0].encoder_hidden_states.shape == (1, 4)


def test_denoiser_runs_text_unet_with_cfg(sd):
    family = family_of(sd, "tiny-sd")
    den = Denoiser(sd.unet, sd.scheduler, call=family.call)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    cond, uncond = family.prompt_cond(["a red 1", "b blue 2"])
    with torch.no_grad():
        c = den(x, t, cond, "eps")
        u = den(x, t, uncond, "eps")
        g = den(x, t, cond, "eps", guidance_scale=5.0, uncond=uncond)
    torch.testing.assert_close(g, u + 5.0 * (c - u), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(c, u)


def test_cond_helpers():
    a = Cond(class_labels=torch.tensor([1, 2]))
    b = Cond(class_labels=torch.tensor([3, 4]))
    assert Cond.cat(a, b).class_labels.tolist() == [1, 2, 3, 4]
    assert Cond.concat([a, b, a]).class_labels.tolist() == [1, 2, 3, 4, 1, 2]
    assert a.repeat(2).class_labels.tolist() == [1, 2, 1, 2]
    assert a.index(torch.tensor([1])).class_labels.tolist() == [2]
    half = Cond(encoder_hidden_states=torch.zeros(1, 2, 3)).to(dtype=torch.float16)
    assert half.encoder_hidden_states.dtype == torch.float16 and half.nbytes() == 12

"""Text conditioning through a tokenizer + text encoder (tiny CLIP built in code) and a text UNet."""

import torch
from _tiny_sd import tiny_text_stack
from diffusers import DDIMScheduler

from stepdistill.conditioning import Cond, TextConditioning
from stepdistill.denoiser import Denoiser


def test_text_embeddings_are_cached_and_prompt_dependent():
    tok, enc, _ = tiny_text_stack()
    text = TextConditioning(tok, enc)
    calls = []
    orig = text._encode
    text._encode = lambda prompts: calls.append(list(prompts)) or orig(prompts)
    e1 = text.embed(["a cat", "a dog", "a cat"])
    assert e1.shape == (3, tok.model_max_length, 16)
    assert torch.equal(e1[0], e1[2]) and not torch.equal(e1[0], e1[1])
    e2 = text.embed(["a dog", "a cat"])
    assert calls == [["a cat", "a dog"]]  # the second call hit the cache only
    torch.testing.assert_close(e2[0], e1[1])
    assert text.uncond(2).encoder_hidden_states.shape == (2, tok.model_max_length, 16)


def test_denoiser_runs_text_unet_with_cfg():
    tok, enc, unet = tiny_text_stack()
    text = TextConditioning(tok, enc)
    den = Denoiser(unet, DDIMScheduler(prediction_type="epsilon"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 900])
    cond, uncond = text.cond(["a red 1", "b blue 2"]), text.uncond(2)
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
    assert a.repeat(2).class_labels.tolist() == [1, 2, 1, 2]
    assert a.index(torch.tensor([1])).class_labels.tolist() == [2]
    half = Cond(encoder_hidden_states=torch.zeros(1, 2, 3)).to(dtype=torch.float16)
    assert half.encoder_hidden_states.dtype == torch.float16

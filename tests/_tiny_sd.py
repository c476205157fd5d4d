"""A tiny SD-type text-to-image pipeline (UNet2DConditionModel + CLIP text model + tiny tokenizer + VAE), built in
code with fixed seeds and saved to a folder, so tests load it through the same code path a hub id takes."""

from __future__ import annotations

from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def tiny_clip(*classes):
    """The fixture's tiny CLIP tokenizer and one tiny CLIP text encoder (width 16, projection 16) per class given
    (``CLIPTextModel`` or ``CLIPTextModelWithProjection``), created in order after the caller's seed."""
    from transformers import CLIPTextConfig, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(FIXTURES / "tiny_clip_tokenizer")
    config = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_attention_heads=2,
                            num_hidden_layers=2, max_position_embeddings=tok.model_max_length,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, projection_dim=16)
    return (tok, *[cls(config).eval() for cls in classes])


def tiny_text_stack():
    """A tiny CLIP tokenizer (fixture), CLIP text model and UNet2DConditionModel (8x8x4 latents), seeded, eval mode."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok, enc = tiny_clip(CLIPTextModel)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4).eval()
    return tok, enc, unet


def build_tiny_sd(out: str | Path) -> str:
    """Save a tiny random StableDiffusionPipeline (16x16 images, 8x8x4 latents, epsilon prediction) to ``out``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    tok, enc, unet = tiny_text_stack()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    sched = DDIMScheduler(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def build_tiny_sdxl(out: str | Path) -> str:
    """Save a tiny random StableDiffusionXLPipeline (16x16 images, 8x8x4 latents): two CLIP text encoders (the second
    with a projection, whose pooled output and the size/crop time ids are the UNet's added conditions)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, enc, enc_2 = tiny_clip(CLIPTextModel, CLIPTextModelWithProjection)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4, addition_embed_type="text_time",
                                addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 * 4 + 16).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16)
    sched = EulerDiscreteScheduler(prediction_type="epsilon", beta_schedule="scaled_linear", beta_start=0.00085,
                                   beta_end=0.012, steps_offset=1, timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=enc, text_encoder_2=enc_2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched, add_watermarker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def build_tiny_sd3(out: str | Path) -> str:
    """Save a tiny random StableDiffusion3Pipeline (16x16 images, 8x8x4 latents, flow matching with shift 3): two CLIP
    encoders with projections, no T5 (the pipeline fills its part with zeros), a VAE with shift and scale."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    tok, enc, enc_2 = tiny_clip(CLIPTextModelWithProjection, CLIPTextModelWithProjection)
    # joint_attention_dim = the two CLIP widths summed; pooled_projection_dim = the two projections summed.
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                        caption_projection_dim=16, pooled_projection_dim=32,
                                        pos_embed_max_size=16).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5035)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=enc, tokenizer=tok, text_encoder_2=enc_2, tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)


def tiny_t5():
    """A tiny T5 encoder and a word-level T5 tokenizer, both built in code (no vocabulary file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "green", "picture", "cat", "dog",
             *[str(i) for i in range(10)]]
    # A Unigram model, as T5's own (transformers rebuilds a T5 tokenizer from a Unigram vocabulary when loading).
    tok = Tokenizer(models.Unigram([(w, -float(i)) for i, w in enumerate(words)], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                model_max_length=32, extra_ids=0)
    enc = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)).eval()
    return tokenizer, enc


def build_tiny_flux(out: str | Path, guidance_embeds: bool = True) -> str:
    """Save a tiny random FluxPipeline (16x16 images, 8x8x4 latents packed into 16 tokens of 16 channels): a CLIP
    encoder (pooled, width 16), a tiny T5 (width 32), a guidance-distilled transformer (as Flux-dev) by default."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tok, enc = tiny_clip(CLIPTextModel)
    tok_2, enc_2 = tiny_t5()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 6, 6)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=4, sample_size=16, shift_factor=0.1159, scaling_factor=0.3611)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=enc, tokenizer=tok, text_encoder_2=enc_2,
                        tokenizer_2=tok_2, transformer=transformer)
    pipe.save_pretrained(str(out), safe_serialization=True)
    return str(out)

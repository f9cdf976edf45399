"""ToMe for SD (``tome_sd``, arXiv 2303.17604) on a diffusers pipeline: a dense vs reduced image pair, offline.

With a real checkpoint the whole thing is one argument::

    import hf_tokred
    from diffusers import DiffusionPipeline
    from hf_tokred import TokenReductionConfig

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        token_reduction=TokenReductionConfig(method="tome_sd", ratio=0.5),
    )
    image = pipe("a photo of an astronaut riding a horse").images[0]
    # SDXL has no attention at the finest UNet level: use max_downsample=2 there (ratio=0.5, max_downsample=2).

This script builds a tiny random DiT pipeline from configs instead (nothing is downloaded), generates
the same seeded, classifier-free-guided image dense and with ``tome_sd`` at ratio 0.5, and saves both
side by side. With random weights the pictures are noise; what the pair shows is how far merging moves
the result. It also prints how many tokens each self-attention sees.

Run: ``python examples/diffusion_tome_pair.py [--out tome_pair.png] [--ratio 0.5]``
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

import hf_tokred
from hf_tokred import TokenReductionConfig


def tiny_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4, layers_per_block=1,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    """One seeded image, guidance 4 (the transformer sees a cond + uncond batch of 2)."""
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[3], num_inference_steps=8, guidance_scale=4.0, generator=generator,
                output_type="pt").images


def count_queries(pipe) -> list[int]:
    """Tokens each self-attention projects to queries, seen by a plain torch hook inside ``attn1``."""
    seen: list[int] = []
    handles = [block.attn1.to_q.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
               for block in pipe.transformer.transformer_blocks]
    generate(pipe)
    for handle in handles:
        handle.remove()
    return seen[: len(handles)]


def side_by_side(left: torch.Tensor, right: torch.Tensor, scale: int = 8) -> Image.Image:
    """Two (1, 3, H, W) images in [0, 1] as one PIL image, enlarged ``scale`` times (nearest)."""
    pair = torch.cat([left[0], torch.ones(3, left.shape[2], 2), right[0]], dim=2)
    array = (pair.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    image = Image.fromarray(array)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tome_pair.png", help="where to save the pair (default: tome_pair.png)")
    parser.add_argument("--ratio", type=float, default=0.5, help="tome_sd ratio (default: 0.5)")
    args = parser.parse_args(argv)

    pipe = tiny_pipeline()
    dense = generate(pipe)
    print("dense tokens per self-attention:  ", count_queries(pipe))

    hf_tokred.apply(pipe, TokenReductionConfig(method="tome_sd", ratio=args.ratio))
    reduced = generate(pipe)
    print("merged tokens per self-attention: ", count_queries(pipe))
    print("same seed, same image again:      ", torch.equal(generate(pipe), reduced))
    print(f"relative change of the image:      {((reduced - dense).norm() / dense.norm()).item():.3f}")

    side_by_side(dense, reduced).save(args.out)
    print(f"saved dense | tome_sd ratio={args.ratio:g} to {args.out}")

    hf_tokred.remove(pipe)
    print("remove() restores dense output:   ", torch.equal(generate(pipe), dense))


if __name__ == "__main__":
    main()

"""ToDo (token downsampling, arXiv 2402.13573) on a diffusers pipeline, offline.

With a real checkpoint the whole thing is one argument::

    import hf_tokred
    from diffusers import DiffusionPipeline
    from hf_tokred import TokenReductionConfig

    pipe = DiffusionPipeline.from_pretrained(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        token_reduction=TokenReductionConfig(method="todo", downsample_factor=2),
    )
    image = pipe("a photo of an astronaut riding a horse").images[0]
    pipe.save_pretrained("sd15-todo")      # the reduction is saved in unet/config.json and comes back on load

This script builds a tiny random DiT pipeline from configs instead (nothing is downloaded), counts the
keys each self-attention sees, and checks that ``hf_tokred.remove`` and a save/load round trip behave.

Run: ``python examples/diffusion_todo.py``
"""

from __future__ import annotations

import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, DiTPipeline, DiTTransformer2DModel

import hf_tokred
from hf_tokred import TokenReductionConfig


def tiny_pipeline() -> DiTPipeline:
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=16,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
        layers_per_block=1,
    ).eval()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(
        class_labels=[3], num_inference_steps=4, guidance_scale=1.0, generator=generator, output_type="pt"
    ).images


def count_keys(pipe) -> list[int]:
    """Tokens each self-attention projects to keys, seen by a plain torch hook on ``attn1.to_k``."""
    seen: list[int] = []
    handles = [
        block.attn1.to_k.register_forward_hook(lambda module, args, output: seen.append(args[0].shape[1]))
        for block in pipe.transformer.transformer_blocks
    ]
    generate(pipe)
    for handle in handles:
        handle.remove()
    return seen[: len(handles)]


def main() -> None:
    pipe = tiny_pipeline()
    dense = generate(pipe)
    print("dense keys per self-attention:  ", count_keys(pipe))

    cfg = TokenReductionConfig(method="todo", downsample_factor=2)
    with tempfile.TemporaryDirectory() as dense_folder, tempfile.TemporaryDirectory() as folder:
        pipe.save_pretrained(dense_folder)
        hf_tokred.apply(pipe, cfg)
        reduced = generate(pipe)
        print("reduced keys per self-attention:", count_keys(pipe))
        print(f"relative change of the image:    {((reduced - dense).norm() / dense.norm()).item():.3f}")

        # Loaded pipelines are compared with loaded pipelines: weights read from a safetensors file may sit at
        # unaligned addresses, where some CPUs round a matmul differently (~1e-7) than on the in-memory copy.
        pipe.save_pretrained(folder)
        again = DiffusionPipeline.from_pretrained(folder)  # the saved reduction is re-attached
        plain = DiffusionPipeline.from_pretrained(dense_folder)
        plain_reduced = hf_tokred.apply(DiffusionPipeline.from_pretrained(dense_folder), cfg)
        for p in (again, plain, plain_reduced):
            p.set_progress_bar_config(disable=True)
        print("reloaded with the reduction:    ", torch.equal(generate(again), generate(plain_reduced)))
        dense_again = DiffusionPipeline.from_pretrained(folder, token_reduction=False)
        dense_again.set_progress_bar_config(disable=True)
        print("token_reduction=False is dense: ", torch.equal(generate(dense_again), generate(plain)))

    hf_tokred.remove(pipe)
    print("remove() restores dense output: ", torch.equal(generate(pipe), dense))


if __name__ == "__main__":
    main()

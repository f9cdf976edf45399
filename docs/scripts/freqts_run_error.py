"""Output error of freqts vs dense (and tome_sd / todo) over a DDIM run, random weights, CPU.

Teacher-forced: every variant gets the dense trajectory's latents at each step; we report the relative
L2 error of its noise prediction per step (mean over steps) and the FLOPs of a full run relative to dense.
"""
import json
import sys
import time

import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, UNet2DConditionModel

import hf_tokred
import hf_tokred.methods.diffusion.freqts as fq
from hf_tokred.bench.diffusion import count_flops

torch.set_num_threads(1)
SIZE = sys.argv[1] if len(sys.argv) > 1 else "medium"
STEPS = int(sys.argv[2]) if len(sys.argv) > 2 else 20


def build(name, device=None):
    torch.manual_seed(0)
    if name == "unet":
        if SIZE == "tiny":
            from hf_tokred.bench.diffusion import build_unet
            return build_unet("tiny")
        # SD1.5 layout (4 levels, 2 layers per block, 8-dim heads), widths /5, 32x32 latent
        return UNet2DConditionModel(sample_size=32, block_out_channels=(64, 128, 256, 256), cross_attention_dim=64,
                                    attention_head_dim=8, norm_num_groups=32).eval()
    if SIZE == "tiny":
        from hf_tokred.bench.diffusion import build_dit
        return build_dit("tiny")
    # DiT-XL/2 layout (patch 2, 32x32 latent, 256 tokens, adaLN-zero), 12 layers x 384 wide (DiT-S/2)
    return DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8,
                                 num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()


def caller(name, model, device="cpu"):
    g = torch.Generator().manual_seed(1)
    if name == "unet":
        text = torch.randn(2, 77, model.config.cross_attention_dim, generator=g, device="cpu").to(device)
        return lambda x, t: model(x, torch.full((2,), t, device=device), encoder_hidden_states=text).sample
    labels = torch.tensor([3, 1000], device="cpu").to(device)  # cond + null class (CFG batch)
    return lambda x, t: model(x, timestep=torch.full((2,), t, device=device), class_labels=labels).sample[:, :4]


VARIANTS = [
    ("freqts", {"method": "freqts", "ratio": 0.5, "full_every": 3}, None),
    ("freqts", {"method": "freqts", "ratio": 0.5, "full_every": 3, "schedule": "constant"}, None),
    ("freqts", {"method": "freqts", "ratio": 0.7, "full_every": 3, "schedule": "constant"}, None),
    ("freqts", {"method": "freqts", "ratio": 0.5, "full_every": 2, "schedule": "constant"}, None),
    ("freqts random-selection", {"method": "freqts", "ratio": 0.5, "full_every": 3, "schedule": "constant"}, "random"),
    ("freqts low-freq-selection", {"method": "freqts", "ratio": 0.5, "full_every": 3, "schedule": "constant"}, "low"),
    ("tome_sd", {"method": "tome_sd", "ratio": 0.5}, None),
    ("todo", {"method": "todo", "downsample_factor": 2}, None),
]


def main():
    original_scores = fq.high_frequency_scores
    out = {}
    for name in ("unet", "dit"):
        model = build(name)
        run = caller(name, model)
        sched = DDIMScheduler(num_train_timesteps=1000)
        sched.set_timesteps(STEPS)
        timesteps = [int(t) for t in sched.timesteps]
        g = torch.Generator().manual_seed(2)
        size = model.config.sample_size
        x = torch.randn(2, 4, size, size, generator=g)
        latents, dense_eps = [], []
        t0 = time.time()
        with torch.no_grad():
            for t in timesteps:
                latents.append(x)
                eps = run(x, t)
                dense_eps.append(eps)
                x = sched.step(eps, t, x).prev_sample
        dense_final = x
        # FLOPs: per step on meta, dense vs each variant (full and partial steps), weighted over the run
        with torch.device("meta"):
            meta = build(name)
        mrun = caller(name, meta, "meta")
        mx = torch.empty(2, 4, size, size, device="meta")
        dense_flops, _ = count_flops(lambda: mrun(mx, 500))  # noqa: B023 (used within this iteration)
        rows = []
        for label, cfg, selection in VARIANTS:
            if selection == "random":
                gen = torch.Generator().manual_seed(0)
                fq.high_frequency_scores = lambda tok, h, w, k=3: torch.rand(tok.shape[:2], generator=gen)  # noqa: B023 (used within this iteration)
            elif selection == "low":
                fq.high_frequency_scores = lambda tok, h, w, k=3: -original_scores(tok, h, w, k)
            try:
                hf_tokred.apply(model, cfg)
                errs = []
                with torch.no_grad():
                    for x_t, t, ref in zip(latents, timesteps, dense_eps):
                        eps = run(x_t, t)
                        errs.append(((eps - ref).norm() / ref.norm()).item())
                hf_tokred.remove(model)
                # free-running: the reduced model's own trajectory
                hf_tokred.apply(model, cfg)
                sched.set_timesteps(STEPS)
                x = latents[0]
                with torch.no_grad():
                    for t in timesteps:
                        x = sched.step(run(x, t), t, x).prev_sample
                final_err = ((x - dense_final).norm() / dense_final.norm()).item()
                hf_tokred.remove(model)
            finally:
                fq.high_frequency_scores = original_scores
            # FLOPs of the run
            hf_tokred.apply(meta, cfg)
            if cfg["method"] == "freqts":
                # run-weighted: full-step FLOPs and partial-step FLOPs at each step's ratio
                c = hf_tokred.TokenReductionConfig(**cfg)
                total = 0
                for step, t in enumerate(timesteps):
                    if fq.is_full_step(step, c.full_every, c.warmup_steps):
                        total += dense_flops
                    else:
                        # one partial step at this timestep's ratio, counted on meta after a priming call
                        hf_tokred.remove(meta)
                        hf_tokred.apply(meta, {**cfg, "schedule": "constant",
                                               "ratio": max(fq.step_ratio(c.ratio, float(t), c.schedule), 0.0)}
                                        if fq.step_ratio(c.ratio, float(t), c.schedule) > 0 else {**cfg, "ratio": 0.0})
                        count_flops(lambda: mrun(mx, 500))  # noqa: B023 (used within this iteration)
                        f, _ = count_flops(lambda: mrun(mx, 500))  # noqa: B023 (used within this iteration)
                        total += f
                flops = total / len(timesteps)
            else:
                flops, _ = count_flops(lambda: mrun(mx, 500))  # noqa: B023 (used within this iteration)
            hf_tokred.remove(meta)
            row = {"variant": label, "config": cfg, "mean_step_rel_err": sum(errs) / len(errs),
                   "max_step_rel_err": max(errs), "final_latent_rel_err": final_err,
                   "flops_saved": 1 - flops / dense_flops}
            rows.append(row)
            print(name, json.dumps(row), flush=True)
        out[name] = rows
        print(name, "dense run", round(time.time() - t0, 1), "s", flush=True)
    json.dump(out, open(f"/tmp/i15/freqts_work/quality_{SIZE}_{STEPS}.json", "w"), indent=1)


main()

"""Training recipe of ``dydit`` (arXiv 2410.03456): the routers of a DiT distilled to the dense model, and
``hf-tokred train dydit``.

:func:`train_dydit` trains the routers of a DiT-family denoiser that already has ``{"method": "dydit"}``
applied: on random latents, timesteps and class labels, the routed model (straight-through Gumbel masks)
is pulled to the dense model's noise prediction (the same model with every router on,
:func:`~hf_tokred.integration.dydit.forced_dense`), plus the paper's FLOPs loss
``(kept FLOPs fraction - flops_ratio) ** 2``. The backbone stays frozen (the paper fine-tunes it too).

Example:
    >>> import hf_tokred
    >>> from hf_tokred.recipes.dydit import small_dit, train_dydit
    >>> dit = hf_tokred.apply(small_dit(layers=2, heads=2, head_dim=8, sample_size=8), {"method": "dydit"})
    >>> losses = train_dydit(dit, steps=2, flops_ratio=0.6, progress=False)
    >>> len(losses)
    2
"""

from __future__ import annotations

import torch

DESCRIPTION = """\
Train DyDiT routers (timestep-wise attention heads / MLP channel groups, token-wise MLP skipping) on a
small DiT with random weights built from a config (nothing is downloaded): the routed model is distilled
to the dense one on random latents, timesteps and class labels, with the FLOPs loss pulling the kept
attention+MLP FLOPs to --flops-ratio. The model with its routers is saved with save_pretrained
(routers in token_reduction.safetensors); load it with DiTTransformer2DModel.from_pretrained(DIR).
"""


def small_dit(*, layers: int = 4, heads: int = 4, head_dim: int = 32, sample_size: int = 16, patch_size: int = 2,
              in_channels: int = 4, classes: int = 1000, seed: int = 0):
    """A ``DiTTransformer2DModel`` with random weights built from a config (DiT-XL/2's layout, smaller), in eval mode.

    Example:
        >>> from hf_tokred.recipes.dydit import small_dit
        >>> small_dit(layers=2, heads=2, head_dim=8, sample_size=8).config.num_layers
        2
    """
    from diffusers import DiTTransformer2DModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=in_channels,
                                      num_layers=layers, sample_size=sample_size, patch_size=patch_size,
                                      num_embeds_ada_norm=classes)
    finally:
        torch.random.set_rng_state(state)
    return model.eval()


def random_dit_inputs(transformer, batch_size: int, generator: torch.Generator) -> dict:
    """Random noisy latents, timesteps (0..999) and class labels for a ``DiTTransformer2DModel`` call.

    Example:
        >>> import torch
        >>> from hf_tokred.recipes.dydit import random_dit_inputs, small_dit
        >>> inputs = random_dit_inputs(small_dit(layers=1, heads=2, head_dim=8, sample_size=8), 2,
        ...                            torch.Generator().manual_seed(0))
        >>> tuple(inputs["hidden_states"].shape), sorted(inputs)
        ((2, 4, 8, 8), ['class_labels', 'hidden_states', 'timestep'])
    """
    config = transformer.config
    parameter = next(transformer.parameters())
    size = config.sample_size
    latents = torch.randn(batch_size, config.in_channels, size, size, generator=generator)
    timestep = torch.randint(0, 1000, (batch_size,), generator=generator)
    labels = torch.randint(0, config.num_embeds_ada_norm, (batch_size,), generator=generator)
    return {"hidden_states": latents.to(parameter.device, parameter.dtype), "timestep": timestep.to(parameter.device),
            "class_labels": labels.to(parameter.device)}


def _noise_prediction(transformer, inputs: dict) -> torch.Tensor:
    # DiT predicts the noise in its first in_channels output channels (and the variance after them).
    return transformer(**inputs).sample[:, : transformer.config.in_channels]


def relative_error(prediction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Relative L2 error per row: ``||prediction - reference|| / ||reference||``.

    Example:
        >>> import torch
        >>> from hf_tokred.recipes.dydit import relative_error
        >>> relative_error(torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])).tolist()
        [1.0]
    """
    diff = (prediction - reference).flatten(1).float()
    return diff.norm(dim=1) / reference.flatten(1).float().norm(dim=1).clamp_min(1e-12)


def train_dydit(transformer, *, steps: int = 300, lr: float = 1e-2, flops_ratio: float | None = None,
                flops_weight: float = 4.0, batch_size: int = 8, noise_fade: float = 0.7, seed: int = 0, log_every: int = 0, log=print,
                progress: bool = True) -> list[float]:
    """Train the DyDiT routers of ``transformer`` (a DiT with ``{"method": "dydit"}`` applied); returns the losses.

    Each step draws ``batch_size`` random noisy latents, timesteps and class labels; the loss is the relative
    squared error of the routed noise prediction to the dense one (routers forced on, no gradient) plus
    ``flops_weight * (kept FLOPs fraction - flops_ratio) ** 2`` (``flops_ratio`` defaults to the config's).
    Only the routers train (AdamW, ``lr``); the backbone is frozen and stays in eval mode; the routers are
    left in eval mode (hard decisions). The Gumbel noise fades linearly to 0 over the first ``noise_fade``
    of the steps, so the end of training sees the decisions inference takes. Seeded by ``seed``; the global RNG is restored afterwards. A tqdm
    bar shows progress unless ``progress`` is False or ``log_every`` is set (then ``log`` gets a line every
    ``log_every`` steps).

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.recipes.dydit import small_dit, train_dydit
        >>> dit = hf_tokred.apply(small_dit(), {"method": "dydit", "flops_ratio": 0.6})   # doctest: +SKIP
        >>> losses = train_dydit(dit, steps=300)                                          # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..errors import TokenReductionError
    from ..integration.dydit import _state, forced_dense, kept_flops_ratio
    from ..integration.wiring import get_applied

    applied = get_applied(transformer)
    reducer = applied.config.get("diffusion") if applied is not None else None
    if reducer is None or reducer.method != "dydit":
        raise TokenReductionError("train_dydit: apply {'method': 'dydit'} to the transformer first")
    target = reducer.flops_ratio if flops_ratio is None else float(flops_ratio)
    if not 0.0 < target <= 1.0:
        raise TokenReductionError(f"train_dydit: flops_ratio must be in (0, 1], got {flops_ratio!r}")
    routers = transformer.hf_tokred_modules["dydit"]
    state = _state(transformer)
    trainable = {id(p) for p in routers.parameters()}
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=lr, weight_decay=0.0)
    transformer.eval()
    losses = []
    bar = tqdm(total=steps, desc="train dydit", disable=not progress or bool(log_every))
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(id(parameter) in trainable)
        routers.train()
        for step in range(steps):
            # The Gumbel noise fades out over the first noise_fade of the steps: the rest trains on the hard
            # decisions inference takes (with noise, the kept FLOPs are the expected ones, not the decided ones).
            state.noise = max(0.0, 1.0 - step / max(1.0, noise_fade * steps))
            inputs = random_dit_inputs(transformer, batch_size, generator)
            with torch.no_grad(), forced_dense(transformer):
                teacher = _noise_prediction(transformer, inputs)
            student = _noise_prediction(transformer, inputs)
            distil = (relative_error(student, teacher) ** 2).mean()
            kept = kept_flops_ratio(transformer)
            loss = distil + flops_weight * ((kept - target) ** 2).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", flops=f"{float(kept.detach().mean()):.3f}")
            if log_every and (step + 1) % log_every == 0:
                log(f"dydit {step + 1}/{steps}: loss {losses[-1]:.4f} (distil {distil.item():.4f}, "
                    f"kept FLOPs {float(kept.detach().mean()):.3f})")
    finally:
        bar.close()
        routers.eval()
        state.noise = 1.0
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        torch.random.set_rng_state(rng_state)
    return losses


@torch.no_grad()
def evaluate_dydit(transformer, *, samples: int = 32, batch_size: int = 8, seed: int = 1234) -> dict:
    """Hard-routed vs dense on held-out random inputs: mean relative L2 error of the noise prediction and the
    mean fraction of the routed attention+MLP FLOPs kept.

    Example:
        >>> import hf_tokred
        >>> from hf_tokred.recipes.dydit import evaluate_dydit, small_dit
        >>> dit = hf_tokred.apply(small_dit(layers=1, heads=2, head_dim=8, sample_size=8), {"method": "dydit"})
        >>> evaluate_dydit(dit, samples=2)
        {'relative_l2': 0.0, 'kept_flops': 1.0, 'samples': 2}
    """
    from ..integration.dydit import forced_dense, kept_flops_ratio

    generator = torch.Generator().manual_seed(seed)
    errors, kept = [], []
    for start in range(0, samples, batch_size):
        inputs = random_dit_inputs(transformer, min(batch_size, samples - start), generator)
        with forced_dense(transformer):
            dense = _noise_prediction(transformer, inputs)
        routed = _noise_prediction(transformer, inputs)
        errors.append(relative_error(routed, dense))
        kept.append(kept_flops_ratio(transformer).expand(routed.shape[0]))
    return {"relative_l2": round(float(torch.cat(errors).mean()), 4), "kept_flops": round(float(torch.cat(kept).mean()), 4),
            "samples": samples}


@torch.no_grad()
def preset_routes(transformer, inputs: dict, *, heads: float = 0.5, groups: float = 0.5, tokens: float = 0.5,
                  seed: int = 0) -> None:
    """Set the DyDiT routers of ``transformer`` to fixed decisions (for FLOPs/speed benchmarks on random weights).

    Every block keeps its first ``round(heads * H)`` attention heads and ``round(groups * G)`` MLP channel
    groups at every timestep, and its token router (a random direction, ``seed``) is given the bias that
    keeps a ``tokens`` fraction of the tokens of the call ``transformer(**inputs)`` (calibrated block by
    block on that call, so later calls with other inputs keep about that fraction).

    Example:
        >>> import torch, hf_tokred
        >>> from hf_tokred.integration.dydit import kept_flops_ratio
        >>> from hf_tokred.recipes.dydit import preset_routes, random_dit_inputs, small_dit
        >>> dit = hf_tokred.apply(small_dit(layers=2, heads=2, head_dim=8, sample_size=8), {"method": "dydit"})
        >>> inputs = random_dit_inputs(dit, 2, torch.Generator().manual_seed(0))
        >>> preset_routes(dit, inputs, heads=0.5, groups=0.5, tokens=0.5)
        >>> round(float(kept_flops_ratio(dit).mean()), 3)   # half the attention, a quarter of the MLP
        0.357
    """
    from ..integration.dydit import dydit_targets

    for name, value in (("heads", heads), ("groups", groups), ("tokens", tokens)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a fraction in [0, 1], got {value!r}")
    routers = transformer.hf_tokred_modules["dydit"]
    targets = dydit_targets(transformer, transformer._hf_tokred_applied.config.get("diffusion"))
    generator = torch.Generator().manual_seed(seed)
    handles = []
    for router, target in zip(routers, targets):
        on = [True] * round(heads * router.heads) + [False] * (router.heads - round(heads * router.heads))
        on += [True] * round(groups * router.groups) + [False] * (router.groups - round(groups * router.groups))
        router.width.weight.zero_()
        router.width.bias.copy_(torch.tensor([4.0 if d else -4.0 for d in on]))
        direction = torch.randn(router.token.weight.shape, generator=generator) / router.token.in_features ** 0.5
        router.token.weight.copy_(direction)

        def calibrate(module, args, router=router):
            scores = router.token(args[0]).squeeze(-1).flatten().float()
            if tokens >= 1.0:
                bias = -float(scores.min()) + 1.0
            elif tokens <= 0.0:
                bias = -float(scores.max()) - 1.0
            else:  # the midpoint between the last kept and the first dropped score
                ordered = scores.sort(descending=True).values
                kept = max(1, round(tokens * ordered.numel()))
                bias = -float(ordered[kept - 1] + ordered[min(kept, ordered.numel() - 1)]) / 2
            router.token.bias.fill_(bias)  # zero while scoring: the scores are the projections alone
            return None

        router.token.bias.zero_()
        handles.append(target.ff.register_forward_pre_hook(calibrate))
    try:
        transformer(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train dydit`` to the ``train`` subparsers.

    Example:
        >>> import argparse
        >>> sub = argparse.ArgumentParser().add_subparsers()
        >>> add_train_command(sub)
        >>> sub.choices["dydit"].parse_args(["--flops-ratio", "0.6"]).flops_ratio
        0.6
    """
    from ..cli import _positive_int
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "dydit", help="DyDiT routers on a small random-weight DiT (no download)",
                              description=DESCRIPTION, output="dit-dydit", steps=300, corpus=False)
    train.add_argument("--flops-ratio", type=float, default=0.7,
                       help="fraction of the attention+MLP FLOPs to keep (default: 0.7)")
    train.add_argument("--lr", type=float, default=1e-2, help="learning rate (default: 1e-2)")
    train.add_argument("--batch-size", type=_positive_int, default=8, help="random inputs per step (default: 8)")
    train.add_argument("--layers", type=_positive_int, default=4, help="DiT blocks (default: 4)")
    train.add_argument("--heads", type=_positive_int, default=4, help="attention heads (default: 4)")
    train.add_argument("--head-dim", type=_positive_int, default=32, help="head width (default: 32)")
    train.add_argument("--sample-size", type=_positive_int, default=16, help="latent side (default: 16)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Build the small DiT, train its routers, report the held-out error and save it to the output folder."""
    import hf_tokred

    from . import recipe_output

    output = recipe_output(args, "dit-dydit")
    config = hf_tokred.TokenReductionConfig.coerce({"method": "dydit", "flops_ratio": args.flops_ratio})
    dit = small_dit(layers=args.layers, heads=args.heads, head_dim=args.head_dim, sample_size=args.sample_size,
                    seed=args.seed)
    hf_tokred.apply(dit, config)
    train_dydit(dit, steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                progress=not args.no_progress)
    result = evaluate_dydit(dit)
    print(f"held-out: relative L2 of the noise prediction {result['relative_l2']:.4f}, "
          f"attention+MLP FLOPs kept {result['kept_flops']:.3f} ({result['samples']} random inputs)")
    dit.save_pretrained(output)
    print(f"saved to {output}")
    return 0


__all__ = ["add_train_command", "evaluate_dydit", "preset_routes", "random_dit_inputs", "relative_error", "small_dit", "train_dydit"]

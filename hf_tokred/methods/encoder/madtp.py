"""MADTP: Multimodal Alignment-Guided Dynamic Token Pruning (Cao et al., CVPR 2024, arXiv 2403.02991).

Learned, text-guided, per-instance pruning of the image tokens inside the ViT of BLIP and BLIP-2.

Two learned parts, attached as ``model.hf_tokred_modules["madtp"]`` (:class:`MADTPHeads`) and saved to
``token_reduction.safetensors``:

* **MAG** (multi-modality alignment guidance): a set of learned *alignment tokens* (``num_concepts`` vectors in an
  ``align_dim`` space shared by the two modalities), a projection of the text representation into that space, and,
  per pruning layer, a projection of the visual tokens. The text selects alignment tokens (softmax of its similarity
  to each) and the guide ``u = g + sum_k alpha_k c_k`` (``g``: the projected text) scores every visual token by its
  alignment with it: ``s_i = <v_i, u> / sqrt(align_dim)``. Visual tokens that align poorly with what the text is
  about rank low.
* **DTP** (dynamic token pruning): per pruning layer, a small head reads the CLS token and two complexity statistics
  of the alignment scores (their normalised entropy and the share of their softmax mass the layer's base ratio would
  keep) and sets this instance's keep ratio ``r = min(1, rho * (1 + spread * tanh(delta)))`` around the layer's base
  ratio ``rho = keep ** (1 / stages)``. The head starts at ``delta = 0`` (every instance at ``rho``); training moves
  instances apart while the ratio loss holds the batch mean at the budget. A layer keeps ``ceil(r * n)`` of the
  row's ``n`` current patch tokens: rows of a batch keep different numbers (filler slots are masked).

**Where the text comes from.** BLIP runs its vision encoder before the text, so the text representation is
computed once per call before the vision encoder runs: a forward pre-hook on the model (and a wrapper of its
``generate``) reads ``input_ids``/``attention_mask`` and computes

* BLIP with a text encoder (``BlipForImageTextRetrieval``, ``BlipForQuestionAnswering``, ``BlipModel``): the CLS
  state of the text encoder run *unimodally* (no cross-attention; BLIP's ITC text feature), under ``no_grad``;
* BLIP without one (``BlipForConditionalGeneration``: the prompt of the decoder) and BLIP-2 (the prompt of the
  language model): the mean of the text's input embeddings over its real tokens (image placeholder tokens and
  BOS left out);
* no text (``guidance="vision"``, a call without ``input_ids``, a vision model on its own, a BLIP-2 ``generate``
  without a prompt): the projected vision CLS token of the pruning layer takes the text's place (per row).

**Training** (the heads in training mode, :func:`hf_tokred.training_madtp.train_madtp`): nothing is dropped; each
layer's decision is the hard top-``ceil(r n)`` of the inference (straight-through) with gradients from a sigmoid
relaxation ``sigmoid((z_i - theta) / tau)`` of the z-scored alignment scores around a differentiable quantile
``theta`` at ``r`` (so both MAG and DTP learn); dropped tokens are masked out as keys of later blocks (each token
still attends to itself), exactly as dynamicvit. The backbone stays frozen; the loss distils the dense model (KL
on the ITM / answer / language-model logits, cosine of the pooled vision embedding), plus a ratio loss of the
batch-mean kept fraction toward ``keep ** ((s + 1) / stages)`` after stage ``s`` and an alignment (InfoNCE) loss
between the pooled aligned visual tokens and the text. **Inference** (eval mode): hard drop, real speed-up.

Where we depart from the paper:

* Only visual tokens are pruned; the paper also prunes the text tokens of BLIP's text encoder (which here would
  need the text encoder's layers as a second sequence stage).
* Importance is the alignment score alone; the paper averages it with CLS attention and self-attention
  importance. BLIP's attention bypasses transformers' attention interface, so those statistics are not
  observable without copying its forward.
* The per-instance ratio comes from a learned head around a base ratio (the paper derives a threshold from the
  alignment-token attention without a ratio head, and merges the pruned tokens into one; we drop them).
* The paper's MAG feeds both modalities' tokens to the shared alignment tokens inside the model; here the text
  guidance is computed once before the vision encoder (see above), and for BLIP-2 from the language-model prompt
  embedding (the Q-Former's query tokens are input-independent, and they run after the vision encoder).
* The backbone is frozen and distilled from its own dense pass (the paper fine-tunes the whole model on the task).

Example:
    >>> from hf_tokred import TokenReductionConfig
    >>> cfg = TokenReductionConfig(method="madtp", keep=0.343, layers=[1, 2, 3])
    >>> [round(r, 2) if r else r for r in cfg.schedule(5)]
    [None, 0.7, 0.7, 0.7, None]
"""

from __future__ import annotations

import inspect
import math
import types
from dataclasses import dataclass

import torch
from torch import nn

from ...config import param, register_method
from ...errors import ConfigError, TokenReductionError, UnsupportedModelError
from .base import EncoderReducerConfig, SoftMask, keep_top

MODULE_NAME = "madtp"
RECORD_KEY = "madtp"
SUPPORTED_ADAPTERS = ("blip", "blip_vision", "blip_2", "blip_2_vision")
SUPPORTED_CLASSES = ("BlipForImageTextRetrieval", "BlipForQuestionAnswering", "BlipForConditionalGeneration",
                     "BlipModel", "BlipVisionModel", "Blip2ForConditionalGeneration", "Blip2Model", "Blip2VisionModel")
GUIDANCE = ("auto", "text", "vision")


class MADTPStage(nn.Module):
    """One pruning layer's learned parts: the visual projection into the alignment space (MAG) and the keep-ratio
    head (DTP).

    Example:
        >>> import torch
        >>> stage = MADTPStage(32, 16, 8)
        >>> stage.vision(torch.randn(2, 5, 32)).shape, stage.ratio_out.weight.abs().sum().item()
        (torch.Size([2, 5, 16]), 0.0)
    """

    def __init__(self, dim: int, align_dim: int, hidden: int):
        super().__init__()
        self.vision = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, align_dim))
        self.ratio = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU())
        self.ratio_out = nn.Linear(hidden + 2, 1)
        with torch.no_grad():  # every instance starts at the layer's base ratio
            self.ratio_out.weight.zero_()
            self.ratio_out.bias.zero_()


class MADTPHeads(nn.Module):
    """The learned parts of MADTP (``model.hf_tokred_modules["madtp"]``): alignment tokens, text projection and one
    :class:`MADTPStage` per pruning layer (``blocks`` are their block indices).

    Example:
        >>> import torch
        >>> heads = MADTPHeads(32, 24, [1, 3], align_dim=16, num_concepts=4, hidden=8)
        >>> s, v, g = heads.alignment(0, torch.randn(2, 5, 32), torch.randn(2, 24), torch.tensor([True, False]))
        >>> s.shape, v.shape, g.shape, heads.stage_of(3)
        (torch.Size([2, 5]), torch.Size([2, 5, 16]), torch.Size([2, 16]), 1)
    """

    def __init__(self, dim: int, text_dim: int | None, blocks: list[int], *, align_dim: int = 128,
                 num_concepts: int = 16, hidden: int = 64):
        super().__init__()
        self.align_dim = align_dim
        self.concepts = nn.Parameter(torch.randn(num_concepts, align_dim) / math.sqrt(align_dim))
        self.text = None if text_dim is None else nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, align_dim))
        self.stages = nn.ModuleList(MADTPStage(dim, align_dim, hidden) for _ in blocks)
        self.blocks = list(blocks)
        self._guidance: list = []  # transient: the text features of the calls in progress (innermost last)

    def stage_of(self, block: int) -> int:
        return self.blocks.index(block)

    def current_guidance(self):
        """``(text_features (B, D_text), has_text (B,))`` of the innermost call in progress, or None."""
        return self._guidance[-1] if self._guidance else None

    def alignment(self, stage: int, hidden: torch.Tensor, text: torch.Tensor | None, has_text: torch.Tensor | None):
        """Alignment scores ``(B, N)`` of every token with the guide, the projected tokens ``(B, N, A)`` and the
        guidance ``(B, A)`` (projected text, or the projected CLS token for rows without text)."""
        v = self.stages[stage].vision(hidden)
        guide = v[:, 0]
        if text is not None and self.text is not None:
            projected = self.text(text.to(guide.dtype))
            guide = torch.where(has_text[:, None], projected, guide)
        scale = 1.0 / math.sqrt(self.align_dim)
        alpha = torch.softmax(guide @ self.concepts.t() * scale, dim=-1)
        u = guide + alpha @ self.concepts
        return (v * u[:, None]).sum(-1) * scale, v, guide

    def ratios(self, stage: int, hidden: torch.Tensor, stats: torch.Tensor, base: float, spread: float) -> torch.Tensor:
        """Per-instance keep ratio ``(B,)`` float32 of one layer: ``min(1, base * (1 + spread * tanh(delta)))``."""
        part = self.stages[stage]
        features = torch.cat([part.ratio(hidden[:, 0]), stats.to(hidden.dtype)], dim=-1)
        delta = part.ratio_out(features)[:, 0].float()
        return (base * (1.0 + spread * torch.tanh(delta))).clamp(max=1.0)


@dataclass
class StageDecision:
    """What one pruning layer decided (``state.records["madtp"]``; with gradients in training).

    Attributes:
        block: the block index.
        ratio: ``(B,)`` the instance keep ratios of this layer (of its current patch tokens).
        kept: ``(B,)`` long, patch tokens kept per row.
        candidates: ``(B,)`` long, patch tokens the layer chose from.
        policy: ``(B, N)`` training only: running keep decisions (straight-through), else None.
        pooled: ``(B, A)`` training only: mean projected visual token over the kept tokens, else None.
        guide: ``(B, A)`` training only: the guidance vectors, else None.
        has_text: ``(B,)`` bool, rows guided by text.
    """

    block: int
    ratio: torch.Tensor
    kept: torch.Tensor
    candidates: torch.Tensor
    policy: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    guide: torch.Tensor | None = None
    has_text: torch.Tensor | None = None


def _complexity(score: torch.Tensor, candidates: torch.Tensor, base: float) -> torch.Tensor:
    """``(B, 2)``: normalised entropy of the softmax of the scores over the candidates, and its mass in the top ``base``."""
    score = score.detach().float().masked_fill(~candidates, -math.inf)
    probs = torch.softmax(score, dim=-1).nan_to_num(0.0)
    n = candidates.sum(dim=1).clamp_min(1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1) / n.float().log().clamp_min(1e-6)
    k = torch.ceil(n.double() * base - 1e-9).long().clamp(min=1)
    ordered = probs.sort(dim=1, descending=True).values
    top = (ordered.cumsum(dim=1).gather(1, (k - 1).clamp(max=probs.shape[1] - 1)[:, None]))[:, 0]
    return torch.stack([entropy, top], dim=-1)


def _counts(ratio: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``ceil(ratio * n)`` per row, at least 1 and at most ``n`` (0 when ``n`` is 0)."""
    kept = torch.ceil(n.double() * ratio.detach().double() - 1e-6).long().clamp(min=1)
    return torch.minimum(kept, n)


def _soft_quantile(z: torch.Tensor, candidates: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """``(B,)`` a threshold on ``z`` between the ``ratio * n``-th and next largest candidate (differentiable in both)."""
    n = candidates.sum(dim=1)
    ordered = z.masked_fill(~candidates, -1e4).sort(dim=1, descending=True).values
    position = (ratio * n.to(ratio.dtype) - 0.5).clamp(min=0.0)
    position = torch.minimum(position, (n - 1).clamp(min=0).to(ratio.dtype))
    low = position.detach().floor().long()
    high = torch.minimum(low + 1, (n - 1).clamp(min=0))
    weight = (position - low.to(position.dtype))
    a = ordered.gather(1, low[:, None])[:, 0]
    b = ordered.gather(1, high[:, None])[:, 0]
    return a * (1 - weight) + b * weight


@register_method("madtp")
@dataclass(kw_only=True)
class MADTPConfig(EncoderReducerConfig):
    """MADTP (arXiv 2403.02991) on the vision encoder of BLIP / BLIP-2: text-guided alignment scores (MAG) rank the
    image tokens and a learned head sets each instance's keep ratio per layer (DTP); see the module docstring for
    the guidance, the training and where we depart from the paper.

    Fields:
        keep: fraction of the image's patch tokens left after the last pruning layer, as the budget the batch mean
            is trained to (at initialisation every instance keeps exactly this). 1.0 keeps all: bit-identical to dense.
        layers: blocks after whose attention a layer prunes (default: depth 1/4, 1/2, 3/4). Each keeps a base
            ratio ``keep ** (1 / len(layers))`` of its current patch tokens, moved per instance by the DTP head.
        spread: how far (relative) an instance's ratio may move from the base ratio (0: static ratios).
        num_concepts: number of learned alignment tokens (MAG).
        align_dim: width of the alignment space.
        ratio_hidden: width of each layer's keep-ratio head.
        tau: temperature of the training relaxation, in units of the z-scored alignment scores.
        guidance: ``"auto"`` (the text when the call carries ``input_ids``, else the vision CLS), ``"text"`` (a
            call without text is an error), ``"vision"`` (never read the text: the vision CLS guides).
        restore_length, prop_attn: as for every encoder reducer.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> cfg = TokenReductionConfig(method="madtp", keep=0.25, layers=[2, 4])
        >>> cfg.base_ratio(2), cfg.stage_target(1, 2)
        (0.5, 0.25)
    """

    paper = "2403.02991"
    learned = True
    status = "experimental"
    supported_adapters = SUPPORTED_ADAPTERS  # the encoder adapters it acts on (listed in docs/methods.md)

    keep: float = param(0.5, float, low=0.0, high=1.0, low_open=True,
                        help="fraction of the patch tokens left after the last pruning layer (batch mean)")
    layers: list[int] | None = param(None, int, low=0, sequence=True, optional=True,
                                     help="indices of the pruning blocks (default: depth 1/4, 1/2, 3/4)")
    spread: float = param(0.5, float, low=0.0, high=1.0, help="relative range of the per-instance keep ratios")
    num_concepts: int = param(16, int, low=1, high=4096, help="learned alignment tokens (MAG)")
    align_dim: int = param(128, int, low=4, high=8192, help="width of the alignment space")
    ratio_hidden: int = param(64, int, low=1, high=8192, help="width of the keep-ratio heads (DTP)")
    tau: float = param(0.1, float, low=0.0, low_open=True, help="temperature of the training relaxation")
    guidance: str = param("auto", str, choices=GUIDANCE, help="what guides the alignment: text, vision CLS, or auto")

    def validate(self) -> None:
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers: expected distinct block indices, got {self.layers!r}", field="layers")
        if self.layers is not None and not self.layers:
            raise ConfigError("layers: expected at least one block index (or None for the default)", field="layers")

    # -- schedule -------------------------------------------------------------------------------

    def reducing_layers(self, num_blocks: int) -> list[int]:
        """The pruning blocks of a vision encoder with ``num_blocks`` blocks.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="madtp").reducing_layers(12)
            [3, 6, 9]
        """
        if self.layers is None:
            return sorted({num_blocks * k // 4 for k in (1, 2, 3)} & set(range(num_blocks)))
        bad = [i for i in self.layers if i >= num_blocks]
        if bad:
            raise ConfigError(f"layers: block {bad[0]} does not exist; the vision encoder has {num_blocks} blocks "
                              f"(0..{num_blocks - 1})", field="layers")
        return sorted(self.layers)

    def base_ratio(self, stages: int) -> float:
        """Each layer's base keep ratio, ``keep ** (1 / stages)``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> round(TokenReductionConfig(method="madtp", keep=0.125).base_ratio(3), 6)
            0.5
        """
        return self.keep ** (1.0 / max(stages, 1))

    def stage_target(self, stage: int, stages: int) -> float:
        """Fraction of the input patch tokens the ratio loss aims at after ``stage`` (0-based) of ``stages``.

        Example:
            >>> from hf_tokred import TokenReductionConfig
            >>> TokenReductionConfig(method="madtp", keep=0.25).stage_target(0, 2)
            0.5
        """
        return self.base_ratio(stages) ** (stage + 1)

    def schedule(self, num_blocks: int) -> list[float | None]:
        """The base ratio at the pruning blocks, None elsewhere (all None when ``keep`` is 1)."""
        layers = self.reducing_layers(num_blocks)
        ratio = self.base_ratio(len(layers))
        return [ratio if (i in layers and self.keep < 1.0) else None for i in range(num_blocks)]

    # -- learned parts and hooks ----------------------------------------------------------------

    def _check_adapter(self, model, adapter) -> None:
        if getattr(adapter, "name", None) not in SUPPORTED_ADAPTERS:
            raise UnsupportedModelError(
                f"madtp acts on the vision encoder of BLIP and BLIP-2 ({', '.join(SUPPORTED_CLASSES)}); "
                f"{type(model).__name__} is a {adapter.kind} model ({adapter.name})")

    def learned_modules(self, model, adapter) -> dict[str, nn.Module]:
        """The MAG and DTP heads, on the device and dtype of the vision blocks.

        Example:
            >>> modules = cfg.learned_modules(blip, adapter)        # doctest: +SKIP
            >>> list(modules)                                       # doctest: +SKIP
            ['madtp']
        """
        self._check_adapter(model, adapter)
        blocks = adapter.blocks(model)
        if not blocks:
            raise UnsupportedModelError(f"madtp: no vision blocks found at {adapter.layers!r} in {type(model).__name__}")
        stages = self.reducing_layers(len(blocks))
        config = model.config
        vision = getattr(config, "vision_config", config)
        text_config = getattr(config, "text_config", None)
        text_dim = getattr(text_config, "hidden_size", None) if text_config is not None else None
        if self.guidance == "text" and text_dim is None:
            raise UnsupportedModelError(f"guidance: {type(model).__name__} has no text side to guide madtp; use "
                                        "guidance='vision' or 'auto'")
        heads = MADTPHeads(int(vision.hidden_size), None if self.guidance == "vision" else text_dim, stages,
                           align_dim=self.align_dim, num_concepts=self.num_concepts, hidden=self.ratio_hidden)
        heads.train(model.training)
        parameter = next(blocks[0].parameters(), None)
        if parameter is not None:
            heads.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else None)
        return {MODULE_NAME: heads}

    def install(self, model, adapter, applied) -> None:
        """Hooks that compute the text guidance once per call, before the vision encoder runs: a forward pre-hook
        (and an always-run forward hook) on the model and a wrapper of its ``generate``; all undone by ``remove()``.
        Called by the sequence wiring after the block hooks.

        Example:
            >>> hf_tokred.apply(blip, {"method": "madtp", "keep": 0.5})   # installs them          # doctest: +SKIP
        """
        self._check_adapter(model, adapter)
        if not any(self.schedule(len(adapter.blocks(model)))) or adapter.name not in ("blip", "blip_2"):
            return  # nothing pruned, or a vision model on its own (no text, no cross-attention)
        _mask_filler_slots(model, adapter, applied)
        if self.guidance == "vision":
            return

        from ...integration.wiring import MODULES_ATTR

        def heads():
            holder = model._modules.get(MODULES_ATTR)
            return None if holder is None or MODULE_NAME not in holder else holder[MODULE_NAME]

        forward_signature = inspect.signature(type(model).forward)

        def pre_hook(module, args, kwargs):
            target = heads()
            if target is not None:
                target._guidance.append(_guidance_from_call(module, adapter, forward_signature, args, kwargs))
            return None

        def post_hook(module, args, kwargs, output):
            target = heads()
            if target is not None and target._guidance:
                target._guidance.pop()
            return None

        pre = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
        post = model.register_forward_hook(post_hook, with_kwargs=True, always_call=True)
        applied.add_undo(pre.remove)
        applied.add_undo(post.remove)

        if not callable(getattr(type(model), "generate", None)):
            return
        previous = model.__dict__.get("generate")
        generate_signature = inspect.signature(type(model).generate)

        def generate(self_, *args, **kwargs):
            target = heads()
            if target is not None:
                target._guidance.append(_guidance_from_call(self_, adapter, generate_signature, args, kwargs))
            try:
                if previous is not None:
                    return previous(*args, **kwargs)
                return type(self_).generate(self_, *args, **kwargs)
            finally:
                if target is not None and target._guidance:
                    target._guidance.pop()

        model.generate = types.MethodType(generate, model)

        def undo_generate():
            if previous is not None:
                model.__dict__["generate"] = previous
            else:
                model.__dict__.pop("generate", None)

        applied.add_undo(undo_generate)

    # -- the decision ---------------------------------------------------------------------------

    def plan(self, ctx):
        """One pruning layer: alignment scores and an instance ratio; a straight-through soft mask (training) or a
        hard drop of each row's lowest-aligned patch tokens (inference)."""
        if getattr(self, "_dense", False):
            return None
        heads = ctx.learned_part(MODULE_NAME, "heads")
        stage = heads.stage_of(ctx.block)
        hidden = ctx.hidden
        batch = ctx.batch_size
        device = hidden.device
        text, has_text = None, None
        guidance = heads.current_guidance() if self.guidance != "vision" else None
        if guidance is not None and guidance[0] is not None:
            text, has_text = guidance
            if text.shape[0] != batch:
                raise TokenReductionError(f"madtp: the call carries text for {text.shape[0]} rows but the vision "
                                          f"encoder runs on {batch} images; pass one text per image")
        if self.guidance == "text" and (text is None or not bool(has_text.all())):
            raise TokenReductionError("guidance: madtp is set to guidance='text' but this call carries no text for "
                                      "some image (pass input_ids, or use guidance='auto')")
        real, candidates = ctx.real_and_candidates()
        record = ctx.state.records.setdefault(RECORD_KEY, [])
        training = heads.training
        policy = None
        if training and record and record[-1].policy is not None:
            policy = record[-1].policy
            candidates &= policy.detach() > 0.5
        counts = candidates.sum(dim=1)
        base = float(ctx.amount)
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            score, projected, guide = heads.alignment(stage, hidden, text, has_text)
            ratio = heads.ratios(stage, hidden, _complexity(score, candidates, base), base, self.spread)
        kept = _counts(ratio, counts)
        text_rows = has_text if has_text is not None else torch.zeros(batch, dtype=torch.bool, device=device)
        if not training:
            record.append(StageDecision(ctx.block, ratio.detach(), kept, counts, has_text=text_rows))
            return keep_top(score.detach().float(), kept, ctx.protected, ctx.valid)
        # Training: hard top-k forward (as at inference), sigmoid relaxation backward.
        rankable = candidates.clone()
        rankable[:, : ctx.protected] = real[:, : ctx.protected]
        hard = (keep_top(score.detach().float(), kept, ctx.protected, rankable).slot_of() >= 0) & candidates
        z = score.float()
        weight = candidates.float()
        mean = (z * weight).sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1)
        std = (((z - mean) * weight).square().sum(1, keepdim=True) / weight.sum(1, keepdim=True).clamp_min(1)).sqrt()
        z = (z - mean) / std.clamp_min(1e-6)
        theta = _soft_quantile(z, candidates, ratio)
        soft = torch.sigmoid((z - theta[:, None]) / self.tau)
        decision = hard.float() + soft - soft.detach()
        decision = torch.where(candidates, decision, torch.ones_like(decision)).to(hidden.dtype)
        previous = policy if policy is not None else real.to(hidden.dtype)
        new_policy = previous * decision
        kept_weight = (new_policy * candidates)[..., None].to(projected.dtype)
        pooled = (projected * kept_weight).sum(1) / kept_weight.sum(1).clamp_min(1e-6)
        record.append(StageDecision(ctx.block, ratio, kept, counts, new_policy, pooled, guide, text_rows))
        return SoftMask(key_weight=decision, keep_self=True)


# The modules that cross-attend to the vision encoder's output, by family: they get an all-ones image mask from
# the model, which must not let them see the filler slots of rows that kept fewer tokens than others.
_IMAGE_READERS = {"blip": ("text_encoder", "text_model", "text_decoder"), "blip_2": ("qformer",)}


def _mask_filler_slots(model, adapter, applied) -> None:
    """Forward pre-hooks on the modules that cross-attend to the image tokens (BLIP's text encoder, or the captioning
    decoder; BLIP-2's Q-Former) replacing the all-ones ``encoder_attention_mask`` the model builds by the real-token
    mask of the pruned image sequence, so rows that keep fewer tokens than the longest row ignore their filler slots.
    (``BlipForQuestionAnswering``'s decoder reads the question, not the image: it is not hooked.)"""
    from ...integration.encoders import STATE_ATTR

    names = [n for n in _IMAGE_READERS[adapter.name] if isinstance(getattr(model, n, None), nn.Module)]
    if "text_decoder" in names and len(names) > 1:
        names.remove("text_decoder")

    def hook(module, args, kwargs):
        image = kwargs.get("encoder_hidden_states")
        state = model.__dict__.get(STATE_ATTR)
        if image is None or state is None or state.size is None or not state.padded:
            return None
        valid = state.size[..., 0] > 0
        if image.dim() != 3 or image.shape[1] != valid.shape[1] or image.shape[0] % valid.shape[0]:
            return None
        valid = valid.repeat_interleave(image.shape[0] // valid.shape[0], dim=0).to(image.device)
        given = kwargs.get("encoder_attention_mask")
        mask = valid.long() if given is None else given * valid.to(given.dtype)
        return args, {**kwargs, "encoder_attention_mask": mask}

    def cross_hook(module, args, kwargs):
        # transformers' BlipTextAttention hands the (image) mask to its cross-attention as `attention_mask`, which
        # BlipTextSelfAttention then drops in favour of its unset `encoder_attention_mask`: pass it where it is read.
        state = model.__dict__.get(STATE_ATTR)
        if (state is None or not state.padded or kwargs.get("encoder_hidden_states") is None
                or kwargs.get("encoder_attention_mask") is not None or kwargs.get("attention_mask") is None):
            return None
        return args, {**kwargs, "encoder_attention_mask": kwargs["attention_mask"]}

    for name in names:
        reader = getattr(model, name)
        handles = [reader.register_forward_pre_hook(hook, with_kwargs=True)]
        if adapter.name == "blip":
            handles += [m.register_forward_pre_hook(cross_hook, with_kwargs=True)
                        for path, m in reader.named_modules() if path.endswith("crossattention.self")]
        for handle in handles:
            applied.add_undo(handle.remove)


def _guidance_from_call(model, adapter, signature, args, kwargs):
    """``(text_features (B, D), has_text (B,))`` for a call of ``model`` (its forward or generate), or ``(None, None)``."""
    try:
        bound = signature.bind_partial(model, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    input_ids = bound.get("input_ids", kwargs.get("input_ids"))
    mask = bound.get("attention_mask", kwargs.get("attention_mask"))
    if isinstance(input_ids, list):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2:
        return None, None
    with torch.no_grad():
        return text_features(model, adapter.name, input_ids, mask)


def text_features(model, family: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """The text representation MADTP aligns the image tokens with: ``(features (B, D_text), has_text (B,))``.

    BLIP with a text encoder: the CLS state of the text encoder run without the image. Otherwise (BLIP's captioning
    decoder prompt, BLIP-2's language-model prompt): the mean input embedding of the real text tokens (image
    placeholders and BOS left out); a row with none has ``has_text`` False.

    Example:
        >>> feats, has_text = text_features(blip, "blip", inputs["input_ids"], inputs["attention_mask"])  # doctest: +SKIP
    """
    device = input_ids.device
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    encoder = getattr(model, "text_encoder", None) or getattr(model, "text_model", None)
    if family == "blip" and encoder is not None:
        out = encoder(input_ids=input_ids, attention_mask=mask.long())
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, 0], mask.any(dim=1)
    embeddings = model.get_input_embeddings()(input_ids.to(model.get_input_embeddings().weight.device))
    real = mask.to(embeddings.device).clone()
    config = model.config
    for name in ("image_token_id", "image_token_index"):
        token = getattr(config, name, None)
        if isinstance(token, int):
            real &= input_ids.to(real.device) != token
    text_config = getattr(config, "text_config", None)
    bos = getattr(text_config, "bos_token_id", None)
    if isinstance(bos, int):
        real &= input_ids.to(real.device) != bos
    weight = real[..., None].to(embeddings.dtype)
    features = (embeddings * weight).sum(1) / weight.sum(1).clamp_min(1)
    return features.to(device), real.any(dim=1).to(device)


def stage_decisions(model) -> list[StageDecision]:
    """The pruning decisions of the last forward pass (one :class:`StageDecision` per pruning layer).

    Example:
        >>> [d.kept.tolist() for d in stage_decisions(blip)]          # doctest: +SKIP
        [[46, 41], [33, 27], [23, 19]]
    """
    from ...integration.encoders import STATE_ATTR

    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise TokenReductionError(f"stage_decisions: {type(model).__name__} has no madtp reduction attached")
    return list(state.records.get(RECORD_KEY, []))


def ratio_loss(records: list[StageDecision], targets: list[float]) -> torch.Tensor:
    """Squared gap between the batch-mean fraction of patch tokens kept after each layer (the product of the
    instance ratios so far) and its target, averaged over layers. Only the mean is held: instances may differ.

    Example:
        >>> import torch
        >>> r = [StageDecision(1, torch.tensor([0.5, 0.7]), torch.tensor([2, 3]), torch.tensor([4, 4]))]
        >>> round(ratio_loss(r, [0.5]).item(), 4)
        0.01
    """
    if not records:
        raise TokenReductionError("ratio_loss: no decisions recorded; run a forward pass with the madtp heads in "
                                  "training mode")
    cumulative = torch.ones_like(records[0].ratio)
    losses = []
    for record, target in zip(records, targets):
        cumulative = cumulative * record.ratio
        losses.append((cumulative.mean() - target).square())
    return torch.stack(losses).mean()


def alignment_loss(records: list[StageDecision], temperature: float = 0.1) -> torch.Tensor:
    """MAG's alignment objective: symmetric InfoNCE, within the batch, between the pooled aligned visual tokens of
    each layer and the text guidance of the same row (rows with text only; 0 with fewer than two such rows).

    Example:
        >>> import torch
        >>> g = torch.eye(2)
        >>> r = StageDecision(1, torch.ones(2), torch.ones(2), torch.ones(2), pooled=g, guide=g,
        ...                   has_text=torch.tensor([True, True]))
        >>> alignment_loss([r]).item() < 0.01
        True
    """
    losses = []
    for record in records:
        if record.pooled is None or record.has_text is None or int(record.has_text.sum()) < 2:
            continue
        rows = record.has_text
        a = torch.nn.functional.normalize(record.pooled[rows].float(), dim=-1)
        b = torch.nn.functional.normalize(record.guide[rows].float(), dim=-1)
        logits = a @ b.t() / temperature
        labels = torch.arange(logits.shape[0], device=logits.device)
        losses.append(0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                             + torch.nn.functional.cross_entropy(logits.t(), labels)))
    if not losses:
        device = records[0].ratio.device if records else None
        return torch.zeros((), device=device)
    return torch.stack(losses).mean()


__all__ = ["MADTPConfig", "MADTPHeads", "MADTPStage", "StageDecision", "alignment_loss", "ratio_loss",
           "stage_decisions", "text_features"]

"""Wiring of the visual stage: visual-token methods on vision-language models (LLaVA, Qwen2-VL, ...).

:func:`wire_visual` (registered for the ``"visual"`` stage) reuses the prefill engine of
:mod:`hf_tokred.integration.prefill` (:class:`~hf_tokred.integration.prefill.LazyPrefill`): torch hooks on the
language model's decoder layers prune tokens during prefill, later layers get their per-token arguments --
attention mask, ``(cos, sin)`` (Qwen2-VL's M-RoPE computed by the model on the full layout), position ids --
gathered to the kept tokens, the cache of every layer after the cut holds only the kept tokens (a slot-tracking
:class:`~hf_tokred.kv.cache.TokenReductionCache`, built by ``generate()`` alone or with a composed KV policy and
storage), and the last layer's output gets the input's length back. What this module adds:

* a forward pre-hook on the top-level model records each call's ``input_ids``, so every row's visual positions
  are its placeholder ids (``config.image_token_id``, and Qwen2-VL's ``video_token_id`` inside the LLM);
* **inside the LLM** (:class:`~hf_tokred.vlm.base.InLLMConfig`: FastV, SparseVLM, IVTP): observers on the
  observed layers' attention build a :class:`~hf_tokred.vlm.base.LayerAttention` and ask the method for scores;
  at a pruning layer each row keeps ``ceil(keep * its visual tokens)`` by score (text tokens always go on), plus
  the carriers of the method's :meth:`recycle`;
* **before the LLM** (:class:`~hf_tokred.vlm.base.BeforeLLMConfig`: VisionZip, PruMerge, Turbo): observers on the
  vision tower's scoring layer record, per image, the CLS attention (or attention received) and the keys; the
  architecture's record (:mod:`hf_tokred.model_patches.vlm`) maps them onto the features' order; a pre-hook on the
  first decoder layer hands each image's tokens to the method and gathers the sequence to what it keeps (merged
  tokens carry their new hidden states), so the language model never computes the others.

Example:
    >>> model = hf_tokred.apply(llava, {"method": "fastv", "k": 2, "keep": 0.5})            # doctest: +SKIP
    >>> model.generate(**inputs, max_new_tokens=20)                                          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading

import torch

from ..attention import AttentionObserver, add_observer, mask_keep, remove_observer
from ..compat import cache_in
from ..errors import ConfigError, TokenReductionError, UnsupportedModelError
from ..kv.cache import ReducingLayer
from ..methods.prompt.lazyllm import select_kept
from ..model_patches.vlm import inner_model, vision_record
from ..vlm.base import (
    BeforeLLMConfig,
    ImageTokens,
    InLLMConfig,
    KeepRecord,
    LayerAttention,
    LearnedInLLMConfig,
    VisualTokenConfig,
)
from .prefill import LazyPrefill, _Pass, _rows
from .transformers import install_generate
from .wiring import MODULES_ATTR, register_wiring

# Attribute of a model carrying a visual method: its engine (for the training losses' records).
ENGINE_ATTR = "_hf_tokred_visual"


def visual_token_ids(model, record, include_video: bool = True) -> list[int]:
    """The placeholder ids of visual tokens in ``model``'s ``input_ids``.

    Example:
        >>> visual_token_ids(llava, vision_record(llava, "fastv"))               # doctest: +SKIP
        [32000]
    """
    config = model.config
    ids = []
    for name in record.token_ids + (record.video_ids if include_video else ()):
        value = getattr(config, name, None)
        if value is None and name == "image_token_id":
            value = getattr(config, "image_token_index", None)
        if isinstance(value, int):
            ids.append(value)
    if not ids:
        raise UnsupportedModelError(f"{type(model).__name__}: its config has no {' / '.join(record.token_ids)}, so "
                                    "its visual tokens cannot be found")
    return ids


class _TowerScores(AttentionObserver):
    """Records, per attention call of the tower's scoring layer, each token's importance and the head-mean keys."""

    def __init__(self, owner: VisualPrefill):
        self.owner = owner

    def observe(self, module, query, key, value, attention_mask) -> None:
        calls = self.owner.tower_calls()
        if calls is None:
            return
        with torch.no_grad():
            calls.append(tower_importance(query, key, getattr(module, "scaling", None) or query.shape[-1] ** -0.5,
                                          attention_mask, self.owner.record.cls_token))


def tower_importance(query: torch.Tensor, key: torch.Tensor, scaling: float, attention_mask=None,
                     cls_token: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance (b, t), keys (b, t, dk))`` of a tower attention call: the CLS query's attention to every
    token (``cls_token``), else the mean attention each token receives from the visible queries; averaged over
    heads. Keys are averaged over heads.

    Example:
        >>> import torch
        >>> importance, keys = tower_importance(torch.zeros(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0.5)
        >>> importance.tolist()
        [[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]]
    """
    batch, heads, tokens, dim = query.shape
    key_f = key.float()
    if key.shape[1] != heads:
        key_f = key_f.repeat_interleave(heads // key.shape[1], dim=1)
    visible = mask_keep(attention_mask)[:, :, :, -tokens:] if attention_mask is not None else None
    if cls_token:
        logits = (query[:, :, :1].float() @ key_f.transpose(-1, -2)) * scaling
        if visible is not None:
            logits = logits.masked_fill(~visible[:, :, :1].expand_as(logits), float("-inf"))
        importance = logits.softmax(dim=-1).nan_to_num_(0.0).mean(dim=1)[:, 0]
    else:
        importance = query.new_zeros(batch, tokens, dtype=torch.float32)
        seen_queries = torch.zeros(batch, 1, dtype=torch.float32, device=query.device)
        for chunk in torch.arange(tokens, device=query.device).split(512):
            logits = (query[:, :, chunk].float() @ key_f.transpose(-1, -2)) * scaling
            if visible is not None:
                seen = visible[:, :, chunk] if visible.shape[2] > 1 else visible
                logits = logits.masked_fill(~seen.expand_as(logits), float("-inf"))
                real = seen.any(dim=-1).float().amax(dim=1)  # (b, chunk) queries that see anything
            else:
                real = torch.ones(batch, chunk.numel(), device=query.device)
            probs = logits.softmax(dim=-1).nan_to_num_(0.0).mean(dim=1)  # (b, chunk, t)
            importance += (probs * real[..., None]).sum(dim=1)
            seen_queries += real.sum(dim=-1, keepdim=True)
        importance = importance / seen_queries.clamp(min=1)
    return importance, key.float().mean(dim=1)


class VisualPrefill(LazyPrefill):
    """The hooks of one vision-language model carrying a visual-token method (see the module docstring)."""

    def __init__(self, model, adapter, config: VisualTokenConfig):
        self.record = vision_record(model, config.method)
        self.before = isinstance(config, BeforeLLMConfig)
        self.token_ids = visual_token_ids(model, self.record, include_video=not self.before)
        images = visual_token_ids(model, self.record, include_video=False)
        self.video_ids = sorted(set(visual_token_ids(model, self.record)) - set(images))
        super().__init__(model, adapter, config)
        self.inner = inner_model(model)
        self._ids: dict[int, torch.Tensor | None] = {}
        self._tower: dict[int, list] = {}
        self._signals: dict[int, list] = {}
        self._by_feature: dict[int, dict] = {}
        self.learned = isinstance(config, LearnedInLLMConfig)
        self.decode_at = config.decode_layer(self.num_layers) if self.learned else None
        self._records: dict[int, list] = {}
        self._answers: dict[int, torch.Tensor | None] = {}
        self._dense: dict[int, bool] = {}

    def _resolve_stages(self) -> list[tuple[int, float]]:
        if self.before:
            return [(-1, self.config.keep)] if self.config.keep < 1.0 else []
        return self.config.resolve_schedule(self.num_layers)

    # -- recording the call ------------------------------------------------------------------

    def install(self, applied) -> None:
        handle = self.model.register_forward_pre_hook(self._record_ids, with_kwargs=True)
        applied.add_undo(handle.remove)
        super().install(applied)
        setattr(self.model, ENGINE_ATTR, self)
        applied.add_undo(lambda: self.model.__dict__.pop(ENGINE_ATTR, None))
        if self.learned:
            self._install_learned(applied)

    def learned_module(self):
        """The method's learned modules (``model.hf_tokred_modules[method]``), or None."""
        modules = self.model._modules.get(MODULES_ATTR)
        return modules[self.config.method] if modules is not None and self.config.method in modules else None

    def records(self) -> list[KeepRecord]:
        """The soft decisions of this thread's last training-mode forward pass (empty after an inference pass)."""
        return self._records.get(threading.get_ident(), [])

    def _start(self, module, args, kwargs):
        if self._dense.get(threading.get_ident()):
            return None  # a dense pass (the training teacher): nothing is scored or dropped
        return super()._start(module, args, kwargs)

    @contextlib.contextmanager
    def dense(self):
        """Within this block the method does nothing in this thread: the model runs densely (the teacher)."""
        key = threading.get_ident()
        previous = self._dense.get(key, False)
        self._dense[key] = True
        try:
            yield
        finally:
            self._dense[key] = previous

    def set_answers(self, answers: torch.Tensor | None) -> None:
        """Training: mark the answer tokens ``(batch, length)`` of the next forward pass, whose visibility a
        decoding-time predictor learns (None: no answer tokens)."""
        self._answers[threading.get_ident()] = answers

    def _record_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids[threading.get_ident()] = ids if isinstance(ids, torch.Tensor) else None

    def _begin(self, state: _Pass, kwargs: dict) -> None:
        ids = self._ids.get(threading.get_ident())
        method = self.config.method
        if ids is None:
            raise TokenReductionError(f"{method}: the call has no input_ids, so the visual tokens cannot be found "
                                      "(pass input_ids rather than inputs_embeds)")
        ids = ids.to(state.rows.device)
        if ids.shape[-1] != state.length:
            raise TokenReductionError(f"{method}: the language model received {state.length} tokens for "
                                      f"{ids.shape[-1]} input ids")
        ids = ids.expand(state.rows.shape[0], -1)
        state.visual = torch.isin(ids, torch.tensor(self.token_ids, device=ids.device)) & state.valid
        state.visual_count = state.visual.sum(dim=-1)
        state.memory = {}
        state.inputs = {}
        state.soft_masks = []
        module = self.learned_module() if self.learned else None
        if self.learned and module is None:
            raise TokenReductionError(f"{method}: the model has no learned modules (model.{MODULES_ATTR}[{method!r}]); "
                                      "apply the method with hf_tokred.apply or from_pretrained")
        state.memory["modules"] = module
        state.soft = module is not None and module.training
        records = state.memory["records"] = []
        self._records[threading.get_ident()] = records
        answers = self._answers.get(threading.get_ident())
        state.answers = None if answers is None else answers.to(ids.device).bool() & state.valid
        if self.before:
            video = self.video_ids
            if video and bool(torch.isin(ids, torch.tensor(video, device=ids.device)).any()):
                raise UnsupportedModelError(f"{method}: acts on images before the language model; this prompt holds "
                                            "video tokens, which it does not score (use an in-LLM method: fastv, "
                                            "sparsevlm, ivtp)")

    # -- scoring -------------------------------------------------------------------------------

    def _install_scoring(self, applied) -> list:
        if self.before:
            self._wrap_image_features(applied)
            tower = self.inner.get_submodule(self.record.tower)
            blocks = tower.get_submodule(self.record.blocks)
            layer = self.record.scoring_layer(self.model)
            if not 0 <= layer < len(blocks):
                raise UnsupportedModelError(f"{self.config.method}: the vision tower has {len(blocks)} layers; its "
                                            f"features come from layer {layer}")
            module = blocks[layer].get_submodule(self.record.attention)
            observer = _TowerScores(self)
            add_observer(module, observer)
            applied.add_undo(lambda: remove_observer(module, observer))
            return [self.blocks[0].register_forward_pre_hook(self._prune_before, with_kwargs=True)]
        handles = []
        for layer in sorted(set(self.config.observed_layers(self.num_layers)) | set(self.stages)):
            observer = _LayerScores(self, layer)
            add_observer(self.attention[layer], observer)
            applied.add_undo(lambda m=self.attention[layer], o=observer: remove_observer(m, o))
            handles.append(self.blocks[layer].register_forward_pre_hook(self._make_record_input(layer),
                                                                        with_kwargs=True))
        for layer in self.stages:
            handles.append(self.blocks[layer].register_forward_hook(self._make_prune(layer), with_kwargs=True))
        return handles

    def _make_record_input(self, layer: int):
        def hook(module, args, kwargs):
            state = self.current()
            if state is not None and state.mode == "prune":
                state.inputs[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _wrap_image_features(self, applied) -> None:
        """Arm the tower observer for each ``get_image_features`` call and assemble its per-image scores."""
        inner, owner = self.inner, self
        original = inner.get_image_features
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_image_features(*args, **kwargs):
            key = threading.get_ident()
            owner._tower[key] = []
            try:
                output = original(*args, **kwargs)
                arguments = signature.bind_partial(*args, **kwargs).arguments
                arguments.update(arguments.pop("kwargs", {}))
                calls = owner._tower[key]
                images = owner.record.assemble(inner, calls, arguments) if calls else []
                owner._signals.setdefault(key, []).extend(images)
                owner._remember(output, images)
            finally:
                owner._tower.pop(key, None)
            return output

        inner.get_image_features = get_image_features
        applied.add_undo(lambda: inner.__dict__.pop("get_image_features", None))
        handle = inner.register_forward_pre_hook(self._gather_signals, with_kwargs=True)
        applied.add_undo(handle.remove)

    def _remember(self, output, images: list) -> None:
        """Pair the images' scores with the feature tensors ``get_image_features`` returned, so a call that gets
        those features pre-encoded (``generate()`` encodes images before prefill and repeats them for beams) finds
        its scores again."""
        known = self._by_feature[threading.get_ident()] = []
        cursor = 0
        for entry in _feature_entries(getattr(output, "pooler_output", None)):
            group, tokens = [], 0
            while cursor < len(images) and tokens < entry.shape[0]:
                group.append(images[cursor])
                tokens += images[cursor].importance.shape[0]
                cursor += 1
            if tokens != entry.shape[0]:
                return  # not a per-image list this record understands: pre-encoded calls will report the mismatch
            known.append((entry, group))

    def _gather_signals(self, module, args, kwargs):
        """Before the multimodal model runs: this call's image scores are those of its pre-encoded features, or
        (features computed inside the call) those the tower is about to produce."""
        key = threading.get_ident()
        self._signals[key] = []
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        known = self._by_feature.get(key, [])
        for entry in _feature_entries(getattr(encoded, "pooler_output", None)):
            # The same tensor, or (beam search repeats a batch's features) an equal one.
            group = next((g for e, g in known if e is entry), None) or next(
                (g for e, g in known if e.shape == entry.shape and torch.equal(e, entry)), None)
            if group is None:
                self._signals[key] = []  # features from elsewhere: _choose_image_tokens reports the mismatch
                return
            self._signals[key].extend(group)

    def _install_learned(self, applied) -> None:
        first = min(self.stages) if self.stages else self.num_layers
        if self.decode_at is not None:
            first = min(first, self.decode_at)
            handle = self.blocks[self.decode_at].register_forward_hook(self._decode_decisions, with_kwargs=True)
            applied.add_undo(handle.remove)
            handle = self.blocks[-1].register_forward_hook(self._hide_dropped, with_kwargs=True)
            applied.add_undo(handle.remove)
        for layer in range(first + 1, self.num_layers):
            observer = _SoftBias(self, layer)
            add_observer(self.attention[layer], observer)
            applied.add_undo(lambda m=self.attention[layer], o=observer: remove_observer(m, o))

    def _decode_decisions(self, module, args, kwargs, output):
        """After the decoding predictor's layer: training, soft keep masks of the answer tokens; decoding, whether
        the new token stays visible to later steps."""
        hidden = output[0] if isinstance(output, tuple) else output
        state = self.current()
        key = threading.get_ident()
        if state is not None and state.soft:
            answers = state.answers
            if answers is None:
                return None
            rows = answers.gather(-1, state.rows - state.past)
            keep = self.config.decode_keep(hidden, state.memory)
            state.memory["records"].append(KeepRecord(self.decode_at, keep, rows, self.config.decode_target))
            state.soft_masks.append((self.decode_at, torch.where(rows, keep, torch.ones_like(keep))))
            return None
        cache = cache_in(kwargs)
        if state is None and hidden.shape[1] == 1 and cache is not None and cache.get_seq_length() > 0:
            modules = self.learned_module()
            with torch.no_grad():
                keep = self.config.decode_keep(hidden, {"modules": modules})[:, -1]
            self._pending_drop = (key, cache, keep < 0.5)
        return None

    def _hide_dropped(self, module, args, kwargs, output):
        pending = getattr(self, "_pending_drop", None)
        if pending is None or pending[0] != threading.get_ident():
            return None
        self._pending_drop = None
        _, cache, dropped = pending
        if not bool(dropped.any()):
            return None
        for j in range(self.decode_at + 1, self.num_layers):
            layer = cache.layers[j]
            if isinstance(layer, ReducingLayer) and layer.valid is not None:
                layer.valid[dropped, :, -1] = False  # the step's slot: later steps no longer attend to it
        return None

    def tower_calls(self) -> list | None:
        return self._tower.get(threading.get_ident())

    # -- pruning inside the LLM ------------------------------------------------------------------

    def _make_prune(self, layer: int):
        prune = super()._make_prune(layer)

        def hook(module, args, kwargs, output):
            state = self.current()
            if state is not None and getattr(state, "soft", False):
                return None  # training: nothing is dropped, later layers see the soft masks
            return prune(module, args, kwargs, output)
        return hook

    def _select(self, state: _Pass, layer: int, scores: torch.Tensor, hidden: torch.Tensor):
        visual = state.visual.gather(-1, state.rows - state.past) & state.valid
        keep = self.stages[layer]
        counts = None
        if self.learned:
            counts = self.config.kept_counts(scores, visual, layer, state.memory)
        if counts is None:
            counts = torch.tensor([self.config.kept_count(int(n), keep) for n in state.visual_count.tolist()],
                                  device=scores.device)
        counts = torch.minimum(counts.to(scores.device), visual.sum(dim=-1))
        ranked = torch.where(visual, scores.float(), -torch.inf)
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                                .expand_as(order))
        kept = (state.valid & ~visual) | (visual & (rank < counts[:, None]))
        replaced = None
        for row in range(kept.shape[0]):
            dropped = visual[row] & ~kept[row]
            if not bool(dropped.any()):
                continue
            carried = self.config.recycle(hidden[row], scores[row], dropped)
            if carried is None:
                continue
            carriers, carrier_hidden = carried
            if carriers.numel() == 0:
                continue
            if not bool(dropped[carriers].all()):
                raise RuntimeError(f"{self.config.method}.recycle: a carrier is not among the dropped tokens")
            kept[row, carriers] = True
            if replaced is None:
                replaced = hidden.clone()
            replaced[row, carriers] = carrier_hidden.to(hidden.dtype)
        state.replaced = replaced
        return _kept_index(kept, state)

    def _drop(self, state: _Pass, layer: int, index, index_valid, hidden):
        replaced = getattr(state, "replaced", None)
        state.replaced = None
        gathered = super()._drop(state, layer, index, index_valid, hidden)
        if gathered is None or replaced is None:
            return gathered
        return replaced.gather(1, _rows(index, replaced.shape[-1]))

    # -- pruning before the LLM ------------------------------------------------------------------

    def _prune_before(self, module, args, kwargs):
        state = self.current()
        key = threading.get_ident()
        signals = self._signals.pop(key, [])
        if state is None or state.mode != "prune":
            return None
        images = state.visual  # before the LLM the visual tokens are the image placeholders only
        if not bool(images.any()):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            kept, replaced = self._choose_image_tokens(images, signals, hidden, state)
            state.replaced = replaced
            index, index_valid = _kept_index(kept, state)
            gathered = self._drop(state, -1, index, index_valid, hidden)
        if gathered is None:
            return None
        if args:
            return (gathered, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": gathered}

    def _choose_image_tokens(self, images: torch.Tensor, signals: list, hidden: torch.Tensor, state: _Pass):
        method = self.config.method
        wanted = int(images.sum())
        available = sum(s.importance.shape[0] for s in signals)
        if available != wanted:
            raise TokenReductionError(
                f"{method}: the prompt holds {wanted} image tokens but the vision tower scored {available} (the tower "
                "ran elsewhere, e.g. image features passed in precomputed, or the image count does not match the "
                "placeholders); pass pixel_values with input_ids whose placeholders match them")
        kept = state.valid & ~images
        replaced = None
        next_image = 0
        for row in range(images.shape[0]):
            positions = images[row].nonzero().flatten()
            start = 0
            while start < positions.numel():
                signal = signals[next_image]
                next_image += 1
                n = signal.importance.shape[0]
                where = positions[start:start + n]
                start += n
                image = ImageTokens(hidden[row, where], signal.importance.to(hidden.device),
                                    signal.keys.to(hidden.device), signal.grid, signal.protected.to(hidden.device))
                count = self.config.kept_count(int((~image.protected).sum()))
                selection = self.config.check_selection(image, self.config.select(image, count), count)
                kept[row, where[selection.index]] = True
                if selection.hidden is not None:
                    if replaced is None:
                        replaced = hidden.clone()
                    replaced[row, where[selection.index]] = selection.hidden.to(hidden.dtype)
        return kept, replaced


class _LayerScores(AttentionObserver):
    """Builds a :class:`LayerAttention` at one observed layer of the language model and asks the method."""

    def __init__(self, owner: VisualPrefill, layer: int):
        self.owner, self.layer = owner, layer

    def observe(self, module, query, key, value, attention_mask) -> None:
        state = self.owner.current()
        if state is None or state.mode != "prune":
            return
        with torch.set_grad_enabled(torch.is_grad_enabled() and state.soft):
            rows = state.rows - state.past
            visual = state.visual.gather(-1, rows) & state.valid
            batch, keys = query.shape[0], key.shape[-2]
            if attention_mask is not None:
                visible = mask_keep(attention_mask)[:, 0, -query.shape[2]:, -keys:].expand(batch, -1, -1)
            else:
                visible = torch.ones(batch, query.shape[2], keys, dtype=torch.bool, device=query.device).tril()
            attention = LayerAttention(query, key, getattr(module, "scaling", None) or query.shape[-1] ** -0.5,
                                       visible, visual, state.valid & ~visual, state.inputs.get(self.layer),
                                       getattr(module, "attn_logit_softcapping", None))
            if state.soft:
                if self.layer in self.owner.stages:
                    keep = self.owner.config.soft_keep(attention, self.layer, state.memory)
                    target = self.owner.stages[self.layer]
                    state.memory["records"].append(KeepRecord(self.layer, keep, visual, target))
                    state.soft_masks.append((self.layer, torch.where(visual, keep, torch.ones_like(keep))))
                return
            scores = self.owner.config.score(attention, self.layer, state.memory)
            if self.layer in self.owner.stages:
                if scores is None or tuple(scores.shape) != (batch, keys):
                    raise RuntimeError(f"{self.owner.config.method}.score: expected ({batch}, {keys}) scores at "
                                       f"pruning layer {self.layer}")
                state.scores[self.layer] = (scores, None)


class _SoftBias(AttentionObserver):
    """Training: adds ``log(keep)`` of the soft masks of earlier stages to the key columns (queries after them)."""

    def __init__(self, owner: VisualPrefill, layer: int):
        self.owner, self.layer = owner, layer

    def prepare(self, module, query, key, value, attention_mask):
        state = self.owner.current()
        if state is None or not getattr(state, "soft", False):
            return attention_mask
        masks = [m for layer, m in state.soft_masks if layer < self.layer]
        if not masks:
            return attention_mask
        keep = masks[0]
        for m in masks[1:]:
            keep = keep * m
        q, k = query.shape[2], key.shape[2]
        if attention_mask is not None:
            visible = mask_keep(attention_mask)[:, :, -q:, -k:]
        else:
            visible = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
        dtype = query.dtype
        floor = torch.finfo(dtype).min
        bias = torch.where(visible, torch.zeros((), dtype=dtype, device=query.device), floor)
        # A token hides from the queries after it, not from its own row (a dropped token is not computed at all).
        later = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q - 1)
        soft = keep[:, None, None, -k:].clamp_min(1e-6).log().to(dtype) * later
        return (bias + soft).clamp_min(floor)


def _feature_entries(pooled) -> list[torch.Tensor]:
    """The per-image (or per-row) feature tensors of a ``get_image_features`` output's ``pooler_output``."""
    if isinstance(pooled, (list, tuple)):
        return list(pooled)
    if isinstance(pooled, torch.Tensor) and pooled.dim() == 3:
        return list(pooled.unbind(0))
    return []


def _kept_index(kept: torch.Tensor, state: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index, index_valid)`` of the slots marked in ``kept`` (``(batch, slots)``), as :func:`select_kept`
    returns them: every row gets the widest row's count, fillers marked invalid."""
    counts = kept.sum(dim=-1)
    return select_kept(kept.float(), state.rows, state.valid, counts, torch.zeros_like(counts), recent=1)


@register_wiring("visual")
def wire_visual(model, adapter, reducer, applied) -> None:
    """Attach a visual-token method: hooks on the language model's layers (and, before the LLM, on the vision
    tower) and a ``generate`` that builds a cache able to hold the reduced prompt. A no-op setting (``keep=1.0``)
    installs nothing (the dense model).

    Example:
        >>> model = hf_tokred.apply(llava, {"method": "visionzip", "keep": 0.25})      # doctest: +SKIP
    """
    if not isinstance(reducer, (BeforeLLMConfig, InLLMConfig)):
        raise UnsupportedModelError(f"{reducer.method}: no visual wiring for this reducer")
    if applied.config.get("prefill") is not None:
        raise ConfigError(f"method: {reducer.method} and {applied.config.get('prefill').method} both prune the prompt "
                          "inside prefill; compose a visual method with KV policies and storage only", field="method")
    prefill = VisualPrefill(model, adapter, reducer)
    if prefill.first is None:
        return
    prefill.install(applied)
    install_generate(model, applied)


__all__ = ["VisualPrefill", "tower_importance", "visual_token_ids", "wire_visual"]

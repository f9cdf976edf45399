"""``hf-tokred vlm-bench``: cost and quality of the visual-token methods on a LLaVA-1.5-shaped model.

The model (:func:`build_llava`) is a ``LlavaForConditionalGeneration`` with LLaVA-1.5's geometry where it sets the
cost: a CLIP ViT-L/14-336 vision tower (24 layers, width 1024, 16 heads, MLP 4096, 336 px images in 14 px patches:
576 visual tokens, features from the second-to-last layer, CLS dropped) and a 2-layer GELU projector, both
random, in front of the embedded SmolLM2-135M-Instruct with its real weights as the language model. Nothing is
downloaded.

**Cost** (:func:`run_cost`): the FLOPs and the prefill time of one image + a short question, dense against each
method at each ``keep`` (fraction of the 576 visual tokens kept), in two scopes: the language-model scope (from the
tower's features to the first logits: projector, token selection, decoder layers, the last position's logits --
the part the methods change) and end to end (tower included). FLOPs are counted analytically
(:func:`lm_flops`, :func:`tower_flops`, :func:`projector_flops`: ``2 * params * tokens`` for every linear layer,
``4 * q * k * width`` for attention) from the tokens each decoder layer received (an in-LLM method's layers
before its cut see every token). Each row reports
the measured speed-up, the FLOP-predicted one and their ratio. Times are the median of ``repeats`` prefills after
two warm-up rounds, the configs taking turns round by round (a slow spell of a shared machine then hits every row
alike), under ``torch.inference_mode``, with the threads torch was given (``OMP_NUM_THREADS``).

**Quality** (:func:`run_quality`), "caption as image": the LLM-side mechanism alone. The features that reach the
language model for the image are SmolLM2's own input embeddings of a short scene description (colours, a count,
a name, a place; :func:`make_sample`, seeded), placed in the 576 visual slots among embeddings of a neutral
filler (:func:`caption_features`, injected by a forward hook on ``multi_modal_projector``). The question, in
SmolLM2-Instruct's chat template after the image, asks for one fact; greedy answers are checked by string match
(:func:`check_answer`). The tower's output is thrown away here, so before-LLM methods (VisionZip, PruMerge,
Turbo) choose tokens from a random tower's signals: their rows measure what that leaves, not the methods.
Samples come from a split: ``heldout`` (seeds from 1000; report these) or ``tune`` (seeds from 0; the filler and
layout were chosen there).

Example:
    >>> from hf_tokred.cli import main
    >>> main(["vlm-bench", "--part", "quality", "--samples", "3"])                      # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from dataclasses import dataclass, field

import torch

from ..recipes import mean_ends

IN_LLM = ("fastv", "sparsevlm", "ivtp")
BEFORE_LLM = ("visionzip", "prumerge", "turbo")
METHODS = IN_LLM + BEFORE_LLM
# Learned in-LLM methods: the quality part trains their modules on the tune split first (opt-in: --methods).
LEARNED = ("atp_llava", "dynamic_llava")
DEFAULT_KEEPS = (1 / 2, 1 / 4, 1 / 9)
PARTS = ("cost", "quality", "both")
SPLITS = {"tune": 0, "heldout": 1000}
DEFAULT_SAMPLES = 24
DEFAULT_REPEATS = 3
MAX_NEW_TOKENS = 8

# LLaVA-1.5's tower: CLIP ViT-L/14 at 336 px (openai/clip-vit-large-patch14-336).
CLIP_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# The placeholder token of the image's slots: a special token of SmolLM2's vocabulary that text never produces.
IMAGE_TOKEN = "<empty_output>"


# ---------------------------------------------------------------------------------------------
# The quality task: a scene description and a question about one of its facts
# ---------------------------------------------------------------------------------------------

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "orange", "purple", "pink", "brown")
OBJECTS = ("car", "ball", "kite", "hat", "umbrella", "bicycle", "boat", "cup", "chair", "door", "bag", "lamp")
ANIMALS = ("dogs", "cats", "birds", "ducks", "horses", "sheep", "cows", "rabbits")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
NAMES = ("Alice", "Maria", "Sara", "Emma", "Lucy", "Anna", "Tom", "David", "John", "Peter", "James", "Paul")
PLACES = ("park", "beach", "garden", "farm", "street", "kitchen", "market", "harbor")
KINDS = ("colour", "count", "name", "place")


@dataclass(frozen=True)
class SceneSample:
    """One quality sample: a scene ``description`` (what the image carries), a ``question`` about one fact, the
    ``expected`` answer and its accepted spellings (``aliases``, e.g. ``"3"`` for ``"three"``), and ``meta``."""

    description: str
    question: str
    expected: str
    aliases: tuple[str, ...]
    kind: str
    answer_start: str
    meta: dict = field(default_factory=dict)


def make_sample(seed: int) -> SceneSample:
    """The scene and question of ``seed`` (the same seed gives the same sample; the question's kind cycles with it).

    Two coloured objects (the question may ask for either colour: the other is a distractor), a group of animals
    (a count), a named person and a place.

    Example:
        >>> from hf_tokred.bench.vlm import make_sample
        >>> sample = make_sample(1)
        >>> sample.kind, sample.expected in sample.description.lower()
        ('count', True)
        >>> make_sample(1) == sample
        True
    """
    rng = random.Random(f"vlm-scene-{seed}")
    colour1, colour2 = rng.sample(COLOURS, 2)
    object1, object2 = rng.sample(OBJECTS, 2)
    animals = rng.choice(ANIMALS)
    count = rng.choice(sorted(NUMBERS))
    name = rng.choice(NAMES)
    person = "woman" if NAMES.index(name) < 6 else "man"
    place = rng.choice(PLACES)
    description = (f"The picture shows a {place}. There is {_a(colour1)} {object1}. "
                   f"{NUMBERS[count].capitalize()} {animals} are next to the {object1}. "
                   f"A {person} named {name} is standing by {_a(colour2)} {object2}.")
    kind = KINDS[seed % len(KINDS)]
    if kind == "colour":
        asked, colour = ((object1, colour1), (object2, colour2))[rng.randrange(2)]
        question, expected, aliases = f"What color is the {asked}?", colour, (colour,)
        start = f"The {asked} is"
    elif kind == "count":
        question, expected, aliases = f"How many {animals} are in the picture?", NUMBERS[count], (NUMBERS[count], str(count))
        start = "There are"
    elif kind == "name":
        question, expected, aliases = f"What is the name of the {person}?", name, (name,)
        start = f"The {person}'s name is"
    else:
        question, expected, aliases = "Where was the picture taken?", place, (place,)
        start = "The picture was taken at the"
    meta = {"seed": seed, "colours": [colour1, colour2], "objects": [object1, object2], "animals": animals,
            "count": count, "name": name, "place": place}
    return SceneSample(description, question, expected, aliases, kind, start, meta)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def check_answer(answer: str, sample: SceneSample) -> bool:
    """Whether ``answer`` holds the expected fact: one of ``sample.aliases`` as a whole word, case-insensitive.

    Example:
        >>> from hf_tokred.bench.vlm import check_answer, make_sample
        >>> sample = make_sample(1)
        >>> check_answer(f"There are {sample.meta['count']} of them.", sample)
        True
        >>> check_answer("I cannot tell.", sample)
        False
    """
    text = answer.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(alias.lower())}(?![a-z0-9])", text) for alias in sample.aliases)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


def build_llava(language_model=None, tokenizer=None, *, vision: dict | None = None, seed: int = 0):
    """``(model, tokenizer)``: a ``LlavaForConditionalGeneration`` with a random CLIP tower and projector in front
    of ``language_model`` (default: the embedded SmolLM2-135M-Instruct, real weights), in eval mode.

    ``vision`` holds ``CLIPVisionConfig`` fields (default :data:`CLIP_L14_336`: 576 visual tokens). The language
    model's weights are copied in with strict key checks (decoder into ``model.language_model``, head into
    ``lm_head``); the image placeholder is :data:`IMAGE_TOKEN`.

    Example:
        >>> from hf_tokred.bench.vlm import build_llava
        >>> model, tokenizer = build_llava()                                                  # doctest: +SKIP
        >>> image_slots(model)                                                                # doctest: +SKIP
        576
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    if language_model is None:
        from hf_tokred.embedded import load_smollm2

        language_model, tokenizer = load_smollm2()
    if tokenizer is None:
        raise ValueError("tokenizer: required with a language_model of your own")
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token for the image placeholders")
    vision_config = CLIPVisionConfig(**(CLIP_L14_336 if vision is None else vision))
    slots = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=language_model.config.to_dict(),
                         image_token_id=image_token_id, image_seq_length=slots, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         tie_word_embeddings=getattr(language_model.config, "tie_word_embeddings", False))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(language_model.dtype)
    model.model.language_model.load_state_dict(language_model.model.state_dict(), strict=True)
    model.lm_head.load_state_dict(language_model.lm_head.state_dict(), strict=True)
    model.generation_config = language_model.generation_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def image_slots(model) -> int:
    """Visual tokens per image of a LLaVA built by :func:`build_llava` (``(image_size / patch_size) ** 2``).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> image_slots(NS(config=NS(vision_config=NS(image_size=336, patch_size=14))))
        576
    """
    vision = model.config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


def prompt_ids(tokenizer, question: str, slots: int, answer_start: str = "") -> torch.Tensor:
    """``(1, n)`` ids of the chat prompt: the image's ``slots`` placeholders, a newline and ``question`` as the user's
    turn, then the assistant's turn opened with ``answer_start``.

    Example:
        >>> ids = prompt_ids(tokenizer, "What color is the car?", 576, "The car is")         # doctest: +SKIP
        >>> int((ids == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)).sum())                  # doctest: +SKIP
        576
    """
    marker = "\x00IMAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{marker}\n{question}"}], tokenize=False,
                                         add_generation_prompt=True) + answer_start
    before, after = text.split(marker)
    encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"]  # noqa: E731
    image = [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * slots
    return torch.tensor([encode(before) + image + encode(after)])


def random_image(model, seed: int = 0) -> torch.Tensor:
    """``(1, 3, H, W)`` seeded Gaussian pixels at the tower's resolution.

    Example:
        >>> random_image(model).shape                                                          # doctest: +SKIP
        torch.Size([1, 3, 336, 336])
    """
    size = model.config.vision_config.image_size
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(model.dtype)


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------


def lm_flops(text_config, layer_tokens: list[int], logits_tokens: int = 1) -> int:
    """FLOPs of a Llama-style decoder's prefill in which layer ``i`` processes ``layer_tokens[i]`` tokens.

    Per layer of ``L`` tokens: ``2 * L * params`` for the linear layers (q, k, v, o projections and the gated
    MLP) and ``4 * L * L * heads * head_dim`` for the attention (scores and weighted values, every key counted);
    plus the vocabulary head on ``logits_tokens`` positions. Norms, RoPE and softmax are left out.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
        ...                   num_hidden_layers=2, vocab_size=10)
        >>> lm_flops(cfg, [4, 4])
        10400
    """
    d, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or d // heads
    kv = text_config.num_key_value_heads or heads
    params = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * text_config.intermediate_size
    total = sum(2 * n * params + 4 * n * n * heads * head_dim for n in layer_tokens)
    return int(total + 2 * d * text_config.vocab_size * logits_tokens)


def tower_flops(vision_config, images: int = 1) -> int:
    """FLOPs of a CLIP vision tower on ``images`` images: the patch embedding and every layer (all of them run,
    even when the features come from an earlier one) on the patches plus the CLS token.

    Example:
        >>> from transformers import CLIPVisionConfig
        >>> tower_flops(CLIPVisionConfig(**CLIP_L14_336)) / 1e9 > 300
        True
    """
    d, inner = vision_config.hidden_size, vision_config.intermediate_size
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens = patches + 1
    embed = 2 * patches * 3 * vision_config.patch_size ** 2 * d
    layer = 2 * tokens * (4 * d * d + 2 * d * inner) + 4 * tokens * tokens * d
    return int(images * (embed + vision_config.num_hidden_layers * layer))


def projector_flops(vision_width: int, text_width: int, tokens: int) -> int:
    """FLOPs of LLaVA's two-layer projector (``vision -> text -> text``) on ``tokens`` visual tokens.

    Example:
        >>> projector_flops(1024, 576, 576) == 2 * 576 * (1024 * 576 + 576 * 576)
        True
    """
    return int(2 * tokens * (vision_width * text_width + text_width * text_width))


def layer_tokens(config, text_tokens: int, visual_tokens: int, num_layers: int) -> list[int]:
    """Tokens each decoder layer processes in prefill under ``config`` (None: dense).

    A before-LLM method sends ``kept_count(visual_tokens)`` to every layer; an in-LLM method sends every token to
    the layers up to each cut of its schedule and the kept fraction after it. Other configs count as dense.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> layer_tokens(None, 10, 576, 4)
        [586, 586, 586, 586]
        >>> layer_tokens(TokenReductionConfig(method="fastv", k=2, keep=0.5), 10, 576, 4)
        [586, 586, 298, 298]
    """
    if config is None:
        return [text_tokens + visual_tokens] * num_layers
    insertion = getattr(config, "insertion", "")
    if insertion == "before_llm":
        return [text_tokens + config.kept_count(visual_tokens)] * num_layers
    if insertion == "in_llm":
        counts = [visual_tokens] * num_layers
        for layer, keep in config.resolve_schedule(num_layers):
            for later in range(layer + 1, num_layers):
                counts[later] = config.kept_count(visual_tokens, keep)
        return [text_tokens + c for c in counts]
    return [text_tokens + visual_tokens] * num_layers


def predicted_flops(model, config, text_tokens: int, counts: list[int] | None = None) -> dict:
    """``{"lm": ..., "e2e": ...}``: FLOPs of one image's prefill under ``config`` (None: dense) in the language-model
    scope (projector, decoder layers, last position's logits) and end to end (plus the tower).

    ``counts`` (tokens per decoder layer, as observed) replaces the config's nominal :func:`layer_tokens` (a
    method with an adaptive count, or one that recycles dropped tokens into carriers, differs from it).

    Example:
        >>> flops = predicted_flops(model, None, 40)                                            # doctest: +SKIP
        >>> flops["e2e"] > flops["lm"]                                                          # doctest: +SKIP
        True
    """
    vision, text = model.config.vision_config, model.config.text_config
    slots = image_slots(model)
    counts = counts or layer_tokens(config, text_tokens, slots, text.num_hidden_layers)
    lm = projector_flops(vision.hidden_size, text.hidden_size, slots) + lm_flops(text, counts)
    return {"lm": lm, "e2e": lm + tower_flops(vision)}


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def keep_label(keep: float) -> str:
    """``1/4`` for 0.25, ``1/9`` for 1/9, else the number.

    Example:
        >>> [keep_label(k) for k in (0.5, 0.25, 1 / 9, 0.3)]
        ['1/2', '1/4', '1/9', '0.3']
    """
    inverse = 1 / keep
    return f"1/{round(inverse)}" if abs(inverse - round(inverse)) < 1e-6 else f"{keep:g}"


def method_configs(methods=METHODS, keeps=DEFAULT_KEEPS, params: dict | None = None) -> list[dict]:
    """The configs of the runs: every method at every keep, with its other settings at their defaults (FastV's
    ``k=2`` at keep 1/2 is the paper's setting) unless ``params`` (method -> {field: value}) sets them.

    Example:
        >>> method_configs(["fastv", "ivtp"], [0.5], {"ivtp": {"group_size": 576}})
        [{'method': 'fastv', 'keep': 0.5}, {'method': 'ivtp', 'keep': 0.5, 'group_size': 576}]
    """
    params = params or {}
    return [{"method": method, "keep": keep, **params.get(method, {})} for keep in keeps for method in methods]


def config_label(config: dict | None) -> str:
    """A row label: ``dense``, or the method and its settings (keep as a fraction).

    Example:
        >>> config_label({"method": "fastv", "keep": 0.25, "k": 3})
        'fastv keep=1/4 k=3'
    """
    if config is None:
        return "dense"
    rest = [f"{k}={keep_label(v) if k == 'keep' else json.dumps(v)}" for k, v in config.items() if k != "method"]
    return " ".join([config["method"], *rest])


def _coerce(config):
    import hf_tokred

    return None if config is None else hf_tokred.TokenReductionConfig.coerce(dict(config))


class _Clock:
    """Hooks that time one prefill: the vision tower's start, the projector's start, the model's end, and the
    tokens each decoder layer receives."""

    def __init__(self, model):
        self.handles = []
        self.reset()
        # generate() may run the tower and projector before the model's forward: time from their own starts
        self.handles.append(model.model.vision_tower.register_forward_pre_hook(lambda *a: self._mark("tower")))
        self.handles.append(model.model.multi_modal_projector.register_forward_pre_hook(
            lambda *a: self._mark("projector")))
        self.handles.append(model.register_forward_hook(lambda *a: self._mark("end")))
        for layer in model.model.language_model.layers:
            # the layer's first op sees what the layer computes on (after any hook of a method on the layer itself)
            self.handles.append(layer.input_layernorm.register_forward_pre_hook(self._tokens, with_kwargs=True))

    def reset(self):
        self.times, self.lengths = {}, []

    def _mark(self, name):
        self.times[name] = time.perf_counter()

    def _tokens(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is not None:
            self.lengths.append(int(hidden.shape[-2]))

    def close(self):
        for handle in self.handles:
            handle.remove()


def measure_prefill(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, configs: list, *,
                    repeats: int = DEFAULT_REPEATS, warmup: int = 2, log=None) -> list[dict]:
    """Median prefill times of one prompt under each of ``configs`` (None: dense), one dict per config: ``e2e_s``
    (the first forward of ``generate(max_new_tokens=1)``: from the tower's start to the first logits), ``lm_s``
    (from the projector's start to the first logits), every timed run, and the tokens each decoder layer received
    (``layer_tokens``).

    The configs take turns: each round attaches every config in order (``hf_tokred.apply``, removed afterwards) and
    prefills once, so a slow spell of a shared machine hits every row alike; ``warmup`` rounds come first.

    Example:
        >>> dense, fastv = measure_prefill(model, ids, random_image(model), [None, {"method": "fastv"}])  # doctest: +SKIP
        >>> fastv["lm_s"] < dense["lm_s"]                                                      # doctest: +SKIP
        True
    """
    from .common import Reduction, median

    log = log or (lambda message: None)
    coerced = [_coerce(config) for config in configs]
    runs = [{"e2e_runs": [], "lm_runs": [], "layer_tokens": []} for _ in configs]
    layers = len(model.model.language_model.layers)
    clock = _Clock(model)
    try:
        with torch.inference_mode():
            for round_ in range(warmup + repeats):
                log(f"cost: round {round_ + 1} of {warmup + repeats} ({'warm-up' if round_ < warmup else 'timed'})")
                for cfg, run in zip(coerced, runs):
                    with Reduction(model, cfg):
                        clock.reset()
                        model.generate(input_ids, pixel_values=pixel_values,
                                       attention_mask=torch.ones_like(input_ids), max_new_tokens=1, do_sample=False)
                    run["layer_tokens"] = clock.lengths[:layers]
                    if round_ >= warmup:
                        run["e2e_runs"].append(clock.times["end"] - clock.times["tower"])
                        run["lm_runs"].append(clock.times["end"] - clock.times["projector"])
    finally:
        clock.close()
    return [{"e2e_s": median(run["e2e_runs"]), "lm_s": median(run["lm_runs"]), **run} for run in runs]


def run_cost(model=None, tokenizer=None, *, methods=METHODS, keeps=DEFAULT_KEEPS, configs=None,
             repeats: int = DEFAULT_REPEATS, warmup: int = 2, log=None) -> dict:
    """FLOPs and prefill time of dense and of every method at every keep (``configs``, a list of config dicts,
    replaces that grid); see the module docstring and :func:`measure_prefill`. ``model`` defaults to
    :func:`build_llava`.

    Example:
        >>> result = run_cost(methods=["fastv"], keeps=[0.25], repeats=3)                     # doctest: +SKIP
        >>> [row["label"] for row in result["rows"]]                                           # doctest: +SKIP
        ['dense', 'fastv keep=1/4']
    """
    if model is None:
        model, tokenizer = build_llava()
    slots = image_slots(model)
    ids = prompt_ids(tokenizer, make_sample(0).question, slots)
    text_tokens = int(ids.shape[-1]) - slots
    configs = [None, *(method_configs(methods, keeps) if configs is None else configs)]
    load_before = os.getloadavg()[0]
    timings = measure_prefill(model, ids, random_image(model), configs, repeats=repeats, warmup=warmup, log=log)
    rows = []
    layers = model.config.text_config.num_hidden_layers
    for config, timing in zip(configs, timings):
        cfg = _coerce(config)
        # FLOPs of what the layers received (an adaptive count or recycled carriers differ from the nominal)
        observed = timing["layer_tokens"] if len(timing["layer_tokens"]) == layers else None
        flops = predicted_flops(model, cfg, text_tokens, observed)
        expected = layer_tokens(cfg, text_tokens, slots, layers)
        row = {"label": config_label(config), "config": config, "flops_lm": flops["lm"], "flops_e2e": flops["e2e"],
               **timing, "expected_layer_tokens": expected}
        if observed != expected:
            row["note"] = "the layers received other token counts than the config's nominal ones"
        rows.append(row)
    dense = rows[0]
    for row in rows:
        for scope in ("lm", "e2e"):
            row[f"speedup_{scope}"] = dense[f"{scope}_s"] / row[f"{scope}_s"]
            row[f"predicted_{scope}"] = dense[f"flops_{scope}"] / row[f"flops_{scope}"]
            row[f"ratio_{scope}"] = row[f"speedup_{scope}"] / row[f"predicted_{scope}"]
    return {"part": "cost", "visual_tokens": slots, "text_tokens": text_tokens, "repeats": repeats,
            "threads": torch.get_num_threads(), "load_average": [load_before, os.getloadavg()[0]], "rows": rows}


def caption_features(model, tokenizer, sample: SceneSample, *, seed: int = 0) -> torch.Tensor:
    """``(slots, width)``: the image features that carry ``sample``'s description to the language model.

    The description's token embeddings (the language model's own input embeddings) start at a seeded offset
    among the image's slots; every other slot holds a zero vector (a neutral token: no content for attention to
    read and, under RMSNorm, no direction of its own).

    Example:
        >>> features = caption_features(model, tokenizer, make_sample(1000))                   # doctest: +SKIP
        >>> features.shape                                                                      # doctest: +SKIP
        torch.Size([576, 576])
    """
    slots = image_slots(model)
    ids = tokenizer(sample.description, add_special_tokens=False)["input_ids"]
    if len(ids) > slots:
        raise ValueError(f"the description has {len(ids)} tokens, more than the image's {slots} slots")
    table = model.get_input_embeddings().weight
    features = table.new_zeros(slots, table.shape[-1])
    offset = random.Random(f"vlm-offset-{seed}").randrange(slots - len(ids) + 1)
    features[offset:offset + len(ids)] = table[ids].detach()
    return features


class CaptionImage:
    """Context manager: the projector's output is replaced by ``features`` ``(slots, width)`` for every image (a
    forward hook on ``model.model.multi_modal_projector``, run before any other hook on it).

    Example:
        >>> with CaptionImage(model, caption_features(model, tokenizer, sample)):             # doctest: +SKIP
        ...     out = model.generate(ids, pixel_values=random_image(model), max_new_tokens=8)
    """

    def __init__(self, model, features: torch.Tensor):
        self.model, self.features, self.handle = model, features, None

    def _hook(self, module, args, output):
        if tuple(output.shape[-2:]) != tuple(self.features.shape):
            raise RuntimeError(f"projector output {tuple(output.shape)} does not fit features "
                               f"{tuple(self.features.shape)}")
        return self.features.to(output.dtype).expand_as(output).clone()

    def __enter__(self):
        self.handle = self.model.model.multi_modal_projector.register_forward_hook(self._hook, prepend=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        return False


class _SameTower:
    """Context manager: the vision tower runs once and its output is reused while the pixels are the same tensor
    (for runs whose tokens do not depend on the tower: dense and in-LLM methods, whose image features the quality
    task replaces anyway)."""

    def __init__(self, model):
        self.tower, self.cache = model.model.vision_tower, {}

    def __enter__(self):
        original = self.tower.forward

        def forward(pixel_values, *args, **kwargs):
            key = (id(pixel_values), repr(sorted(kwargs.items())), len(args))
            if key not in self.cache:
                self.cache[key] = (pixel_values, original(pixel_values, *args, **kwargs))
            return self.cache[key][1]

        self.tower.forward = forward
        return self

    def __exit__(self, *exc):
        del self.tower.forward
        self.cache.clear()
        return False


def run_quality(model=None, tokenizer=None, *, methods=METHODS, keeps=DEFAULT_KEEPS, configs=None,
                samples: int = DEFAULT_SAMPLES, split: str = "heldout", log=None, progress: bool = False,
                train_steps: int = 60, train_samples: int = 32) -> dict:
    """Accuracy of dense and of every method at every keep on the caption-as-image task (module docstring).

    ``configs`` (config dicts) replaces the methods x keeps grid. ``model`` defaults to :func:`build_llava`. Every
    row answers the same samples (seeds ``SPLITS[split] + i``); kinds cycle colour, count, name, place. A learned
    method (:data:`LEARNED`) is first trained for ``train_steps`` steps on ``train_samples`` samples of the tune
    split (:func:`hf_tokred.bench.vlm_train.train_on_captions`); its row records that budget.

    Example:
        >>> result = run_quality(methods=["fastv"], keeps=[0.5], samples=4)                    # doctest: +SKIP
        >>> result["rows"][0]["label"], 0 <= result["rows"][0]["accuracy"] <= 1                # doctest: +SKIP
        ('dense', True)
    """
    from .common import Reduction

    if split not in SPLITS:
        raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
    log = log or (lambda message: None)
    if model is None:
        model, tokenizer = build_llava()
    slots = image_slots(model)
    data = [make_sample(SPLITS[split] + i) for i in range(samples)]
    inputs = [(prompt_ids(tokenizer, s.question, slots, s.answer_start),
               caption_features(model, tokenizer, s, seed=s.meta["seed"])) for s in data]
    pixels = random_image(model)
    rows = []
    for config in [None, *(method_configs(methods, keeps) if configs is None else configs)]:
        label = config_label(config)
        cfg = _coerce(config)
        training = None
        if cfg is not None and cfg.method in LEARNED:
            from .vlm_train import train_on_captions

            log(f"quality: training {label} ({train_steps} steps on {train_samples} tune-split samples) ...")
            trained = train_on_captions(model, tokenizer, cfg, samples=train_samples, steps=train_steps,
                                        progress=progress)
            training = {"steps": train_steps, "samples": train_samples, "seconds": trained["seconds"],
                        "final_loss": mean_ends(trained["losses"], 5)[1]}
        log(f"quality: {label} ...")
        real_tower = getattr(cfg, "insertion", "") == "before_llm"
        per_sample = []
        started = time.perf_counter()
        with Reduction(model, cfg, owned=training is not None), torch.inference_mode():
            tower = _SameTower(model) if not real_tower else None
            if tower is not None:
                tower.__enter__()
            try:
                for sample, (ids, features) in zip(data, inputs):
                    with CaptionImage(model, features):
                        out = model.generate(ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
                    answer = tokenizer.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)
                    per_sample.append({"seed": sample.meta["seed"], "kind": sample.kind, "question": sample.question,
                                       "expected": sample.expected, "answer": answer,
                                       "correct": check_answer(answer, sample)})
            finally:
                if tower is not None:
                    tower.__exit__()
        kinds = {kind: [r["correct"] for r in per_sample if r["kind"] == kind] for kind in KINDS}
        rows.append({"label": label, "config": config, "accuracy": sum(r["correct"] for r in per_sample) / len(data),
                     "kinds": {k: sum(v) / len(v) for k, v in kinds.items() if v}, "seconds": time.perf_counter() - started,
                     "tower": "random tower's signals" if real_tower else "not used", "per_sample": per_sample,
                     **({"training": training} if training else {})})
    return {"part": "quality", "split": split, "samples": samples, "visual_tokens": slots, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

SPEED_TARGET = 0.85  # measured speed-up / FLOP-predicted speed-up, every method
BEFORE_LLM_TARGET = 2.0  # best before-LLM method at keep 1/4 against dense, prefill
QUALITY_TARGET = 0.05  # accuracy drop against dense: best in-LLM method at keep 1/4, FastV k=2 keep=0.5


def _method(row) -> str | None:
    return (row.get("config") or {}).get("method")


def _keep(row) -> float | None:
    return (row.get("config") or {}).get("keep")


def cost_targets(result: dict) -> list[str]:
    """The cost targets, checked: each method's measured / predicted speed-up >= 0.85 (both scopes) and, at keep 1/4,
    the best before-LLM method's prefill speed-up >= 2 (each scope).

    Example:
        >>> rows = [{"label": "dense", "config": None},
        ...         {"label": "visionzip keep=1/4", "config": {"method": "visionzip", "keep": 0.25},
        ...          "ratio_lm": 0.9, "ratio_e2e": 0.95, "speedup_lm": 2.5, "speedup_e2e": 1.2}]
        >>> print("\\n".join(cost_targets({"rows": rows})))
        met: visionzip keep=1/4: measured/predicted speed-up 0.90 (LM scope), 0.95 (end to end) >= 0.85
        met: best before-LLM method at keep 1/4 (visionzip keep=1/4): 2.50x faster than dense in LM-scope prefill (>= 2)
        missed: best before-LLM method at keep 1/4 (visionzip keep=1/4): 1.20x faster than dense in end-to-end prefill (>= 2)
    """
    lines = []
    for row in result["rows"][1:]:
        ok = min(row["ratio_lm"], row["ratio_e2e"]) >= SPEED_TARGET
        lines.append(f"{'met' if ok else 'missed'}: {row['label']}: measured/predicted speed-up {row['ratio_lm']:.2f} "
                     f"(LM scope), {row['ratio_e2e']:.2f} (end to end) >= {SPEED_TARGET}")
    quarter = [r for r in result["rows"][1:] if _method(r) in BEFORE_LLM and _keep(r) and abs(_keep(r) - 0.25) < 1e-9]
    for scope, words in (("lm", "LM-scope"), ("e2e", "end-to-end")):
        if quarter:
            best = max(quarter, key=lambda r: r[f"speedup_{scope}"])
            ok = best[f"speedup_{scope}"] >= BEFORE_LLM_TARGET
            lines.append(f"{'met' if ok else 'missed'}: best before-LLM method at keep 1/4 ({best['label']}): "
                         f"{best[f'speedup_{scope}']:.2f}x faster than dense in {words} prefill (>= {BEFORE_LLM_TARGET:g})")
    return lines


def quality_targets(result: dict) -> list[str]:
    """The quality targets, checked: the best in-LLM method at keep 1/4, and FastV at k=2 keep=0.5, within 0.05 of
    dense accuracy.

    Example:
        >>> rows = [{"label": "dense", "config": None, "accuracy": 0.9},
        ...         {"label": "fastv keep=1/2", "config": {"method": "fastv", "keep": 0.5}, "accuracy": 0.9},
        ...         {"label": "fastv keep=1/4", "config": {"method": "fastv", "keep": 0.25}, "accuracy": 0.8}]
        >>> print("\\n".join(quality_targets({"rows": rows})))
        missed: best in-LLM method at keep 1/4 (fastv keep=1/4): 0.80 against dense 0.90 (within 0.05)
        met: FastV k=2 keep=0.5 (fastv keep=1/2): 0.90 against dense 0.90 (within 0.05)
    """
    dense = result["rows"][0]["accuracy"]
    lines = []
    quarter = [r for r in result["rows"][1:]
               if _method(r) in IN_LLM + LEARNED and _keep(r) and abs(_keep(r) - 0.25) < 1e-9]
    paper = [r for r in result["rows"][1:] if _method(r) == "fastv" and _keep(r) == 0.5
             and r["config"].get("k", 2) == 2]
    for what, rows in (("best in-LLM method at keep 1/4", quarter), ("FastV k=2 keep=0.5", paper[:1])):
        if rows:
            best = max(rows, key=lambda r: r["accuracy"])
            ok = best["accuracy"] >= dense - QUALITY_TARGET - 1e-9
            lines.append(f"{'met' if ok else 'missed'}: {what} ({best['label']}): {best['accuracy']:.2f} against dense "
                         f"{dense:.2f} (within {QUALITY_TARGET:g})")
    return lines


def format_cost(result: dict) -> str:
    """The cost table of :func:`run_cost`'s result, and its targets.

    Example:
        >>> row = {"label": "dense", "config": None, "layer_tokens": [600, 600], "flops_lm": 2e11, "lm_s": 1.0,
        ...        "speedup_lm": 1.0, "predicted_lm": 1.0, "ratio_lm": 1.0, "flops_e2e": 6e11, "e2e_s": 3.0,
        ...        "speedup_e2e": 1.0, "predicted_e2e": 1.0, "ratio_e2e": 1.0}
        >>> print(format_cost({"rows": [row], "visual_tokens": 576, "text_tokens": 24, "repeats": 3, "threads": 2}))
        run    LM tokens first/last  LM GFLOPs   LM s  speed-up  predicted  ratio  e2e GFLOPs  e2e s  speed-up  predicted  ratio
        -----  --------------------  ---------  -----  --------  ---------  -----  ----------  -----  --------  ---------  -----
        dense               600/600        200  1.000      1.00       1.00   1.00         600  3.000      1.00       1.00   1.00
        <BLANKLINE>
        576 visual + 24 text tokens; median of 3 prefills after two warm-up rounds, rows taking turns; 2 torch threads.
        LM scope: projector to first logits; e2e: tower included.
    """
    from hf_tokred.cli import format_table

    header = ["run", "LM tokens first/last", "LM GFLOPs", "LM s", "speed-up", "predicted", "ratio", "e2e GFLOPs",
              "e2e s", "speed-up", "predicted", "ratio"]
    rows = []
    for r in result["rows"]:
        tokens = r.get("layer_tokens") or r.get("expected_layer_tokens") or [0]
        rows.append([r["label"] + (" *" if r.get("note") else ""), f"{tokens[0]}/{tokens[-1]}",
                     f"{r['flops_lm'] / 1e9:.0f}", f"{r['lm_s']:.3f}", f"{r['speedup_lm']:.2f}",
                     f"{r['predicted_lm']:.2f}", f"{r['ratio_lm']:.2f}", f"{r['flops_e2e'] / 1e9:.0f}",
                     f"{r['e2e_s']:.3f}", f"{r['speedup_e2e']:.2f}", f"{r['predicted_e2e']:.2f}", f"{r['ratio_e2e']:.2f}"])
    load = result.get("load_average")
    load = f"; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end" if load else ""
    lines = [format_table(header, rows, right=set(range(1, len(header)))), "",
             f"{result['visual_tokens']} visual + {result['text_tokens']} text tokens; median of {result['repeats']} "
             f"prefills after two warm-up rounds, rows taking turns; {result['threads']} torch threads{load}.",
             "LM scope: projector to first logits; e2e: tower included."]
    if any(r.get("note") for r in result["rows"]):
        lines.append("* the layers received other token counts than the config's nominal ones (adaptive count or "
                     "recycled carriers); FLOPs count what they received")
    targets = cost_targets(result)
    return "\n".join(lines + (["", "targets:", *targets] if targets else []))


def format_quality(result: dict) -> str:
    """The accuracy table of :func:`run_quality`'s result, and its targets.

    Example:
        >>> row = {"label": "dense", "config": None, "accuracy": 0.75, "kinds": {"colour": 0.5, "count": 1.0},
        ...        "tower": "not used"}
        >>> print(format_quality({"rows": [row], "split": "heldout", "samples": 4, "visual_tokens": 576}))
        run    colour  count  accuracy  vs dense  tower signals
        -----  ------  -----  --------  --------  -------------
        dense    0.50   1.00      0.75     +0.00  not used
        <BLANKLINE>
        held-out split, 4 samples per row; the image's 576 slots carry the description's embeddings.
    """
    from hf_tokred.cli import format_table

    kinds = [k for k in KINDS if k in result["rows"][0]["kinds"]]
    dense = result["rows"][0]["accuracy"]
    rows = [[r["label"], *(f"{r['kinds'][k]:.2f}" for k in kinds), f"{r['accuracy']:.2f}",
             f"{r['accuracy'] - dense:+.2f}", r["tower"]] for r in result["rows"]]
    header = ["run", *kinds, "accuracy", "vs dense", "tower signals"]
    split = "held-out" if result["split"] == "heldout" else "tuning"
    lines = [format_table(header, rows, right=set(range(1, len(header) - 1))), "",
             f"{split} split, {result['samples']} samples per row; the image's {result['visual_tokens']} slots carry "
             "the description's embeddings."]
    targets = quality_targets(result)
    return "\n".join(lines + (["", "targets:", *targets] if targets else []))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

DESCRIPTION = """\
Visual-token reduction on a LLaVA-1.5-shaped model: a random CLIP ViT-L/14-336 tower (576 visual tokens) and
projector in front of the embedded SmolLM2-135M-Instruct (real weights). Nothing is downloaded.

cost:    FLOPs and prefill time, dense against each method at each keep (fraction of the visual tokens), in the
         language-model scope (projector to first logits: what the methods change) and end to end (tower
         included), each against its FLOP-predicted speed-up. Set the threads with OMP_NUM_THREADS.
quality: "caption as image": the image's slots carry SmolLM2's embeddings of a scene description; a question
         asks for one fact (colour, count, name, place); accuracy by string match. Before-LLM methods choose
         from a random tower's signals here. Report the held-out split (the default).

examples:
  OMP_NUM_THREADS=2 hf-tokred vlm-bench                       both parts, every method at keep 1/2, 1/4, 1/9
  hf-tokred vlm-bench --part cost --methods fastv,visionzip --keeps 1/4
  hf-tokred vlm-bench --part quality --samples 40 --json vlm.json
"""


def _method_param(text: str) -> tuple[str, str, object]:
    """``METHOD.FIELD=VALUE`` -> ``(method, field, value)`` (the value parsed as JSON when it can be)."""
    from hf_tokred.cli import _param

    key, value = _param(text)
    method, _, name = key.partition(".")
    if method not in METHODS + LEARNED or not name:
        raise argparse.ArgumentTypeError(f"expected METHOD.FIELD=VALUE with METHOD among {','.join(METHODS + LEARNED)}, "
                                         f"got {text!r}")
    return method, name, value


def add_command(subparsers) -> None:
    """Add ``hf-tokred vlm-bench`` to the CLI.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> args = build_parser().parse_args(["vlm-bench", "--keeps", "1/4", "--methods", "fastv"])
        >>> args.keeps, args.methods, args.part
        ((0.25,), ('fastv',), 'both')
    """
    from hf_tokred.cli import _choices, _fractions, _positive_int

    bench = subparsers.add_parser("vlm-bench", help="visual-token methods: cost and quality on a LLaVA-shaped model",
                                  description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--part", choices=PARTS, default="both", help="what to measure (default: both)")
    bench.add_argument("--methods", type=_choices(METHODS + LEARNED, "methods"), default=METHODS, metavar="M[,M...]",
                       help=f"methods to run (default: {','.join(METHODS)}; the learned {','.join(LEARNED)} are "
                            "trained on the tune split before their quality rows)")
    bench.add_argument("--param", type=_method_param, action="append", default=[], metavar="METHOD.FIELD=VALUE",
                       help="a method setting other than keep, e.g. ivtp.group_size=576 (repeatable)")
    bench.add_argument("--train-steps", type=_positive_int, default=60, metavar="N",
                       help="training steps of a learned method before its quality rows (default: 60)")
    bench.add_argument("--keeps", type=_fractions, default=DEFAULT_KEEPS, metavar="K[,K...]",
                       help="fractions of the visual tokens kept (default: 1/2,1/4,1/9)")
    bench.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                       help=f"quality samples per row (default: {DEFAULT_SAMPLES})")
    bench.add_argument("--split", choices=tuple(SPLITS), default="heldout",
                       help="quality samples: heldout (report these) or tune (where the task's layout was chosen)")
    bench.add_argument("--repeats", type=_positive_int, default=DEFAULT_REPEATS, metavar="N",
                       help=f"timed rounds (one prefill per row each), after two warm-up rounds; the median is reported "
                            f"(default: {DEFAULT_REPEATS})")
    bench.add_argument("--json", metavar="OUT", help="also write every number (and per-sample answers) to this file")
    bench.set_defaults(handler=_cmd_vlm_bench)


def _cmd_vlm_bench(args) -> int:
    from hf_tokred.cli import _log

    started = time.perf_counter()
    _log("building the LLaVA-shaped model (random CLIP ViT-L/14-336 tower, SmolLM2-135M-Instruct) ...")
    model, tokenizer = build_llava()
    out = {"command": "hf-tokred " + " ".join(getattr(args, "argv", [])),
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    texts = []
    params: dict = {}
    for method, name, value in args.param:
        params.setdefault(method, {})[name] = value
    if args.part in ("cost", "both"):
        out["cost"] = run_cost(model, tokenizer, configs=method_configs(args.methods, args.keeps, params),
                               repeats=args.repeats, log=_log)
        texts.append(format_cost(out["cost"]))
    if args.part in ("quality", "both"):
        out["quality"] = run_quality(model, tokenizer, configs=method_configs(args.methods, args.keeps, params),
                                     samples=args.samples, split=args.split, log=_log, train_steps=args.train_steps)
        texts.append(format_quality(out["quality"]))
    out["wall_s"] = time.perf_counter() - started
    print("\n\n".join(texts))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return 0


__all__ = ["BEFORE_LLM", "CLIP_L14_336", "DEFAULT_KEEPS", "IN_LLM", "METHODS", "CaptionImage", "SceneSample",
           "add_command", "build_llava", "caption_features", "check_answer", "cost_targets", "format_cost",
           "format_quality", "image_slots", "keep_label", "layer_tokens", "lm_flops", "make_sample", "measure_prefill",
           "method_configs", "predicted_flops", "projector_flops", "prompt_ids", "quality_targets", "random_image",
           "run_cost", "run_quality", "tower_flops"]

"""Tiny random vision-language models of every family the visual-token methods support, with inputs.

Each builder returns ``(model, make_inputs)``; ``make_inputs(rows)`` takes a list of rows, each a list of image
sizes ``(height, width)`` (possibly empty), and returns left-padded kwargs for ``model(**kw)`` / ``generate``:
every row is ``[bos, text..., <image placeholders>..., text...]`` with the placeholder count the model's own
processor would write for that image. Images of different sizes exist only where the family supports them
(LLaVA-NeXT anyres, Qwen2-VL dynamic resolution, Idefics3 crops); the others take their one size.
"""

from __future__ import annotations

import torch

VOCAB = 128
IMAGE = 120  # placeholder token id
VIDEO = 121
START, END = 122, 123  # vision start/end (Qwen2-VL), fake-image wrap (Idefics3)
PAD = 0


def _text(width=32, layers=4, heads=4, kv=2, **extra):
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, vocab_size=VOCAB, pad_token_id=PAD, **extra)


def _clip(**extra):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32, **extra)


def _siglip(image_size=32, patch_size=8):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=image_size, patch_size=patch_size)


def _pixels(rows, start, shape):
    """One random image per entry of ``rows`` (a list of per-row lists), seeded by its row and place in the row,
    so a row run alone gets the same pixels as in a batch: ``[(row, j, tensor of shape(size))...]``."""
    return [torch.randn(*shape(size), generator=torch.Generator().manual_seed(7 + 100 * (start + i) + j))
            for i, row in enumerate(rows) for j, size in enumerate(row)]


def _pad_left(rows: list[list[int]]):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _row(index: int, placeholders: list[list[int]]) -> list[int]:
    """A row: a few text tokens, each image's placeholder run between text, a question at the end."""
    g = torch.Generator().manual_seed(1000 + index)
    text = lambda n: torch.randint(3, 100, (n,), generator=g).tolist()  # noqa: E731
    row = [1] + text(3 + index)
    for run in placeholders:
        row += run + text(2)
    return row + text(4)


def llava(seed: int = 0, strategy: str = "default", tower: str = "clip"):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = _clip() if tower == "clip" else _siglip()
    cfg = LlavaConfig(vision_config=vision, text_config=dict(model_type="llama", **_text()), image_token_id=IMAGE,
                      vision_feature_layer=-2, vision_feature_select_strategy=strategy, projector_hidden_act="gelu")
    model = LlavaForConditionalGeneration(cfg).eval()
    patches = (32 // 8) ** 2 + (1 if strategy == "full" and tower == "clip" else 0)

    def make_inputs(rows, start=0):
        images = [size for row in rows for size in row]
        ids, mask = _pad_left([_row(start + i, [[IMAGE] * patches for _ in row]) for i, row in enumerate(rows)])
        kw = dict(input_ids=ids, attention_mask=mask)
        if images:
            kw["pixel_values"] = torch.stack(_pixels(rows, start, lambda size: (3, 32, 32)))
        return kw

    return model, make_inputs


def paligemma(seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="gemma", head_dim=8, **_text())
    cfg = PaliGemmaConfig(vision_config=_siglip(), text_config=text, image_token_id=IMAGE, projection_dim=32,
                          hidden_size=32)
    cfg.vision_config.projection_dim = 32
    model = PaliGemmaForConditionalGeneration(cfg).eval()
    patches = (32 // 8) ** 2

    def make_inputs(rows, start=0):
        images = [size for row in rows for size in row]
        # PaliGemma's prompt: image tokens first, then bos and the text (prefix attention over image + prompt).
        built = []
        for i, row in enumerate(rows):
            g = torch.Generator().manual_seed(11 + start + i)
            built.append([IMAGE] * (patches * len(row)) + [1] + torch.randint(3, 100, (5 + start + i,), generator=g).tolist())
        ids, mask = _pad_left(built)
        kw = dict(input_ids=ids, attention_mask=mask)
        if images:
            kw["pixel_values"] = torch.stack(_pixels(rows, start, lambda size: (3, 32, 32)))
        return kw

    return model, make_inputs


def llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(vision_config=_clip(), text_config=dict(model_type="llama", **_text()), image_token_id=IMAGE,
                          image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]], vision_feature_layer=-2,
                          projector_hidden_act="gelu")
    model = LlavaNextForConditionalGeneration(cfg).eval()

    def placeholders(size):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        crops = image_size_to_num_patches(size, cfg.image_grid_pinpoints, 32)
        with torch.no_grad():
            packed = model.model.get_image_features(torch.zeros(1, crops, 3, 32, 32), torch.tensor([size]))
        return packed.pooler_output[0].shape[0]

    def make_inputs(rows, start=0):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        images = [size for row in rows for size in row]
        ids, mask = _pad_left([_row(start + i, [[IMAGE] * placeholders(s) for s in row]) for i, row in enumerate(rows)])
        kw = dict(input_ids=ids, attention_mask=mask)
        if images:
            crops = max(image_size_to_num_patches(s, cfg.image_grid_pinpoints, 32) for s in images)
            kw["pixel_values"] = torch.stack(_pixels(rows, start, lambda size: (crops, 3, 32, 32)))
            kw["image_sizes"] = torch.tensor(images)
        return kw

    return model, make_inputs


def qwen2_vl(seed: int = 0, version: str = "2"):
    if version == "2":
        from transformers import Qwen2VLConfig as Config
        from transformers import Qwen2VLForConditionalGeneration as Model
        vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_chans=3)
    else:
        from transformers import Qwen2_5_VLConfig as Config
        from transformers import Qwen2_5_VLForConditionalGeneration as Model
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, spatial_merge_size=2,
                      temporal_patch_size=2, in_channels=3, out_hidden_size=32, window_size=16,
                      fullatt_block_indexes=[1])
    torch.manual_seed(seed)
    text = dict(**_text(), rope_parameters=dict(rope_type="default", mrope_section=[1, 1, 2], rope_theta=10000.0))
    cfg = Config(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                 vision_start_token_id=START, vision_end_token_id=END)
    model = Model(cfg).eval()

    def make_inputs(rows, start=0):
        images = [size for row in rows for size in row]
        grids = [(1, h // 4, w // 4) for h, w in images]
        runs = [[START] + [IMAGE] * (t * h * w // 4) + [END] for t, h, w in grids]
        built, k = [], 0
        for i, row in enumerate(rows):
            built.append(_row(start + i, runs[k:k + len(row)]))
            k += len(row)
        ids, mask = _pad_left(built)
        kw = dict(input_ids=ids, attention_mask=mask)
        if images:
            kw["pixel_values"] = torch.cat(_pixels(rows, start, lambda size: (size[0] * size[1] // 16, 3 * 2 * 4 * 4)))
            kw["image_grid_thw"] = torch.tensor(grids)
        kw["mm_token_type_ids"] = (ids == IMAGE).int()
        return kw

    return model, make_inputs


def idefics3(seed: int = 0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=4)
    cfg = Idefics3Config(vision_config=vision, text_config=dict(model_type="llama", **_text()), image_token_id=IMAGE,
                         scale_factor=2)
    model = Idefics3ForConditionalGeneration(cfg).eval()
    per_crop = (32 // 4) ** 2 // 4

    def make_inputs(rows, start=0):
        # One entry per image = its number of crops (the "size" is read as crops x 32 px squares).
        crops = [max(1, (h // 32) * (w // 32)) for row in rows for h, w in row]
        built, k = [], 0
        for i, row in enumerate(rows):
            built.append(_row(start + i, [[START] + [IMAGE] * (per_crop * crops[k + j]) + [END] for j in range(len(row))]))
            k += len(row)
        ids, mask = _pad_left(built)
        kw = dict(input_ids=ids, attention_mask=mask)
        if crops:
            # pixel_values (batch, crops, 3, H, W): all-zero crops are padding the model skips.
            per_image = _pixels(rows, start, lambda size: (max(1, (size[0] // 32) * (size[1] // 32)), 3, 32, 32))
            per_row, k = [], 0
            for row in rows:
                per_row.append(torch.cat(per_image[k:k + len(row)]) if row else torch.zeros(0, 3, 32, 32))
                k += len(row)
            pixels = torch.zeros(len(rows), max(max(p.shape[0] for p in per_row), 1), 3, 32, 32)
            for i, p in enumerate(per_row):
                pixels[i, :p.shape[0]] = p
            kw["pixel_values"] = pixels
        return kw

    return model, make_inputs


def llava_processor():
    """A ``LlavaProcessor`` for :func:`llava` built in memory: a word-level tokenizer (``w0`` .. ``w119``,
    ``<image>`` = the placeholder id) and a 32 px CLIP image processor; no files needed."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(4, 120)}
    vocab.update({"<pad>": PAD, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": IMAGE})
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> "
                "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, chat_template=template,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


BUILDERS = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl,
            "qwen2_5_vl": lambda seed=0: qwen2_vl(seed, "2.5"), "idefics3": idefics3, "paligemma": paligemma}
# One size list per family: two images of different sizes where the family supports them.
SIZES = {"llava": [(32, 32)], "paligemma": [(32, 32)], "llava_next": [(32, 64), (64, 64)],
         "qwen2_vl": [(16, 24), (24, 32)], "qwen2_5_vl": [(16, 16), (32, 32)], "idefics3": [(32, 64), (32, 32)]}

__all__ = ["BUILDERS", "IMAGE", "SIZES", "VOCAB"]

"""ICAE (arXiv 2307.06945): LoRA encoder -> memory slots read by the frozen decoder, as a context compressor."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_assisted_decoding_continues_a_cache_as_plain_generate,
    assert_loads_without_hf_tokred,
    make_tiny_llama,
    make_tiny_tokenizer,
)
from transformers import AutoModelForCausalLM

import hf_tokred
from hf_tokred import ConfigError, TokenReductionConfig, TokenReductionError
from hf_tokred.integration.icae import encode, icae_losses, reconstruct, slot_count
from hf_tokred.integration.wiring import get_applied
from hf_tokred.methods.lm.icae import encoder_inputs, export_peft_adapter

CFG = {"method": "icae", "memory_slots": 4, "chunk_tokens": 12, "rank": 4, "alpha": 8.0}


def _trained_like(model, seed: int = 1):
    """Give the LoRA and the embeddings non-trivial values (a fresh LoRA is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    parts = model.hf_tokred_modules["icae"]
    with torch.no_grad():
        for name, p in parts.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (0.2 if "lora" in name else 1.0))
    return model


def _rotated(keys: torch.Tensor, shift: int, model) -> torch.Tensor:
    """``keys`` (``(batch, heads, n, head_dim)``, RoPE applied) rotated ``shift`` positions further."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    positions = torch.full((keys.shape[0], keys.shape[2]), shift)
    cos, sin = model.model.rotary_emb(keys, positions)
    return apply_rotary_pos_emb(keys, keys, cos, sin)[0]


def _icae(seed: int = 0, **cfg):
    model = make_tiny_llama(seed)
    hf_tokred.apply(model, {**CFG, **cfg})
    return _trained_like(model)


def _ids(length: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 120, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_config_chunks_and_errors():
    cfg = TokenReductionConfig(method="icae")
    assert (cfg.memory_slots, cfg.chunk_tokens, cfg.ratio) == (32, 128, 4.0)
    assert cfg.slots_for(512) == 128 and cfg.slots_for(513) == 160 and cfg.slots_for(1) == 32
    assert cfg.chunk_lengths(300) == [100, 100, 100] and cfg.chunk_lengths(257) == [86, 86, 85]
    assert cfg.stage == "context" and cfg.learned and cfg.slot_form == "kv"
    with pytest.raises(ConfigError, match="slot_form"):
        TokenReductionConfig(method="icae", slot_form="embeddings")
    with pytest.raises(ConfigError, match="memory_slots"):
        TokenReductionConfig(method="icae", memory_slots=0)
    with pytest.raises(ConfigError, match="memory_slots"):
        TokenReductionConfig(method="icae", memory_slots=200, chunk_tokens=128)
    with pytest.raises(ConfigError, match="target_modules"):
        TokenReductionConfig(method="icae", target_modules=["model.q_proj"])
    with pytest.raises(TokenReductionError, match="at least one token"):
        cfg.chunk_lengths(0)


def test_encoder_inputs_left_align_and_positions():
    embeds = torch.arange(8.0).reshape(1, 4, 2).repeat(2, 1, 1)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])  # a row with padding on both sides
    inputs, attention, positions = encoder_inputs(embeds, mask, torch.full((2, 2), -1.0))
    assert attention.tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert positions.tolist() == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert inputs[0, 2:4].tolist() == [[2.0, 3.0], [4.0, 5.0]] and inputs[0, 4:].eq(-1).all()


def test_plain_forward_generate_and_remove_are_dense():
    dense = make_tiny_llama()
    model = _icae()
    ids = _ids(10, 2)
    with torch.no_grad():
        ref = dense(ids).logits
        assert torch.equal(model(ids).logits, ref)
        hf_tokred.compress_context(model, ids)  # the LoRA hooks exist only inside
        assert torch.equal(model(ids).logits, ref)
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(out, dense.generate(ids, max_new_tokens=5, do_sample=False))
    hf_tokred.remove(model)
    assert get_applied(model) is None and not hasattr(model, "hf_tokred_modules")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)
    assert set(model.state_dict()) == set(dense.state_dict())


def test_compress_context_cache_and_generate_reads_the_slots():
    model = _icae(slot_form="hidden")
    context, question = _ids(10, 1), _ids(5, 1, seed=3)
    ctx = hf_tokred.compress_context(model, context)
    layers = model.config.num_hidden_layers
    assert ctx.entries == 4 and ctx.prefix_ids.shape == (1, 4) and ctx.context_tokens == [10]
    assert len(ctx.cache.layers) == layers and all(ctx.cache.layers[i].keys.shape[2] == 4 for i in range(layers))
    # the question after the cached slots == the frozen decoder fed [slots, question] as embeddings
    with torch.no_grad():
        slots = encode(model, context)
        embeds = torch.cat([slots, model.get_input_embeddings()(question)], 1)
        ref = model(inputs_embeds=embeds).logits[:, -1]
        got = model(torch.cat([ctx.prefix_ids, question], -1)[:, 4:], past_key_values=ctx.fresh_cache()).logits[:, -1]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    out = model.generate(torch.cat([ctx.prefix_ids, question], -1), past_key_values=ctx.fresh_cache(),
                         max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 12) and int(out[0, -3]) == int(ref.argmax(-1))
    # the LoRA matters in the encoder: without it the slots differ
    parts = model.hf_tokred_modules["icae"]
    with torch.no_grad():
        from hf_tokred.integration.icae import encode_chunk
        no_lora = encode_chunk(model, parts, context, torch.ones_like(context, dtype=torch.bool))
    assert not torch.allclose(no_lora, slots, atol=1e-4)


def test_kv_slots_are_the_encoders_keys_and_values_at_the_memory_positions():
    model = _icae()
    context, question = _ids(10, 1), _ids(5, 1, seed=3)
    ctx = hf_tokred.compress_context(model, context)
    layers = model.config.num_hidden_layers
    assert ctx.entries == 4 and all(ctx.cache.layers[i].keys.shape[2] == 4 for i in range(layers))
    # the encoder (LoRA on) over [context, memory tokens], memory at positions 0..3: its cache at those positions
    parts = model.hf_tokred_modules["icae"]
    from hf_tokred.integration.icae import encoder_mode
    embeds = torch.cat([model.get_input_embeddings()(context), parts.memory[None]], 1)
    with torch.no_grad(), encoder_mode(model):
        full = model(inputs_embeds=embeds, position_ids=torch.arange(-10, 4)[None], use_cache=True).past_key_values
    for i in range(layers):
        torch.testing.assert_close(ctx.cache.layers[i].keys, full.layers[i].keys[:, :, -4:], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ctx.cache.layers[i].values, full.layers[i].values[:, :, -4:], atol=1e-5, rtol=1e-4)
    # ... and the same as at the natural positions 0..13, keys rotated back by the shift (RoPE is relative)
    with torch.no_grad(), encoder_mode(model):
        natural = model(inputs_embeds=embeds, use_cache=True).past_key_values
    for i in range(layers):
        torch.testing.assert_close(ctx.cache.layers[i].keys, _rotated(natural.layers[i].keys[:, :, -4:], -10, model),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ctx.cache.layers[i].values, natural.layers[i].values[:, :, -4:], atol=1e-5,
                                   rtol=1e-4)
    # the question reads them at positions 4.. ; generate() continues from there
    with torch.no_grad():
        ref = model(question, position_ids=torch.arange(4, 9)[None], past_key_values=ctx.fresh_cache()).logits[:, -1]
    out = model.generate(torch.cat([ctx.prefix_ids, question], -1), past_key_values=ctx.fresh_cache(),
                         max_new_tokens=1, do_sample=False)
    assert int(out[0, -1]) == int(ref.argmax(-1))
    # without the LoRA the slots differ
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, position_ids=torch.arange(-10, 4)[None], use_cache=True).past_key_values
    assert not torch.allclose(plain.layers[1].values[:, :, -4:], ctx.cache.layers[1].values, atol=1e-4)


@pytest.mark.parametrize("form", ["kv", "hidden"])
def test_batch_with_different_lengths_matches_rows_alone(form):
    model = _icae(slot_form=form)
    rows = [_ids(n, 1, seed=n)[0] for n in (12, 7, 9)]
    left = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.long)
    for b, r in enumerate(rows):
        left[b, 12 - r.numel():] = r
        mask[b, 12 - r.numel():] = 1
    batched = hf_tokred.compress_context(model, left, mask)
    right = torch.zeros_like(left)
    rmask = torch.zeros_like(mask)
    for b, r in enumerate(rows):
        right[b, :r.numel()] = r
        rmask[b, :r.numel()] = 1
    batched_right = hf_tokred.compress_context(model, right, rmask)
    assert batched.context_tokens == [12, 7, 9] and batched.entries == 4
    for b, r in enumerate(rows):
        alone = hf_tokred.compress_context(model, r[None])
        for layer in range(model.config.num_hidden_layers):
            for got in (batched, batched_right):
                torch.testing.assert_close(got.cache.layers[layer].keys[b], alone.cache.layers[layer].keys[0],
                                           atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got.cache.layers[layer].values[b], alone.cache.layers[layer].values[0],
                                           atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["kv", "hidden"])
def test_long_context_is_compressed_chunk_by_chunk(form):
    model = _icae(slot_form=form)
    context = _ids(30, 1)  # chunk_tokens 12 -> 3 chunks of 10 -> 12 slots
    ctx = hf_tokred.compress_context(model, context)
    assert ctx.entries == 12 and ctx.cache.layers[0].keys.shape[2] == 12
    with torch.no_grad():
        slots = encode(model, context)
        assert slot_count(slots) == 12
        for j in range(3):
            alone = encode(model, context[:, 10 * j:10 * (j + 1)])  # its slots at positions 0..3
            if form == "hidden":
                torch.testing.assert_close(slots[:, 4 * j:4 * (j + 1)], alone, atol=1e-5, rtol=1e-4)
                continue
            for (keys, values), (keys_alone, values_alone) in zip(slots, alone):  # chunk j's at 4j..4j+3
                torch.testing.assert_close(values[:, :, 4 * j:4 * (j + 1)], values_alone, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(keys[:, :, 4 * j:4 * (j + 1)], _rotated(keys_alone, 4 * j, model),
                                           atol=1e-5, rtol=1e-4)
    # rows that need different numbers of chunks cannot share one cache: a clear error
    batch = torch.cat([context, context], 0)
    mask = torch.ones_like(batch)
    mask[1, :25] = 0
    with pytest.raises(TokenReductionError, match="different numbers of 12-token chunks"):
        hf_tokred.compress_context(model, batch, mask)


def test_bad_inputs_are_clear_errors():
    model = _icae()
    ids = _ids(8, 2)
    with pytest.raises(TokenReductionError, match="attention_mask has shape"):
        hf_tokred.compress_context(model, ids, torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(TokenReductionError, match="empty"):
        hf_tokred.compress_context(model, torch.zeros(1, 0, dtype=torch.long))
    mask = torch.ones_like(ids)
    mask[1] = 0
    with pytest.raises(TokenReductionError, match="no tokens"):
        hf_tokred.compress_context(model, ids, mask)
    with pytest.raises(TokenReductionError, match=r"\[0, 128\)"):
        hf_tokred.compress_context(model, ids + 200)
    with pytest.raises(TokenReductionError, match="LongTensor"):
        hf_tokred.compress_context(model, ids.float())
    with pytest.raises(TokenReductionError, match="attach the icae"):
        hf_tokred.compress_context(make_tiny_llama(), ids, config={"method": "icae"})


def test_kv_slots_need_rotary_positions():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)).eval()
    ids = _ids(6)
    with torch.no_grad():
        dense = opt(ids).logits
    paper = {**CFG, "target_modules": ["q_proj", "v_proj"]}
    with pytest.raises(hf_tokred.UnsupportedModelError, match="slot_form='kv'.*OPTForCausalLM.*rotary"):
        hf_tokred.apply(opt, paper)  # learned positions: shifting them would index before the table
    assert get_applied(opt) is None and not hasattr(opt, "hf_tokred_modules")
    with torch.no_grad():
        assert torch.equal(opt(ids).logits, dense)
    hf_tokred.apply(opt, {**paper, "slot_form": "hidden"})
    assert hf_tokred.compress_context(opt, ids).entries == 4


def test_save_load_identical_and_dense_without_hf_tokred(tmp_path):
    model = _icae()
    context, question = _ids(20, 1), _ids(4, 1, seed=5)
    saved = tmp_path / "icae"
    model.save_pretrained(saved)
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    assert get_applied(loaded).config.get("context").memory_slots == 4
    a, b = hf_tokred.compress_context(model, context), hf_tokred.compress_context(loaded, context)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(a.cache.layers[layer].keys, b.cache.layers[layer].keys)
    full = torch.cat([a.prefix_ids, question], -1)
    assert torch.equal(model.generate(full, past_key_values=a.fresh_cache(), max_new_tokens=4, do_sample=False),
                       loaded.generate(full, past_key_values=b.fresh_cache(), max_new_tokens=4, do_sample=False))
    # a weights file made for other memory_slots is refused, naming the mismatch
    with pytest.raises(Exception, match=r"icae.memory.* has shape \(4, 64\)"):
        AutoModelForCausalLM.from_pretrained(saved, token_reduction={**CFG, "memory_slots": 3})
    ids = torch.arange(3, 15)[None]
    with torch.no_grad():
        assert_loads_without_hf_tokred(saved, ids, make_tiny_llama()(ids).logits)


def test_peft_lora_gives_the_same_encoder(tmp_path):
    peft = pytest.importorskip("peft")
    model = _icae(slot_form="hidden")
    context = _ids(10, 1)
    folder = export_peft_adapter(model, tmp_path / "peft")
    base = make_tiny_llama()
    encoder = peft.PeftModel.from_pretrained(base, folder).eval()
    parts = model.hf_tokred_modules["icae"]
    embeds = torch.cat([base.get_input_embeddings()(context), parts.memory[None].detach()], 1)
    with torch.no_grad():
        hidden = encoder(inputs_embeds=embeds, output_hidden_states=True).hidden_states[-1][:, -4:]
        torch.testing.assert_close(hidden, encode(model, context), atol=1e-5, rtol=1e-4)
        # the kv form reads the same encoder's keys and values at the memory positions
        get_applied(model).config.get("context").slot_form = "kv"
        cache = encoder(inputs_embeds=embeds, position_ids=torch.arange(-10, 4)[None], use_cache=True).past_key_values
        for layer, (keys, values) in zip(cache.layers, encode(model, context)):
            torch.testing.assert_close(layer.keys[:, :, -4:], keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(layer.values[:, :, -4:], values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["kv", "hidden"])
def test_losses_and_reconstruct(form):
    model = _icae(slot_form=form)
    context, continuation = _ids(12, 2), _ids(12, 2, seed=7)
    ae, ae_acc = icae_losses(model, context)
    lm, _ = icae_losses(model, context, continuation)
    assert ae.requires_grad and ae.item() > 0 and lm.item() > 0 and 0 <= ae_acc <= 1
    ae.backward()
    parts = model.hf_tokred_modules["icae"]
    assert parts.memory.grad.abs().sum() > 0 and parts.ae.grad.abs().sum() > 0
    assert parts.lora.lora("model.layers.0.self_attn.q_proj").lora_B.weight.grad.abs().sum() > 0
    ctx = hf_tokred.compress_context(model, context[:1])
    steps = reconstruct(model, ctx, 5)
    assert steps.shape == (1, 5)
    # greedy reconstruction == the argmax of the teacher-forced decoder on its own output
    from hf_tokred.integration.icae import decoder_loss
    with torch.no_grad():
        _, accuracy = decoder_loss(model, encode(model, context[:1]), steps, autoencode=True)
    assert accuracy == 1.0


def test_training_loop(tmp_path):

    from hf_tokred.training import train_icae
    fresh = make_tiny_llama()
    windows = torch.randint(3, 120, (6, 24), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "run"
    trained = train_icae(fresh, make_tiny_tokenizer(), reduction=CFG, windows=windows, steps=4, batch_size=2,
                         lr=1e-2, heldout=0, output_dir=out, save_every=2, progress=False)
    assert len(trained.train_losses) == 4 and (out / "token_reduction.safetensors").exists()
    card = (out / "README.md").read_text()
    assert "steps: 4" in card and "keys and values at the memory positions" in card
    assert get_applied(AutoModelForCausalLM.from_pretrained(out)).config.get("context").slot_form == "kv"
    assert trained.hf_tokred_modules["icae"].lora.lora(
        "model.layers.0.self_attn.q_proj").lora_B.weight.abs().sum() > 0
    again = train_icae(make_tiny_llama(), make_tiny_tokenizer(), reduction=CFG, windows=windows, steps=4,
                       batch_size=2, lr=1e-2, heldout=0, output_dir=out, save_every=2, progress=False)
    assert again.train_losses == trained.train_losses  # resumed from the finished checkpoint: nothing redone
    with pytest.raises(ConfigError, match="windows"):
        train_icae(make_tiny_llama(), None, reduction=CFG, windows=windows[:, :10], steps=1, heldout=0,
                   progress=False)


def test_train_command_line_takes_the_slot_form():
    from hf_tokred.cli import build_parser

    assert build_parser().parse_args(["train", "icae"]).slot_form == "kv"
    assert build_parser().parse_args(["train", "icae", "--slot-form", "hidden"]).slot_form == "hidden"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "icae", "--slot-form", "embeddings"])
    assert build_parser().parse_args(["train", "icae"]).target_modules is None
    assert build_parser().parse_args(["train", "icae", "--target-modules", "q_proj,v_proj"]).target_modules == [
        "q_proj", "v_proj"]
    # the recipe takes them: the paper's form and targets
    from hf_tokred.training import train_icae
    windows = torch.randint(3, 120, (2, 24), generator=torch.Generator().manual_seed(0))
    model = train_icae(make_tiny_llama(), None, reduction=None, memory_slots=4, chunk_tokens=12, rank=4,
                       slot_form="hidden", target_modules=["q_proj", "v_proj"], windows=windows, steps=1, heldout=0,
                       progress=False)
    cfg = get_applied(model).config.get("context")
    assert (cfg.slot_form, cfg.target_modules) == ("hidden", ["q_proj", "v_proj"])
    assert set(model.hf_tokred_modules["icae"].lora.paths) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(model.config.num_hidden_layers) for p in ("q_proj", "v_proj")}
    with pytest.raises(ConfigError, match="target_modules"):
        train_icae(make_tiny_llama(), None, target_modules=["model.q_proj"], windows=windows, steps=1, heldout=0,
                   progress=False)


def test_assisted_decoding_continues_the_slot_cache_as_plain_generate_does():
    model = _icae()
    ctx = hf_tokred.compress_context(model, _ids(10))
    full = torch.cat([ctx.prefix_ids, _ids(5, seed=3)], -1)
    assert_assisted_decoding_continues_a_cache_as_plain_generate(model, full, ctx.fresh_cache)

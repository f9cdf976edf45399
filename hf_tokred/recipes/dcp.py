"""DCP's recipe (arXiv 2305.15805): the interaction gates trained teacher-forced on a frozen model.

:func:`train_dcp` attaches the ``dcp`` reduction (fresh gates), then on windows of training text
(:func:`hf_tokred.recipes.lm_data.token_windows` of ``lm_texts("train")``) it runs the frozen model twice per
batch: once dense (the teacher's next-token distributions) and once with every layer's attention biased by the
soft DCP mask (:func:`hf_tokred.methods.lm.dcp.soft_log_mask`, the log keep probabilities of the gates, added to
the attention logits), so the gradient of the loss reaches the gate projections. The loss is the KL divergence
from the dense distribution plus ``regularizer * mean_layers (dropped_l - sparsity)^2``, ``dropped_l`` being the
mean drop probability of layer ``l``'s (query, earlier key) pairs. Only the gates are trained.

The mask enters through a registered attention function (transformers' ``AttentionInterface``,
:data:`TRAINING_ATTENTION`): it builds the layer's mask from the post-RoPE queries and keys it is given and calls
transformers' own SDPA with it as a float mask, so the model's forward is not copied. :func:`soft_gates` switches a
model to it for the duration of a ``with`` block.

``hf-tokred train dcp`` runs it on the embedded SmolLM2-135M-Instruct.

Example:
    >>> from hf_tokred.embedded import load_smollm2
    >>> from hf_tokred.training import train_dcp
    >>> model, tokenizer = load_smollm2()                                                   # doctest: +SKIP
    >>> model = train_dcp(model, tokenizer, steps=120, output_dir="smollm2-dcp")            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time

import torch

from ..errors import ConfigError, TokenReductionError

TRAINING_ATTENTION = "hf_tokred_dcp_train"
STATE_FILE = "dcp_training.json"
DEFAULT_OUTPUT = "smollm2-dcp"
DEFAULT_STEPS = 100
BIAS_LR_FACTOR = 3.0
DESCRIPTION = """Train DCP's interaction gates (arXiv 2305.15805) on the embedded SmolLM2-135M-Instruct.

The model stays frozen; the gates (a query and a key projection of rank 16 and a bias per layer and KV head) learn,
teacher-forced on windows of standard-library documentation, to drop the context tokens whose loss the dense
model's predictions miss least, at the target sparsity. The folder it saves loads with
AutoModelForCausalLM.from_pretrained(folder) after `import hf_tokred` (the gates come from
token_reduction.safetensors).
"""

# What the registered training attention reads: the gates, the protected tokens and the per-layer statistics.
_ACTIVE: dict = {}


def _training_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ..attention import mask_keep
    from ..methods.lm.dcp import soft_log_mask

    active = _ACTIVE.get("state")
    if active is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[-2] != key.shape[-2]:
        raise TokenReductionError("dcp training: expected a full causal sequence per call (no cache)")
    gates, sinks, window = active["gates"], active["sink_tokens"], active["window"]
    log_keep = soft_log_mask(gates, module.layer_idx, query.detach(), key.detach(), sinks, window)
    n = query.shape[-2]
    rows = torch.arange(n, device=query.device)
    pairs = (rows[:, None] > rows[None, :]) & (rows[None, :] >= sinks) & (rows[:, None] - rows[None, :] >= window)
    dropped = (1.0 - log_keep.exp())[..., pairs].mean()
    active["dropped"][module.layer_idx] = dropped
    mask = log_keep.repeat_interleave(query.shape[1] // key.shape[1], dim=1).to(query.dtype)
    if attention_mask is not None:  # padding of the batch, if any
        mask = mask.masked_fill(~mask_keep(attention_mask)[..., -n:], float("-inf"))
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(TRAINING_ATTENTION, _training_attention)
    AttentionMaskInterface.register(TRAINING_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def soft_gates(model, gates, *, sink_tokens: int = 0, window: int = 0):
    """Run ``model``'s attention with DCP's soft mask from ``gates`` inside the block; yields the per-layer dropped
    fractions of the last forward (``{layer_idx: tensor}``, differentiable). The attention implementation is put
    back on exit.

    Example:
        >>> with soft_gates(model, model.hf_tokred_modules["dcp"]) as dropped:          # doctest: +SKIP
        ...     logits = model(ids).logits
    """
    _register()
    previous = model.config._attn_implementation
    state = {"gates": gates, "sink_tokens": sink_tokens, "window": window, "dropped": {}}
    model.set_attn_implementation(TRAINING_ATTENTION)
    _ACTIVE["state"] = state
    try:
        yield state["dropped"]
    finally:
        _ACTIVE.pop("state", None)
        model.set_attn_implementation(previous)


def dcp_loss(student_logits, teacher_logits, dropped: dict, sparsity: float, regularizer: float):
    """``(loss, kl, mean dropped)``: KL(dense || gated) per token plus the quadratic pull of every layer's dropped
    fraction toward ``sparsity``."""
    log_student = torch.log_softmax(student_logits.float(), dim=-1)
    log_teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean()
    rates = torch.stack(list(dropped.values()))
    penalty = ((rates - sparsity) ** 2).mean()
    return kl + regularizer * penalty, kl, rates.mean()


def train_dcp(model=None, tokenizer=None, *, texts: list[str] | None = None, sparsity: float = 0.5, rank: int = 16,
              steps: int = DEFAULT_STEPS, batch_size: int = 2, length: int = 256, lr: float = 3e-3,
              regularizer: float = 10.0, sink_tokens: int = 4, seed: int = 0, output_dir=None, resume: bool = True,
              save_every: int = 10, progress: bool = True):
    """Train DCP's gates on ``model`` (default: the embedded SmolLM2-135M-Instruct), frozen; returns the model with
    the ``dcp`` reduction attached (``sparsity``) and the trained gates, saved to ``output_dir`` if given.

    ``texts`` (default :func:`~hf_tokred.recipes.lm_data.lm_texts` ``("train")``) are cut into windows of ``length``
    tokens (seeded shuffle); each step takes the next ``batch_size`` of them (cycling once they are used up). AdamW at
    ``lr`` (constant; the biases at 3x) on the gates only. Every ``save_every`` steps a checkpoint goes to ``output_dir/checkpoint``;
    a later call with the same settings resumes from it. The model card (``README.md``) records the data, steps,
    seed, wall time and the losses.
    """
    from tqdm.auto import tqdm

    import hf_tokred

    from ..training import _prepare_checkpoint, _resumable_step, save_trained
    from .lm_data import lm_texts, token_windows

    for name, value, ok in (("steps", steps, isinstance(steps, int) and steps >= 1),
                            ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                            ("length", length, isinstance(length, int) and 16 <= length <= 8192),
                            ("lr", lr, isinstance(lr, (int, float)) and lr > 0),
                            ("regularizer", regularizer, isinstance(regularizer, (int, float)) and regularizer >= 0),
                            ("sparsity", sparsity, isinstance(sparsity, (int, float)) and 0 <= sparsity < 1),
                            ("save_every", save_every, isinstance(save_every, int) and save_every >= 1),
                            ("seed", seed, isinstance(seed, int) and not isinstance(seed, bool))):
        if not ok:
            raise ConfigError(f"{name}: got {value!r}; see train_dcp's docstring for the allowed values", field=name)
    if model is None or tokenizer is None:
        from ..embedded import load_smollm2

        model, tokenizer = load_smollm2()
    texts = lm_texts("train") if texts is None else texts
    windows = token_windows(tokenizer, texts, length, seed=seed)  # all of them, shuffled; a longer run cycles
    if windows.shape[0] < batch_size:
        raise ConfigError(f"texts: they give {windows.shape[0]} windows of {length} tokens, fewer than batch_size="
                          f"{batch_size}", field="texts")
    cfg = hf_tokred.TokenReductionConfig(method="dcp", sparsity=sparsity, rank=rank, sink_tokens=sink_tokens)
    fingerprint = {"windows": int(windows.shape[0]), "length": length, "sparsity": sparsity, "rank": rank,
                   "batch_size": batch_size, "lr": lr, "regularizer": regularizer, "sink_tokens": sink_tokens,
                   "seed": seed, "data_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest()}
    rng_state = torch.random.get_rng_state()
    frozen = [p for p in model.parameters() if p.requires_grad]
    try:
        hf_tokred.apply(model, cfg, weights_required=False)
        holder = model.hf_tokred_modules
        gates = holder["dcp"]
        for p in frozen:
            p.requires_grad_(False)
        params = [gates.query, gates.key, gates.bias]
        # The bias sets how much is dropped overall: it gets a larger rate than the projections.
        optimizer = torch.optim.AdamW([{"params": params[:2], "lr": lr}, {"params": params[2:], "lr": BIAS_LR_FACTOR * lr}],
                                      weight_decay=0.0)
        state = {"step": 0, "losses": [], "kl": [], "dropped": [], "seconds": 0.0, "fingerprint": fingerprint}
        torch.manual_seed(seed)
        output_dir, checkpoint = _prepare_checkpoint(output_dir, resume, holder, optimizer, params, state)
        if state["step"] and checkpoint is not None:
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as fh:
                saved = json.load(fh)
            for key in ("kl", "dropped", "seconds"):
                state[key] = saved.get(key, state[key])
        model.eval()  # no dropout; the gates learn through the attention mask
        bar = tqdm(total=steps, initial=min(state["step"], steps), desc="train dcp", disable=not progress)
        for step in range(state["step"], steps):
            started = time.perf_counter()
            order = torch.arange(step * batch_size, (step + 1) * batch_size) % windows.shape[0]
            batch = windows[order].to(model.device)
            with torch.no_grad():
                teacher = model(batch, use_cache=False).logits
            with soft_gates(model, gates, sink_tokens=sink_tokens) as dropped:
                student = model(batch, use_cache=False).logits
                loss, kl, rate = dcp_loss(student, teacher, dropped, sparsity, regularizer)
            state["kl"].append(round(kl.item(), 6))
            state["dropped"].append(round(rate.item(), 6))
            state["seconds"] = round(state["seconds"] + time.perf_counter() - started, 3)
            _resumable_step(loss, optimizer, params, state, bar, checkpoint, holder, save_every, steps,
                            max_grad_norm=1.0)
            bar.set_postfix(kl=f"{kl.item():.4f}", dropped=f"{rate.item():.2f}")
        bar.close()
        if output_dir is not None:
            save_trained(output_dir, model, tokenizer, STATE_FILE, state)
            write_model_card(output_dir, state)
    finally:
        torch.random.set_rng_state(rng_state)
        for p in frozen:
            p.requires_grad_(True)
    model.train_log = {key: list(state[key]) for key in ("losses", "kl", "dropped")}
    return model


def training_budget(state: dict) -> str:
    """One line describing a run's budget from its saved state (``dcp_training.json``)."""
    fp = state["fingerprint"]
    return (f"{state['step']} steps x {fp['batch_size']} windows of {fp['length']} tokens "
            f"({state['step'] * fp['batch_size'] * fp['length']:,} tokens drawn from {fp['windows']} windows of the "
            f"training text), rank {fp['rank']}, "
            f"target sparsity {fp['sparsity']}, seed {fp['seed']}, {state['seconds'] / 60:.1f} min of CPU wall time "
            "on a shared machine")


def write_model_card(output_dir: str, state: dict, figures: str | None = None) -> None:
    """``README.md`` of a trained folder: what it is, the data, steps, seed, losses and (``figures``) results."""
    kl, dropped = state["kl"], state["dropped"]
    tail = max(1, min(10, len(kl)))
    lines = [
        "---", "tags: [hf_tokred, hf_tokred-dcp]", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct", "---", "",
        "# SmolLM2-135M-Instruct + DCP interaction gates (hf_tokred)", "",
        "Dynamic Context Pruning (Anagnostidis et al., arXiv 2305.15805) as an hf_tokred KV policy: learned query/key "
        "interactions decide which context tokens each layer's cache drops for good. `model.safetensors` is the "
        "unchanged base model; the gates are in `token_reduction.safetensors`.", "",
        "```python", "import hf_tokred", "from transformers import AutoModelForCausalLM",
        "model = AutoModelForCausalLM.from_pretrained(folder)  # dcp attached, sparsity 0.5",
        "model.generate(ids, max_new_tokens=64)", "```", "",
        "## Training", "",
        f"- Budget: {training_budget(state)}.",
        "- Data: `hf_tokred.recipes.lm_data.lm_texts('train')` (standard-library documentation and docstrings), "
        "cut by `token_windows`.",
        "- Loss: KL(dense || gated) + regulariser pulling each layer's dropped fraction to the target; model frozen.",
        f"- Last {tail} steps: KL {sum(kl[-tail:]) / tail:.4f}, dropped fraction {sum(dropped[-tail:]) / tail:.3f}.",
        "",
    ]
    if figures:
        lines += ["## Measured", "", figures, ""]
    with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_train_command(subparsers) -> None:
    """Add ``hf-tokred train dcp`` to the ``train`` subparsers.

    Example:
        >>> from hf_tokred.cli import build_parser
        >>> build_parser().parse_args(["train", "dcp"]).sparsity
        0.5
    """
    from ..cli import _float_in
    from . import add_recipe_parser

    train = add_recipe_parser(subparsers, "dcp", help="DCP's interaction gates on SmolLM2 (frozen)",
                              description=DESCRIPTION, output=DEFAULT_OUTPUT, steps=DEFAULT_STEPS)
    train.add_argument("--sparsity", type=_float_in(0.0, 0.95), default=0.5,
                       help="fraction of the context the gates learn to drop (default: 0.5)")
    train.add_argument("--length", type=int, default=256, help="tokens per training window (default: 256)")
    train.set_defaults(handler=run)


def run(args) -> int:
    """Train the gates and save the folder."""
    from ..cli import _log
    from . import recipe_output

    texts = None
    if args.corpus:
        from . import recipe_texts

        texts = recipe_texts(args)
    output = recipe_output(args, DEFAULT_OUTPUT)
    _log(f"dcp: {args.steps} steps, target sparsity {args.sparsity}, windows of {args.length} tokens")
    model = train_dcp(texts=texts, sparsity=args.sparsity, steps=args.steps, length=args.length, seed=args.seed,
                      output_dir=output, progress=not args.no_progress)
    log = model.train_log
    print(f"saved to {output}: AutoModelForCausalLM.from_pretrained({output!r}) after import hf_tokred; "
          f"last KL {log['kl'][-1]:.4f}, dropped {log['dropped'][-1]:.3f}; measure it with "
          f"`hf-tokred learned-lm dcp --weights {output}`")
    return 0

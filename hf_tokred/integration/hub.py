"""Hub side: model cards and ``push_to_hub`` for reduced models.

``model.push_to_hub(repo_id, token_reduction_results=...)`` on a reduced model lands here: it saves
the model (weights, ``config.json`` with the reduction, ``token_reduction_config.json`` and
``token_reduction.safetensors`` when there are learned parts) into a temporary folder, writes a
model card made with ``huggingface_hub.ModelCard``/``ModelCardData`` and uploads the folder in one
commit.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

from .wiring import get_applied

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

This model carries a token reduction from [hf_tokred](https://github.com/hf-tokred/hf_tokred):
**{{ method }}**{% if paper %} ([arXiv {{ paper }}](https://arxiv.org/abs/{{ paper }})){% endif %}{% if base_model %}
applied to [{{ base_model }}](https://huggingface.co/{{ base_model }}){% endif %}.
The reduction is stored in `config.json["token_reduction"]` and `token_reduction_config.json`{% if learned %};
its learned parts are in `token_reduction.safetensors`{% endif %}. Without hf_tokred the repository loads as the dense model.

## Reduction

| parameter | value |
|---|---|
{% for key, value in params %}| `{{ key }}` | `{{ value }}` |
{% endfor %}
{% if results %}
## Results

| {{ results_header | join(" | ") }} |
|{% for _ in results_header %}---|{% endfor %}
{% for row in results %}| {{ row | join(" | ") }} |
{% endfor %}
{% endif %}
## Usage

```python
import hf_tokred  # re-attaches the reduction on load
from transformers import {{ model_class }}

model = {{ model_class }}.from_pretrained("{{ repo_id }}")
dense = {{ model_class }}.from_pretrained("{{ repo_id }}", token_reduction=False)
```
"""

# A Hub model id: "owner/name" (one slash, no path syntax). What from_pretrained got may instead be a local folder.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Auto classes tried first when a model class is in several mappings; then every other one, AutoModel last.
_AUTO_FIRST = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM", "AutoModelForImageTextToText",
               "AutoModelForImageClassification", "AutoModelForSequenceClassification", "AutoModelForMaskedLM")


def hub_model_id(name_or_path: str | os.PathLike | None) -> str | None:
    """``name_or_path`` when it is a Hub model id (``owner/name``, not an existing local path), else None.

    A model loaded from a local folder has that folder as ``config._name_or_path``; a model card must not
    link ``https://huggingface.co//tmp/...``.

    Example:
        >>> hub_model_id("HuggingFaceTB/SmolLM2-135M-Instruct")
        'HuggingFaceTB/SmolLM2-135M-Instruct'
        >>> hub_model_id("/tmp/my-model") is None and hub_model_id("gpt2") is None
        True
    """
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    if not _HUB_ID.match(name) or ".." in name or os.path.exists(name):
        return None
    return name


def loading_class(model) -> str:
    """The transformers class to load ``model``'s repository with: the auto class whose mapping gives the
    model's class (``AutoModelForCausalLM`` for a ``LlamaForCausalLM``), else the class's own name when
    transformers exports it, else ``AutoModel``.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                   vocab_size=32)
        >>> loading_class(LlamaForCausalLM(cfg))
        'AutoModelForCausalLM'
    """
    import transformers
    from transformers.models.auto import modeling_auto

    cls = type(model)
    autos = sorted(name for name in dir(modeling_auto) if name.startswith("AutoModel") and name != "AutoModel")
    ordered = [*_AUTO_FIRST, *(a for a in autos if a not in _AUTO_FIRST), "AutoModel"]
    for name in ordered:
        mapping = getattr(getattr(modeling_auto, name, None), "_model_mapping", None)
        try:
            found = mapping[type(model.config)] if mapping is not None else None
        except (KeyError, AttributeError, ImportError, ValueError):
            continue
        if found is cls or (isinstance(found, (tuple, list)) and cls in found):
            return name
    return cls.__name__ if getattr(transformers, cls.__name__, None) is cls else "AutoModel"


def _results_rows(results: Any) -> tuple[list[str], list[list[str]]]:
    """Accept ``{metric: value}`` or a list of row dicts; return header and rows."""
    if isinstance(results, dict):
        return ["metric", "value"], [[str(k), str(v)] for k, v in results.items()]
    if isinstance(results, (list, tuple)) and results and all(isinstance(r, dict) for r in results):
        header = list(dict.fromkeys(k for r in results for k in r))
        return header, [[str(r.get(k, "")) for k in header] for r in results]
    raise TypeError("token_reduction_results: expected a dict {metric: value} or a list of row dicts")


def make_model_card(config, *, base_model: str | None, repo_id: str, results: Any = None,
                    pipeline_tag: str | None = None, model_class: str = "AutoModel") -> ModelCard:
    """A model card for a reduced model: base model, tags, the method and its parameters, results, and a usage
    snippet loading the repository with ``model_class`` (see :func:`loading_class`).

    ``base_model`` is kept only when it is a Hub model id (:func:`hub_model_id`); a local path is left out of
    the card's metadata and text.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> from hf_tokred.integration.hub import make_model_card
        >>> cfg = TokenReductionConfig(method="streamingllm", max_tokens=512)
        >>> card = make_model_card(cfg, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id="me/smol-stream",
        ...                        results={"passkey accuracy": 0.9})
        >>> "streamingllm" in card.text and card.data.base_model
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
    base_model = hub_model_id(base_model)
    params = sorted((k, json.dumps(v)) for k, v in config.params().items())
    header, rows = _results_rows(results) if results is not None else ([], [])
    data = ModelCardData(
        base_model=base_model or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["token-reduction", "hf_tokred", f"hf_tokred-{config.method}"],
    )
    return ModelCard.from_template(
        data,
        template_str=CARD_TEMPLATE,
        model_name=repo_id.split("/")[-1],
        repo_id=repo_id,
        base_model=base_model,
        model_class=model_class,
        method=config.method,
        paper=getattr(config, "paper", "") if config.method != "composed" else "",
        learned=config.learned,
        params=params,
        results=rows,
        results_header=header,
    )


def push_reduced_model(model, repo_id: str, *, results: Any = None, commit_message: str | None = None,
                       commit_description: str | None = None, private: bool | None = None, token=None,
                       revision: str | None = None, create_pr: bool = False, max_shard_size="50GB", tags=None):
    """Upload a reduced model with its side-car files and a model card; returns the commit info."""
    applied = get_applied(model)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if tags:
        model.add_model_tags(tags)
    base_model = getattr(model.config, "_name_or_path", None) or None
    pipeline_tag = "text-generation" if model.can_generate() else None
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        card = make_model_card(applied.config, base_model=base_model, repo_id=repo_id, results=results,
                               pipeline_tag=pipeline_tag, model_class=loading_class(model))
        card.save(f"{tmp}/README.md")
        operations = [
            CommitOperationAdd(path_in_repo=path.relative_to(tmp).as_posix(), path_or_fileobj=str(path))
            for path in sorted(Path(tmp).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload model with {applied.config.method} token reduction",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )

"""Hub side: model cards and ``push_to_hub`` for reduced models.

``model.push_to_hub(repo_id, token_reduction_results=...)`` on a reduced model lands here: it saves
the model (weights, ``config.json`` with the reduction, ``token_reduction_config.json`` and
``token_reduction.safetensors`` when there are learned parts) into a temporary folder, writes a
model card made with ``huggingface_hub.ModelCard``/``ModelCardData`` and uploads the folder in one
commit.
"""

from __future__ import annotations

import json
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
**{{ method }}**{% if paper %} ([arXiv {{ paper }}](https://arxiv.org/abs/{{ paper }})){% endif %}
applied to [{{ base_model }}](https://huggingface.co/{{ base_model }}).
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
from transformers import AutoModel

model = AutoModel.from_pretrained("{{ repo_id }}")
dense = AutoModel.from_pretrained("{{ repo_id }}", token_reduction=False)
```
"""


def _results_rows(results: Any) -> tuple[list[str], list[list[str]]]:
    """Accept ``{metric: value}`` or a list of row dicts; return header and rows."""
    if isinstance(results, dict):
        return ["metric", "value"], [[str(k), str(v)] for k, v in results.items()]
    if isinstance(results, (list, tuple)) and results and all(isinstance(r, dict) for r in results):
        header = list(dict.fromkeys(k for r in results for k in r))
        return header, [[str(r.get(k, "")) for k in header] for r in results]
    raise TypeError("token_reduction_results: expected a dict {metric: value} or a list of row dicts")


def make_model_card(config, *, base_model: str | None, repo_id: str, results: Any = None,
                    pipeline_tag: str | None = None) -> ModelCard:
    """A model card for a reduced model: base model, tags, the method and its parameters, results.

    Example:
        >>> from hf_tokred import TokenReductionConfig
        >>> from hf_tokred.integration.hub import make_model_card
        >>> cfg = TokenReductionConfig(method="streamingllm", max_tokens=512)
        >>> card = make_model_card(cfg, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", repo_id="me/smol-stream",
        ...                        results={"passkey accuracy": 0.9})
        >>> "streamingllm" in card.text and card.data.base_model
        'HuggingFaceTB/SmolLM2-135M-Instruct'
    """
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
        base_model=base_model or "the base model",
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
                               pipeline_tag=pipeline_tag)
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

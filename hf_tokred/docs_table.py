"""The methods table of ``docs/methods.md``, generated from the method registry.

The registry is the one source of truth for what the package says about a method: its ``status``,
``paper``, ``stage`` and ``model_kinds`` (class attributes of its config, see
:func:`hf_tokred.register_method`), and the architectures each model kind covers (the adapters of
``hf_tokred.model_patches``). ``hf-tokred methods`` prints the same rows as text, ``hf-tokred methods
--markdown`` as the markdown below, and

    python -m hf_tokred.docs_table            # rewrite the table in docs/methods.md
    python -m hf_tokred.docs_table --check    # exit 1 if docs/methods.md is out of date

replaces what lies between :data:`START` and :data:`END` in ``docs/methods.md``; the prose around the
markers is hand-written and left alone. ``tests/test_docs.py`` fails when the committed table differs
from the generated one.

Example:
    >>> from hf_tokred.docs_table import method_rows
    >>> row = next(r for r in method_rows() if r["key"] == "streamingllm")
    >>> row["paper"], row["stage"], row["status"]
    ('2309.17453', 'kv_policy (every step)', 'stable')
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

START = "<!-- methods-table:start (generated from the registry by `python -m hf_tokred.docs_table`; do not edit) -->"
END = "<!-- methods-table:end -->"

# Where each stage's measured figures are written up (links relative to docs/); a method key or wiring key listed here
# wins over its stage.
FIGURES = {
    "kv_policy": "[kv.md](kv.md)",
    "kv_storage": "[kv.md](kv.md#compressed-kv-storage-issue-6)",
    "sequence": "[encoders.md](encoders.md)",
    "diffusion": "[diffusion.md](diffusion.md)",
    "visual": "[vlm.md](vlm.md)",
    "prompt": "[prompt.md](prompt.md)",
    "prefill": "[prompt.md](prompt.md)",
    # methods with a wiring of their own are written up by family where it is not their stage's (else: the stage's)
    "mrt5": "[nlp.md](nlp.md)",
    "token_pooling": "[nlp.md](nlp.md)",
    "token_dropping": "[nlp.md](nlp.md)",
    "tokenskip": "[nlp.md](nlp.md)",
    "ssm_prune": "[encoders.md](encoders.md#state-space-models-ssm_prune-mamba-mamba-2)",
    "context": "[learned_lm.md](learned_lm.md)",
    "decoding": "[learned_lm.md](learned_lm.md)",
    "dcp": "[learned_lm.md](learned_lm.md)",  # a KV policy, but written up with the other learned LM reducers
}

_WHEN = {"step": "every step", "prefill": "once after the prompt"}


def default_doc_path() -> Path:
    """``docs/methods.md`` of the source checkout this package was imported from.

    Example:
        >>> default_doc_path().name
        'methods.md'
    """
    return Path(__file__).resolve().parent.parent / "docs" / "methods.md"


def _title(cls) -> str:
    """The method's name and tagline: the first paragraph of its module's docstring without the citation
    ("TOVA: Token Omission Via Attention"), or for a method that shares its module (the composition) the first
    clause of its class docstring."""
    from .config import TokenReductionConfig

    module = sys.modules[cls.__module__]
    configs = [c for c in vars(module).values() if isinstance(c, type) and issubclass(c, TokenReductionConfig)
               and c.__module__ == module.__name__]
    if configs == [cls] and module.__doc__:  # the module is the method's own file
        text = " ".join(module.__doc__.strip().split("\n\n")[0].split())
        text = re.sub(r"\s*\([^()]*\)\.?$", "", text)  # "(Authors, venue, arXiv id)."
    else:
        text = " ".join((inspect.getdoc(cls) or cls.__name__).split("\n\n")[0].split())
        text = re.split(r",? e\.g\.|\. ", text)[0]
    return text.rstrip(".").replace("|", "\\|")


def _models(cls) -> dict[str, list[str]] | None:
    """Model kind -> names of the adapters of that kind; None for a method that takes its parts' kinds."""
    from .model_patches import registered_adapters

    kinds = cls.model_kinds if isinstance(cls.model_kinds, (tuple, list)) else None
    if kinds is None:
        return None
    if cls.stage == "visual":  # the vision-language families model_patches/vlm.py describes
        from .model_patches.vlm import VISION_RECORDS

        return {"vlm": sorted({record.name for record in VISION_RECORDS.values()})}
    adapters = registered_adapters()
    # a refused architecture (its adapter records why, e.g. data2vec_vision) is not one a method works on
    only = getattr(cls, "supported_adapters", None)  # a method that acts on a few adapters of its kind (madtp)
    return {kind: [a.name for a in adapters if a.kind == kind and getattr(a, "unsupported", None) is None
                   and (only is None or a.name in only)] for kind in kinds}


def method_rows() -> list[dict]:
    """One dict per registered method, sorted by key: ``key``, ``title``, ``paper`` (arXiv id, a venue for a paper
    with no preprint, or ``""``), ``stage`` (with when a KV policy evicts, and ``learned`` for methods with
    trained/calibrated parts), ``models`` (kind -> adapter names, or None: those of its parts), ``status``,
    ``figures`` (docs link or ``""``).

    Example:
        >>> rows = {r["key"]: r for r in method_rows()}
        >>> rows["kvquant"]["stage"], list(rows["kvquant"]["models"]), rows["composed"]["models"]
        ('kv_storage, learned', ['decoder'], None)
    """
    from .config import registered_methods

    rows = []
    for key, cls in sorted(registered_methods().items()):
        stage = cls.stage
        when = _WHEN.get(getattr(cls, "compression", None)) if stage == "kv_policy" else None
        if when:
            stage += f" ({when})"
        if cls.learned is True:  # the composition's `learned` is a property: its parts decide
            stage += ", learned"
        rows.append({
            "key": key,
            "title": _title(cls),
            "paper": cls.paper or "",
            "stage": stage,
            "models": _models(cls),
            "status": cls.status,
            "figures": FIGURES.get(key) or FIGURES.get(cls.wiring) or FIGURES.get(cls.stage, ""),
        })
    return rows


def format_paper(paper: str, link: bool = False) -> str:
    """A method's ``paper`` for a table: ``arXiv ID`` (a markdown link with ``link``) for an arXiv id, the reference
    as written for a paper with no preprint (a venue), ``-`` for none.

    Example:
        >>> format_paper("2210.09461"), format_paper("FreqTS (AAAI 2025)"), format_paper("")
        ('arXiv 2210.09461', 'FreqTS (AAAI 2025)', '-')
    """
    if not paper:
        return "-"
    if re.fullmatch(r"\d{4}\.\d{4,5}", paper):
        return f"[{paper}](https://arxiv.org/abs/{paper})" if link else f"arXiv {paper}"
    return paper


def format_models(models: dict[str, list[str]] | None, code: bool = False) -> str:
    """``"decoder: decoder, cohere2; unet: unet2d_condition"``; ``code`` wraps names in backticks.

    Example:
        >>> format_models({"unet": ["unet2d_condition"], "dit": []})
        'unet: unet2d_condition; dit: (no adapter yet)'
    """
    if models is None:
        return "those of its parts"
    groups = []
    for kind, names in models.items():
        shown = ", ".join(f"`{n}`" if code else n for n in names) if names else "(no adapter yet)"
        groups.append(f"{kind}: {shown}")
    return "; ".join(groups) or "-"


def methods_markdown() -> str:
    """The generated part of ``docs/methods.md``: the status legend, the methods table and the adapters table.

    Example:
        >>> text = methods_markdown()
        >>> "| `streamingllm` |" in text and "| stable |" in text
        True
    """
    from .config import STATUSES
    from .model_patches import registered_adapters

    lines = ["Status (the `status` of each method's config class, one of these):", ""]
    lines += [f"- **{name}**: {meaning}." for name, meaning in STATUSES.items()]
    lines += ["", "| key | method | paper | stage | architectures (adapters) | status | figures |",
              "|---|---|---|---|---|---|---|"]
    for row in method_rows():
        paper = format_paper(row["paper"], link=True) if row["paper"] else "—"
        lines.append(f"| `{row['key']}` | {row['title']} | {paper} | {row['stage']} | "
                     f"{format_models(row['models'], code=True)} | {row['status']} | {row['figures'] or '—'} |")
    lines += ["", "Adapters: the architectures each model kind covers (`hf_tokred.model_patches`).", "",
              "| adapter | kind | library | model classes |", "|---|---|---|---|"]
    for adapter in sorted(registered_adapters(), key=lambda a: (a.kind, a.name)):
        examples = ", ".join(adapter.examples).replace("|", "\\|") or "—"
        lines.append(f"| `{adapter.name}` | {adapter.kind} | {adapter.library} | {examples} |")
    return "\n".join(lines) + "\n"


def render_doc(text: str) -> str:
    """``text`` (the content of docs/methods.md) with the generated block replaced by :func:`methods_markdown`.

    Raises ``ValueError`` when the two marker lines are missing or out of order.

    Example:
        >>> doc = "intro\\n" + START + "\\nold\\n" + END + "\\nprose\\n"
        >>> new = render_doc(doc)
        >>> new.startswith("intro\\n" + START + "\\nStatus") and new.endswith(END + "\\nprose\\n")
        True
    """
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"docs/methods.md must hold the marker lines {START!r} and then {END!r}")
    return text[: start + len(START)] + "\n" + methods_markdown() + text[end:]


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check``, verify) the generated table of docs/methods.md; returns the exit status.

    Example:
        >>> main(["--check"])                                                     # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(prog="python -m hf_tokred.docs_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=default_doc_path(), help="default: docs/methods.md")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    old = args.path.read_text(encoding="utf-8")
    new = render_doc(old)
    if args.check:
        if new != old:
            print(f"{args.path}: the methods table is out of date; run: python -m hf_tokred.docs_table", file=sys.stderr)
            return 1
        return 0
    if new != old:
        args.path.write_text(new, encoding="utf-8")
        print(f"updated {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

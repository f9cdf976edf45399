"""Training and evaluation text for the learned language-model reducers (EAGLE, Gist, ICAE, DCP), built from what
every Python installation ships, reproducibly.

* :func:`lm_texts`: English prose paragraphs: the documentation topics of ``pydoc_data.topics``
  (:func:`hf_tokred.training.stdlib_corpus`) and the docstrings of a fixed list of standard-library modules. Every
  paragraph is assigned to ``"train"`` or ``"heldout"`` by the SHA-256 of its text, so the split is the same on
  every machine and a paragraph never changes side.
* :func:`token_windows`: the texts of a split as fixed-length windows of token ids (language-modelling batches).
* :func:`instruction_prompts`: chat requests built from the paragraphs (summarise, explain, answer a question about
  a passage), for methods that learn from the dense model's answers.
* :func:`system_prompts`: chats of a long system prompt (a role, a task, house rules) and a user passage, for
  compressing a system prompt that is reused across calls (gist tokens).
* :func:`dense_generations`: the dense model's own greedy answers to such prompts, cached in a JSON file keyed by
  the model, the prompts and the settings (self-distillation data: EAGLE drafts what the model itself writes).

Example:
    >>> from hf_tokred.recipes.lm_data import lm_texts
    >>> train, heldout = lm_texts("train"), lm_texts("heldout")
    >>> len(train) > len(heldout) > 100 and not set(train) & set(heldout)
    True
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import random
import re
import warnings

import torch

from ..errors import ConfigError

# Pure-Python standard-library modules whose docstrings are prose (the list is fixed so that the corpus is the
# same on every machine with the same Python version).
DOCSTRING_MODULES = (
    "argparse", "ast", "asyncio.events", "asyncio.futures", "asyncio.locks", "asyncio.queues", "asyncio.streams",
    "asyncio.tasks", "base64", "bisect", "calendar", "cmd", "code", "codecs", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "dis", "doctest",
    "email.message", "email.parser", "email.utils", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "http.client", "http.cookiejar",
    "http.server", "imaplib", "inspect", "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "numbers", "optparse",
    "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "profile", "pstats", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "types", "typing", "unittest.case", "unittest.mock", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "webbrowser", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile",
    "zipimport",
)
SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2


def _split_of(text: str) -> str:
    position = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "heldout" if position < HELDOUT_FRACTION else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}", field="split")


def _docstrings() -> list[str]:
    """Docstrings of the modules of :data:`DOCSTRING_MODULES` and of their own public classes, functions and methods."""
    out = []
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # a module this Python build lacks (no tkinter for turtle, no _sqlite3, ...)
            continue
        docs = [inspect.getdoc(module)]
        with warnings.catch_warnings():  # typing's deprecated io/re namespaces warn when their docs are read
            warnings.simplefilter("ignore", DeprecationWarning)
            docs.extend(_member_docs(module))
        out.extend(d for d in docs if d)
    return out


def _member_docs(module) -> list[str]:
    docs = []
    for attr, value in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            docs.append(inspect.getdoc(value))
            if inspect.isclass(value):
                docs.extend(inspect.getdoc(m) for k, m in sorted(vars(value).items())
                            if not k.startswith("_") and inspect.isfunction(m))
    return docs


def _prose_paragraphs(text: str, min_words: int) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(line.startswith((" ", "\t", ">>>", "..")) for line in lines):
            continue
        paragraph = " ".join(block.split())
        letters = sum(c.isalpha() for c in paragraph)
        if len(paragraph.split()) >= min_words and letters >= 0.6 * len(paragraph):
            out.append(paragraph)
    return out


def lm_texts(split: str = "train", *, min_words: int = 12) -> list[str]:
    """Prose paragraphs of the Python documentation topics and of standard-library docstrings, one split of them.

    Topic paragraphs come first (in topic order), then docstring paragraphs (in module order); duplicates are
    dropped. A paragraph's split is decided by its SHA-256 (20% held out), so train and held-out never share a
    paragraph. About 2,260 paragraphs (70,000 words) in ``"train"`` and 570 in ``"heldout"`` on Python 3.11.

    Example:
        >>> from hf_tokred.recipes.lm_data import lm_texts
        >>> all(len(t.split()) >= 12 for t in lm_texts("heldout"))
        True
    """
    from ..training import stdlib_corpus

    _check_split(split)
    seen, out = set(), []
    candidates = list(stdlib_corpus("train", min_words=min_words, max_words=10_000))
    candidates += stdlib_corpus("heldout", min_words=min_words, max_words=10_000)
    for doc in _docstrings():
        candidates.extend(_prose_paragraphs(doc, min_words))
    for text in candidates:
        if text not in seen:
            seen.add(text)
            if _split_of(text) == split:
                out.append(text)
    return out


def token_windows(tokenizer, texts: list[str], length: int, *, count: int | None = None, seed: int = 0) -> torch.Tensor:
    """``texts`` tokenized, joined with the end-of-text token and cut into windows of ``length`` ids: ``(n, length)``.

    The windows are shuffled with ``seed``; ``count`` keeps the first ``count`` of them (all by default).

    Example:
        >>> windows = token_windows(tokenizer, lm_texts("train"), 256, count=64)        # doctest: +SKIP
        >>> windows.shape                                                                # doctest: +SKIP
        torch.Size([64, 256])
    """
    if not isinstance(length, int) or length < 2:
        raise ConfigError(f"length: expected an int >= 2, got {length!r}", field="length")
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + separator)
    windows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    random.Random(seed).shuffle(windows)
    if count is not None:
        if len(windows) < count:
            raise ConfigError(f"count: the texts give {len(windows)} windows of {length} tokens, fewer than {count}",
                              field="count")
        windows = windows[:count]
    return torch.tensor(windows, dtype=torch.long).reshape(len(windows), length)


# The request templates of instruction_prompts ({text} is a passage).
REQUESTS = (
    "Summarize the following text in two sentences.\n\n{text}",
    "Explain the following passage to a beginner.\n\n{text}",
    "{text}\n\nWhat is the main point of this text?",
    "Read this documentation excerpt and list its key facts.\n\n{text}",
    "{text}\n\nRewrite the passage above in simpler words.",
    "Here is a piece of Python documentation:\n\n{text}\n\nWhat should a programmer remember from it?",
)


def instruction_prompts(split: str = "train", count: int | None = None, *, seed: int = 0,
                        max_words: int = 160) -> list[str]:
    """Chat requests about the paragraphs of ``split`` (summarise, explain, list key facts...), one per paragraph.

    Each paragraph of :func:`lm_texts` with at most ``max_words`` words gets a request template drawn with
    ``seed``; the requests are shuffled with ``seed`` and the first ``count`` kept. They are the user message of a
    chat: apply the tokenizer's chat template before generating.

    Example:
        >>> from hf_tokred.recipes.lm_data import instruction_prompts
        >>> prompts = instruction_prompts("heldout", 5)
        >>> len(prompts), prompts == instruction_prompts("heldout", 5)
        (5, True)
    """
    rng = random.Random(seed)
    texts = [t for t in lm_texts(split) if len(t.split()) <= max_words]
    prompts = [rng.choice(REQUESTS).format(text=t) for t in texts]
    rng.shuffle(prompts)
    return prompts if count is None else prompts[:count]


# The parts of system_prompts: a role, an audience, a task for the user's passage and house rules.
SYSTEM_ROLES = (
    "a patient Python tutor for people who have never programmed",
    "a senior engineer who reviews documentation before it is published",
    "a technical writer on the Python documentation team",
    "a friendly teaching assistant in an introductory programming course",
    "an assistant that prepares study notes for computer science students",
    "a support agent who answers questions from developers at a software company",
    "an editor who makes technical text short and clear",
    "a mentor who helps junior developers understand the standard library",
    "a quiz writer for an online programming course",
    "a librarian who catalogues software documentation",
    "a translator of technical jargon into everyday language",
    "a careful assistant who never guesses and says when the text does not answer a question",
)
SYSTEM_AUDIENCES = (
    "beginners who know no Python", "experienced developers in a hurry", "students preparing for an exam",
    "managers who do not write code", "teenagers learning to code", "data scientists who mostly use notebooks",
    "system administrators who write small scripts", "non-native English speakers",
)
SYSTEM_TASKS = (
    "summarize the passage in two or three sentences",
    "explain what the passage describes, step by step",
    "list the key facts of the passage as short bullet points",
    "write three quiz questions about the passage, each with its answer",
    "give one short example of how the described feature is used",
    "rewrite the passage in simpler words",
    "suggest a title for the passage and explain the choice in one sentence",
    "point out anything in the passage that a reader could misunderstand",
    "write a short note that a developer could keep as a reminder",
    "name the functions, classes or modules the passage mentions and say what each does",
    "say what problem the described feature solves",
    "compare what the passage describes with what a beginner might expect",
)
SYSTEM_RULES = (
    "Keep the answer under 80 words.", "Start the answer with the words 'In short'.",
    "Use bullet points for lists.", "Do not use code blocks.", "End with one practical tip.",
    "Write in a neutral, formal tone.",
    "Avoid jargon; when a technical term is needed, define it in a few words.",
    "Mention the name of the module or object first.", "Never invent facts that are not in the passage.",
    "Use British spelling.", "Address the reader as 'you'.", "Use numbered steps where order matters.",
    "Do not repeat the question.", "Put the most important point first.",
    "Use short sentences of at most fifteen words.", "Give an analogy from everyday life.",
    "Avoid the passive voice.", "If the passage mentions a default value, state it.",
    "If something is deprecated, say so clearly.", "Finish with a one-sentence summary.",
    "Do not use exclamation marks.", "Use plain text only, without Markdown headings.",
    "Write at most three paragraphs.", "Include one example input and its result when possible.",
    "Use the word 'Note' to flag warnings.", "Mention one common mistake.",
    "Keep a positive tone even when pointing out limits.", "Write for someone reading on a phone: keep it compact.",
    "Quote at most one short phrase from the passage.", "Do not mention that you are an AI.",
    "Prefer concrete examples over abstract descriptions.", "Use the present tense.",
    "Spell out abbreviations the first time they appear.", "When unsure, say what the passage does not tell.",
    "Refer to Python versions only if the passage does.", "Group related facts together.",
    "Begin with a one-line overview before the details.", "Close by suggesting what to read next.",
    "Use headings only if the answer has more than two parts.",
)


def system_prompts(split: str = "train", count: int | None = None, *, seed: int = 0, fits=None) -> list[list[dict]]:
    """Chats of a system prompt and a user passage: ``[{"role": "system", ...}, {"role": "user", ...}]``.

    The system prompt has a role, an audience, a task for the passage the user will send, and house rules, each
    drawn from fixed lists (:data:`SYSTEM_ROLES`, :data:`SYSTEM_AUDIENCES`, :data:`SYSTEM_TASKS`,
    :data:`SYSTEM_RULES`); rules are added in a drawn order while ``fits(system_prompt)`` holds (default: twelve
    rules). The user message is a paragraph of ``lm_texts(split)`` of 20-90 words. Everything is drawn from
    ``(split, seed)``, so the two splits share no passage and draw their system prompts independently. One chat
    per passage (about 1,440 in ``"train"`` and 370 in ``"heldout"`` on Python 3.11); the first ``count`` are kept.

    Example:
        >>> from hf_tokred.recipes.lm_data import system_prompts
        >>> chats = system_prompts("heldout", 3)
        >>> chats == system_prompts("heldout", 3), [m["role"] for m in chats[0]]
        (True, ['system', 'user'])
    """
    _check_split(split)
    rng = random.Random(f"{split}:{seed}")
    passages = [t for t in lm_texts(split) if 20 <= len(t.split()) <= 90]
    rng.shuffle(passages)
    chats = []
    for passage in passages[:count]:
        head = (f"You are {rng.choice(SYSTEM_ROLES)}. Your readers are {rng.choice(SYSTEM_AUDIENCES)}. The user will "
                f"send you a passage of Python documentation. Your task: {rng.choice(SYSTEM_TASKS)}. Follow these "
                "house rules:")
        system = head
        for number, rule in enumerate(rng.sample(SYSTEM_RULES, len(SYSTEM_RULES)), 1):
            longer = f"{system}\n{number}. {rule}"
            if (fits is None and number > 12) or (fits is not None and not fits(longer)):
                break
            system = longer
        chats.append([{"role": "system", "content": system}, {"role": "user", "content": passage}])
    return chats


def system_task(chat: list[dict]) -> str | None:
    """The task of :data:`SYSTEM_TASKS` that a chat of :func:`system_prompts` was drawn with (None: no such task).

    Example:
        >>> from hf_tokred.recipes.lm_data import SYSTEM_TASKS, system_prompts, system_task
        >>> system_task(system_prompts("heldout", 1)[0]) in SYSTEM_TASKS
        True
    """
    system = chat[0].get("content", "") if chat and chat[0].get("role") == "system" else ""
    return next((task for task in SYSTEM_TASKS if f"Your task: {task}." in system), None)


def chat_ids(tokenizer, prompt: str | list[dict]) -> list[int]:
    """The token ids of ``prompt`` with the assistant header after it (the model's chat template): a string is one
    user message, a list is the chat's messages (``{"role": ..., "content": ...}``).

    Example:
        >>> ids = chat_ids(tokenizer, "Hello")                                           # doctest: +SKIP
        >>> ids = chat_ids(tokenizer, [{"role": "system", "content": "Be brief."},
        ...                            {"role": "user", "content": "Hello"}])            # doctest: +SKIP
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def dense_generations(model, tokenizer, prompts: list[str] | list[list[dict]], *, max_new_tokens: int = 128,
                      batch_size: int = 8, cache_file: str | None = None, progress: bool = True) -> list[list[int]]:
    """The dense model's greedy answers (new token ids) to ``prompts`` as chat messages, cached in ``cache_file``.

    Generation runs left-padded in batches of ``batch_size`` without any reduction attached (a model with one
    raises). With ``cache_file`` the answers are stored as JSON keyed by the model's name, the prompts and the
    settings; a later call with the same key reads them instead of generating again (another key regenerates and
    overwrites the file).

    Example:
        >>> answers = dense_generations(model, tokenizer, instruction_prompts("train", 64))   # doctest: +SKIP
        >>> tokenizer.decode(answers[0])                                                      # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from ..integration.wiring import get_applied

    if get_applied(model) is not None:
        raise ConfigError("model: dense_generations needs the dense model; call hf_tokred.remove(model) first",
                          field="model")
    key = hashlib.sha256(json.dumps([getattr(model, "name_or_path", ""), prompts, max_new_tokens]).encode()).hexdigest()
    if cache_file is not None and os.path.isfile(cache_file):
        with open(cache_file, encoding="utf-8") as fh:
            stored = json.load(fh)
        if stored.get("key") == key:
            return stored["answers"]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    answers: list[list[int]] = []
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc="dense answers", disable=not progress):
            rows = [chat_ids(tokenizer, p) for p in prompts[start:start + batch_size]]
            batch = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            for row in out[:, batch["input_ids"].shape[1]:].tolist():
                ends = [i for i, t in enumerate(row) if t == tokenizer.eos_token_id]
                answers.append(row[:ends[0] + 1] if ends else row)
    finally:
        tokenizer.padding_side = side
    if cache_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
        with open(cache_file, "w", encoding="utf-8") as fh:
            json.dump({"key": key, "answers": answers}, fh)
    return answers

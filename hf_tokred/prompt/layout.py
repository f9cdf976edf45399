"""Where the context is in a model's prompt: ``<context>...</context>`` blocks, the question after them.

When a prompt compressor is attached to a causal LM, ``generate()`` and ``pipeline("text-generation")``
see token ids, not the documents and the question. The user marks the part to compress in the prompt
text (a chat message, a plain prompt) with :data:`CONTEXT_OPEN` and :data:`CONTEXT_CLOSE`; every block
is one document, the text after the last block up to the next special token (the end of that chat message)
is the question
that question-aware methods (LongLLMLingua) condition on, and everything outside the blocks reaches the
model verbatim. The markers themselves are removed. A plain prompt without markers and without special
tokens (a leading BOS aside) is one document with no question; a chat-formatted prompt without markers
is refused, because its role names and template text must not be compressed.

Example:
    >>> from hf_tokred.prompt.layout import split_prompt
    >>> layout = split_prompt("<s>user: <context>Long text.</context> What is it?", special_tokens=["<s>"])
    >>> layout.documents, layout.question
    (['Long text.'], 'What is it?')
    >>> layout.join(["Text."])
    '<s>user: Text. What is it?'
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

CONTEXT_OPEN = "<context>"
CONTEXT_CLOSE = "</context>"


@dataclass
class PromptLayout:
    """A prompt cut around its context blocks: ``pieces[i]`` precedes ``documents[i]``, ``pieces[-1]`` ends it."""

    pieces: list[str]
    documents: list[str]
    question: str

    def join(self, documents: list[str]) -> str:
        """The prompt with ``documents`` (e.g. compressed, in block order) in place of the blocks, markers removed.

        Example:
            >>> PromptLayout(["a ", " b"], ["x"], "b").join(["y"])
            'a y b'
        """
        if len(documents) != len(self.documents):
            raise ValueError(f"expected {len(self.documents)} documents, got {len(documents)}")
        out = [self.pieces[0]]
        for doc, piece in zip(documents, self.pieces[1:]):
            out += [doc, piece]
        return "".join(out)


def split_prompt(text: str, special_tokens=()) -> PromptLayout:
    """Cut ``text`` (a decoded prompt, special tokens included) into its context blocks and the rest.

    Raises :class:`~hf_tokred.errors.ConfigError` for unbalanced or nested markers, and for a prompt that
    holds special tokens (a chat template) but no marked context.

    Example:
        >>> split_prompt("Just a plain prompt.").documents
        ['Just a plain prompt.']
    """
    specials = sorted({t for t in special_tokens if t}, key=len, reverse=True)
    pieces, documents = split_marked(text, CONTEXT_OPEN, CONTEXT_CLOSE, "prompt")
    if documents:
        return PromptLayout(pieces, documents, _before_special(pieces[-1], specials).strip())
    lead = next((t for t in specials if text.startswith(t)), "")
    body = text[len(lead):]
    inner = [t for t in specials if t in body]
    if inner:
        raise ConfigError(
            f"prompt: it holds special tokens ({', '.join(repr(t) for t in inner[:3])}: a chat template) and no "
            f"marked context; put the text to compress between {CONTEXT_OPEN!r} and {CONTEXT_CLOSE!r} (in a "
            "message's content), so that role names and template text reach the model verbatim", field="prompt")
    return PromptLayout([lead, ""], [body], "")


def split_marked(text: str, open_marker: str, close_marker: str, where: str) -> tuple[list[str], list[str]]:
    """``text`` cut at non-nested ``open_marker`` ... ``close_marker`` pairs: the pieces outside (one more than the
    blocks: ``pieces[i]`` precedes ``blocks[i]``) and the blocks inside, markers dropped. Unbalanced or nested
    markers raise :class:`~hf_tokred.errors.ConfigError` naming ``where``.

    Example:
        >>> split_marked("a <k>b</k> c", "<k>", "</k>", "context")
        (['a ', ' c'], ['b'])
    """
    field = where.split("[")[0]
    pieces, blocks, pos = [], [], 0
    while True:
        i = text.find(open_marker, pos)
        j = text.find(close_marker, pos)
        if i < 0:
            if j >= 0:
                raise ConfigError(f"{where}: {close_marker!r} at character {j} without a {open_marker!r} before it",
                                  field=field)
            pieces.append(text[pos:])
            return pieces, blocks
        close = text.find(close_marker, i + len(open_marker))
        if (0 <= j < i) or close < 0 or 0 <= text.find(open_marker, i + len(open_marker)) < close:
            raise ConfigError(f"{where}: unbalanced or nested {open_marker!r}...{close_marker!r} markers near "
                              f"character {i}", field=field)
        pieces.append(text[pos:i])
        blocks.append(text[i + len(open_marker):close])
        pos = close + len(close_marker)


def _before_special(text: str, specials: list[str]) -> str:
    """``text`` up to its first special token: the rest of the message that holds the last context block."""
    cut = min((i for i in (text.find(t) for t in specials) if i >= 0), default=len(text))
    return text[:cut]

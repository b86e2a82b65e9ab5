"""Split a response into sub-sentences, the units that CLIP scores against the image (DAMA section 2, step 1).

The paper splits with an LLM. Our default is `RuleSplitter`, which is deterministic and needs no model:

1. Lines. Every line break ends a unit, and a list marker at the start of a unit ("1.", "2)", "(a)", "-", "*",
   "•") is dropped: it carries nothing CLIP can see. Inline lists ("shows: 1. a cat 2. a dog") are found too.
2. Sentences. A unit ends after ".", "!", "?" or "…" followed by a space, unless the period belongs to an
   abbreviation ("e.g.", "Mr.", "No. 5"; "etc." ends a sentence only when a capital follows), an initial
   ("J. K."), or the next word starts in lower case. Decimals ("3.5") never end one (no space after the period).
   Inside a balanced quotation nothing ends: `The sign says "No parking. Tow zone." in red.` is one sentence.
3. Length. CLIP reads at most 77 tokens (its text position limit, bos and eos included). A longer sentence is cut
   at clause boundaries, strongest first (";", ":", dashes, then commas, then before "and", "but", "which", ...);
   neighbouring clauses are packed back together while they fit, and a clause that still does not fit is cut by
   length, word by word.

Any object with `split(text) -> list[str]` is a `Splitter`; `LMSplitter` is one that prompts a local causal LM and
falls back to the rules when the model's answer is empty or not grounded in the text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from dama.errors import DamaError

# CLIP's text tower has 77 positions; the tokenizer's bos and eos take two of them.
CLIP_TEXT_LIMIT = 77

_OPENERS = "\"'“‘([{"
_CLOSERS = "\"'”’)]}"
# Abbreviations that are (almost) never the end of a sentence: titles and Latin shorthands precede more text.
_NEVER_TERMINAL = frozenset(
    {"mr", "mrs", "ms", "dr", "prof", "st", "vs", "e.g", "i.e", "cf", "approx", "esp", "incl", "viz", "mt", "capt"}
)
# Abbreviations that introduce a number: "No. 5", "Fig. 2", "pp. 10".
_BEFORE_NUMBER = frozenset({"no", "nos", "fig", "figs", "vol", "p", "pp", "ch", "sec", "eq", "ref"})
# Abbreviations that may close a sentence: they end one only when a capitalised word follows.
_MAYBE_TERMINAL = frozenset({"etc", "inc", "ltd", "co", "corp", "jr", "sr", "al", "a.m", "p.m", "u.s", "u.k"})
_DOTTED_ACRONYM = re.compile(r"^(?:[a-z]\.)+[a-z]$")
_BULLET = re.compile(r"^[-*•‣◦–]$")
_ENUMERATOR = re.compile(r"^\(?(\d{1,3})[.)]$")
_LETTER_ENUMERATOR = re.compile(r"^\(?[a-z]\)$")
_LINE_MARKER = re.compile(r"^\s*(?:[-*•‣◦–]|\(?\d{1,3}[.)]|\(?[a-z]\))\s+")
# Clause boundaries for over-long sentences, strongest first; each entry says where a cut may go.
_STRONG_PUNCTUATION = (";", ":")
_DASHES = frozenset({"-", "–", "—", "--"})
_CONJUNCTIONS = frozenset({"and", "but", "which", "while", "whereas", "or", "so", "because", "although", "where"})
# The CLIP pre-tokenizer's pieces: letter runs, single digits, runs of other symbols.
_CLIP_PIECES = re.compile(r"[^\W\d_]+|\d|[^\w\s]+|_+")
_WORDS = re.compile(r"\w+")


@runtime_checkable
class Splitter(Protocol):
    """Anything that turns a response into its sub-sentences (no empty strings, in reading order)."""

    def split(self, text: str) -> list[str]: ...


def approximate_clip_tokens(text: str) -> int:
    """Estimate CLIP's token count (bos and eos included) without a tokenizer: one token per pre-tokenizer piece.

    This undercounts rare words that BPE cuts into several tokens; pass `clip_token_counter(tokenizer)` to
    `RuleSplitter` for the exact count.
    """
    return len(_CLIP_PIECES.findall(text)) + 2


def clip_token_counter(tokenizer: Any) -> Callable[[str], int]:
    """Exact token count (special tokens included) with a Hugging Face tokenizer, e.g. `CLIPProcessor.tokenizer`."""

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=True, truncation=False)["input_ids"])

    return count


def _first_char(token: str) -> str:
    stripped = token.lstrip(_OPENERS)
    return stripped[:1] if stripped else token[:1]


def _quotes_balanced(tokens: list[str]) -> bool:
    text = " ".join(tokens)
    return text.count('"') % 2 == 0 and text.count("“") == text.count("”")


def _ends_sentence(token: str, next_token: str | None) -> bool:
    """Whether a sentence ends after `token`, ignoring quotations (the caller handles those)."""
    core = token.rstrip(_CLOSERS)
    if not core or core[-1] not in ".!?…":
        return False
    if next_token is None:
        return True
    next_first = _first_char(next_token)
    if next_first.islower():
        return False
    if core.endswith(("...", "…")):
        return next_first.isupper()
    if core[-1] in "!?":
        return True
    word = core[:-1].lstrip(_OPENERS)
    lower = word.lower()
    if lower in _NEVER_TERMINAL:
        return False
    if lower in _BEFORE_NUMBER and next_first.isdigit():
        return False
    if lower in _MAYBE_TERMINAL or _DOTTED_ACRONYM.match(lower):
        return next_first.isupper()
    # A single capital is an initial ("J. K. Rowling"), not the end of a sentence.
    return not (len(word) == 1 and word.isupper())


class RuleSplitter:
    """The deterministic default splitter (see the module docstring for the rules).

    Args:
        count_tokens: text -> number of CLIP tokens, bos/eos included. Default: `approximate_clip_tokens`.
        max_tokens: the most tokens one sub-sentence may have; CLIP's text limit by default.
    """

    def __init__(self, count_tokens: Callable[[str], int] | None = None, max_tokens: int = CLIP_TEXT_LIMIT):
        if max_tokens < 3:
            raise DamaError(f"max_tokens must leave room for bos, eos and one word (>= 3), got {max_tokens}")
        self.count_tokens = count_tokens or approximate_clip_tokens
        self.max_tokens = max_tokens

    def split(self, text: str) -> list[str]:
        pieces = []
        for sentence in self.sentences(text):
            pieces.extend(self.fit_to_limit(sentence))
        return pieces

    def sentences(self, text: str) -> list[str]:
        """Steps 1 and 2: lines, list items and sentences, with whitespace normalised and list markers dropped."""
        out = []
        for line in text.splitlines():
            out.extend(self._line_sentences(line.split()))
        return [sentence for sentence in out if any(char.isalnum() for char in sentence)]

    def _line_sentences(self, tokens: list[str]) -> list[str]:
        track_quotes = _quotes_balanced(tokens)
        sentences: list[str] = []
        current: list[str] = []
        # Quotation state: straight quotes toggle, curly ones nest.
        straight_open, curly_depth = False, 0
        last_enumerator: int | None = None
        for index, token in enumerate(tokens):
            enumerator = _ENUMERATOR.match(token)
            after_colon = bool(current) and current[-1].endswith(":")
            is_marker = (
                (not current and (enumerator or _BULLET.match(token) or _LETTER_ENUMERATOR.match(token)))
                or (enumerator is not None and after_colon)
                or (
                    enumerator is not None
                    and last_enumerator is not None
                    and int(enumerator.group(1)) == last_enumerator + 1
                )
            )
            quoted = straight_open or curly_depth > 0
            if is_marker and not quoted:
                if current:
                    sentences.append(" ".join(current))
                    current = []
                if enumerator is not None:
                    last_enumerator = int(enumerator.group(1))
                continue
            current.append(token)
            if track_quotes:
                straight_open ^= token.count('"') % 2 == 1
                curly_depth += token.count("“") - token.count("”")
            quoted = straight_open or curly_depth > 0
            next_token = tokens[index + 1] if index + 1 < len(tokens) else None
            if not quoted and _ends_sentence(token, next_token):
                sentences.append(" ".join(current))
                current = []
        if current:
            sentences.append(" ".join(current))
        return sentences

    def fit_to_limit(self, sentence: str) -> list[str]:
        """Step 3: the sentence itself if it fits in `max_tokens`, else its clauses packed into pieces that fit."""
        if self.count_tokens(sentence) <= self.max_tokens:
            return [sentence]
        return self._split_long(sentence.split(), level=0)

    def _fits(self, words: list[str]) -> bool:
        return self.count_tokens(" ".join(words)) <= self.max_tokens

    def _split_long(self, words: list[str], level: int) -> list[str]:
        cutters = (_cut_after_strong, _cut_after_comma, _cut_before_conjunction)
        if level == len(cutters):
            return self._split_by_length(words)
        out = []
        for chunk in self._pack(cutters[level](words)):
            if self._fits(chunk):
                out.append(" ".join(chunk))
            else:
                out.extend(self._split_long(chunk, level + 1))
        return out

    def _pack(self, pieces: list[list[str]]) -> list[list[str]]:
        """Greedily join neighbouring pieces while the result fits, so that cuts stay few and pieces stay whole."""
        chunks: list[list[str]] = []
        current: list[str] = []
        for piece in pieces:
            if current and not self._fits(current + piece):
                chunks.append(current)
                current = []
            current = current + piece
        if current:
            chunks.append(current)
        return chunks

    def _split_by_length(self, words: list[str]) -> list[str]:
        # A single word longer than the limit stays whole: CLIP truncates it, which is all that can be done.
        return [" ".join(chunk) for chunk in self._pack([[word] for word in words])]


def _cut(words: list[str], cut_after: Callable[[int], bool]) -> list[list[str]]:
    pieces: list[list[str]] = []
    current: list[str] = []
    for index, word in enumerate(words):
        current.append(word)
        if cut_after(index) and index + 1 < len(words):
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return pieces


def _cut_after_strong(words: list[str]) -> list[list[str]]:
    return _cut(words, lambda i: words[i].rstrip(_CLOSERS).endswith(_STRONG_PUNCTUATION) or words[i] in _DASHES)


def _cut_after_comma(words: list[str]) -> list[list[str]]:
    return _cut(words, lambda i: words[i].rstrip(_CLOSERS).endswith(","))


def _cut_before_conjunction(words: list[str]) -> list[list[str]]:
    return _cut(words, lambda i: i + 1 < len(words) and words[i + 1].lower() in _CONJUNCTIONS)


def _word_set(text: str) -> set[str]:
    return set(_WORDS.findall(text.lower()))


class LMSplitter:
    """Prompts a local causal LM to list the sub-sentences, one per line; falls back to a `RuleSplitter`.

    The answer is kept only if it is grounded in the response: each kept line must take at least `grounding` of
    its words from the response, and the kept lines together must cover at least `coverage` of the response's
    words (an LM that rewrites or drops content would bias the hardness). Otherwise, or when the answer is empty,
    the rule splitter's result is returned and `fallbacks` is incremented. Lines are stripped of list markers and
    cut to the CLIP limit with the fallback's `fit_to_limit`. Generation is greedy, so the result is deterministic
    for a given model. One response is generated at a time: this is the slow, optional path.

    Args:
        model_path: local folder of a causal LM and its tokenizer (loaded with transformers, offline).
        fallback: the rule splitter used for fallbacks and for the length limit.
        device: where the LM runs.
        max_new_tokens: the longest answer generated.
    """

    PROMPT = (
        "Split the following text into short, self-contained sub-sentences. Copy the words of the text; do not "
        "add, drop or rephrase anything. Write one sub-sentence per line and nothing else.\n\nText: {text}\n\n"
        "Sub-sentences:\n"
    )

    def __init__(
        self,
        model_path: str,
        fallback: RuleSplitter,
        device: str = "cpu",
        max_new_tokens: int = 256,
        grounding: float = 0.8,
        coverage: float = 0.8,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True).to(device).eval()
        self.device = device
        self.fallback = fallback
        self.max_new_tokens = max_new_tokens
        self.grounding = grounding
        self.coverage = coverage
        self.fallbacks = 0

    def _prompt_ids(self, text: str) -> Any:
        prompt = self.PROMPT.format(text=text)
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        return self.tokenizer(prompt, return_tensors="pt")

    def generate(self, text: str) -> str:
        """The model's raw answer for one response."""
        import torch

        inputs = self._prompt_ids(text).to(self.device)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        with torch.no_grad():
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad_id
            )
        prompt_length = inputs["input_ids"].shape[1]
        return self.tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)

    def parse(self, answer: str, text: str) -> list[str]:
        """The grounded lines of an answer, markers stripped; [] when the answer fails the coverage check."""
        source_words = _word_set(text)
        kept = []
        for line in answer.splitlines():
            line = _LINE_MARKER.sub("", line).strip()
            words = _WORDS.findall(line.lower())
            if words and sum(word in source_words for word in words) >= self.grounding * len(words):
                kept.append(line)
        covered = set().union(*(_word_set(line) for line in kept)) if kept else set()
        if len(covered & source_words) < self.coverage * len(source_words):
            return []
        return kept

    def split(self, text: str) -> list[str]:
        if not text.strip():
            return []
        lines = self.parse(self.generate(text), text)
        if not lines:
            self.fallbacks += 1
            return self.fallback.split(text)
        return [piece for line in lines for piece in self.fallback.fit_to_limit(line)]

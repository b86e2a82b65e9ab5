"""`dama eval-amber`: AMBER (Wang et al., 2023, github.com/junyangwang0410/AMBER), scored by the rules of its
`inference.py`, offline.

AMBER's `annotations.json` lists every query by `id`: generative ones (1-1004, "Describe this image.") with the
objects that are in the image (`truth`) and objects a model is likely to invent (`hallu`), discriminative ones with
a yes/no `truth` and a `type` that names the dimension: existence (`discriminative-hallucination`), attribute
(`discriminative-attribute-{state,number,action}`) and relation (every other type).

Discriminative task. AMBER counts an answer only when it is exactly "Yes" or "No"; here an answer is first
normalised: its first word (letters only, any case) "yes" or "no" gives Yes or No, anything else neither (wrong for
accuracy, and not a "No"). AMBER takes "no" as the positive class:

    accuracy  = correct answers / questions
    precision = answers "No" to a question whose truth is no / answers "No"
    recall    = answers "No" to a question whose truth is no / questions whose truth is no
    F1        = 2 precision recall / (precision + recall)

AMBER rounds precision and recall to 0.1 % before its F1 and adds 1e-4 (1e-3 for existence) to the F1's
denominator, so its printed F1 can differ from round(100 * f1, 1) by 0.1.

Generative task. The nouns of a response that are in AMBER's vocabulary (`relation.json`'s words, keys and values)
are compared with the image's annotation, repeats included:
- a word of `safe_words.txt` is never a hallucination;
- a truth object, or a word `relation.json` associates with one, is correct and covers that object (the first
  match in AMBER's order: the associated words of each truth object, then the truth objects themselves);
- any other noun is a hallucination; when it is one of the `hallu` objects or a word associated with one, it also
  marks that object as produced.

    CHAIR = hallucinated nouns / nouns                      Cover = truth objects covered / truth objects
    Hal   = responses with a hallucinated noun / responses  Cog   = hallu objects produced / hallu objects

AMBER's nouns come from NLTK's tagger and WordNet lemmatiser, and a noun that is no exact match may still match a
truth or hallu object through spaCy word vectors (similarity above 0.8). Neither runs offline, so here a noun is any
word of the vocabulary (case-sensitive, as AMBER's lemmas are: "Dog" never counts) after a rule-based singular
(`singular_in`), and matching is exact. The README says how the figures can differ.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from dama.command import run_command
from dama.data.formats import read_json_file, write_json_atomic
from dama.errors import DamaError

_TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
# Plurals that the suffix rules below do not undo (WordNet's exception list holds these and more).
IRREGULAR_SINGULARS: dict[str, str] = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth", "mice": "mouse",
    "geese": "goose", "oxen": "ox", "leaves": "leaf", "knives": "knife", "wolves": "wolf", "shelves": "shelf",
    "loaves": "loaf", "calves": "calf", "halves": "half", "scarves": "scarf", "wives": "wife", "lives": "life",
}
# (suffix, replacement) of WordNet's noun rules, in its order.
_NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
                  ("men", "man"), ("ies", "y"))
DIMENSIONS = ("existence", "attribute", "state", "number", "action", "relation")
_ATTRIBUTE_TYPES = {"discriminative-attribute-state": "state", "discriminative-attribute-number": "number",
                    "discriminative-attribute-action": "action"}


def singular_in(word: str, vocabulary: Mapping[str, Any] | frozenset[str]) -> str | None:
    """The shortest of `word` and its singular forms that is in `vocabulary`, as WordNet's lemmatiser picks the
    shortest lemma it knows; None when none is. Like WordNet, a word of the irregular table gets only its table form
    ("leaves" is "leaf", never "leave"); other words get the suffix rules."""
    candidates = {word}
    if word in IRREGULAR_SINGULARS:
        candidates.add(IRREGULAR_SINGULARS[word])
    else:
        candidates.update(word[:-len(suffix)] + replacement for suffix, replacement in _NOUN_SUFFIXES
                          if word.endswith(suffix) and len(word) > len(suffix))
    known = [candidate for candidate in candidates if candidate in vocabulary]
    return min(known, key=lambda candidate: (len(candidate), candidate)) if known else None


@dataclass(frozen=True)
class AmberVocabulary:
    """`relation.json` (object -> associated words) and `safe_words.txt`; `words` are all the words either names."""

    relations: dict[str, list[str]]
    safe_words: frozenset[str]

    @cached_property
    def words(self) -> frozenset[str]:
        return frozenset(self.relations).union(word for associated in self.relations.values() for word in associated)

    def nouns(self, response: str) -> list[str]:
        """The vocabulary's words in `response`, singular, in reading order, repeats included."""
        vocabulary = self.words
        found = (singular_in(token, vocabulary) for token in _TOKEN.findall(response))
        return [noun for noun in found if noun is not None]

    def associated(self, objects: Sequence[str]) -> list[tuple[str, int]]:
        """(word, index of the object it names) in AMBER's order: each object's associated words, then the objects."""
        missing = [name for name in objects if name not in self.relations]
        if missing:
            raise DamaError(f"object(s) {missing} of the annotations are not keys of relation.json: give the "
                             "relation.json that ships with these annotations")
        pairs = [(word, index) for index, name in enumerate(objects) for word in self.relations[name]]
        return pairs + [(name, index) for index, name in enumerate(objects)]


@dataclass
class GenerativeScore:
    """One description: its vocabulary nouns, which are hallucinated, and which truth / hallu objects it covers."""

    id: int
    nouns: list[str]
    hallucinated: list[str]
    covered: list[str]
    truth: list[str]
    produced_hallu: list[str]
    hallu: list[str]


def _first_match(noun: str, pairs: Iterable[tuple[str, int]]) -> int | None:
    return next((index for word, index in pairs if word == noun), None)


def score_description(vocabulary: AmberVocabulary, response: str, truth: Sequence[str], hallu: Sequence[str],
                      id: int = 0) -> GenerativeScore:
    """AMBER's generative rules for one response (module docstring), exact matching in place of word vectors."""
    truth_pairs, hallu_pairs = vocabulary.associated(truth), vocabulary.associated(hallu)
    covered, produced, hallucinated = set(), set(), []
    nouns = vocabulary.nouns(response)
    for noun in nouns:
        if noun in vocabulary.safe_words:
            continue
        index = _first_match(noun, truth_pairs)
        if index is not None:
            covered.add(index)
            continue
        index = _first_match(noun, hallu_pairs)
        if index is not None:
            produced.add(index)
        hallucinated.append(noun)
    return GenerativeScore(id=id, nouns=nouns, hallucinated=hallucinated,
                           covered=[truth[i] for i in sorted(covered)], truth=list(truth),
                           produced_hallu=[hallu[i] for i in sorted(produced)], hallu=list(hallu))


def generative_totals(scores: Sequence[GenerativeScore]) -> dict[str, float | int]:
    """CHAIR, Cover, Hal and Cog (fractions) over scored descriptions, with the counts they come from."""
    nouns = sum(len(score.nouns) for score in scores)
    hallucinated = sum(len(score.hallucinated) for score in scores)
    truth = sum(len(score.truth) for score in scores)
    hallu = sum(len(score.hallu) for score in scores)
    responses_with_hallucination = sum(1 for score in scores if score.hallucinated)
    return {
        "chair": hallucinated / nouns if nouns else 0.0,
        "cover": sum(len(score.covered) for score in scores) / truth if truth else 0.0,
        "hal": responses_with_hallucination / len(scores) if scores else 0.0,
        "cog": sum(len(score.produced_hallu) for score in scores) / hallu if hallu else 0.0,
        "responses": len(scores),
        "nouns": nouns,
        "hallucinated_nouns": hallucinated,
    }


def yes_or_no(answer: str) -> str | None:
    """"Yes" or "No" when the answer's first word is yes or no (any case, punctuation ignored), else None."""
    match = re.match(r"\W*([A-Za-z]+)", answer)
    word = match.group(1).lower() if match else ""
    return {"yes": "Yes", "no": "No"}.get(word)


def dimension_of(query_type: str) -> tuple[str, str | None]:
    """(dimension, attribute kind or None) of a discriminative query's annotation `type`, as AMBER groups them."""
    if query_type == "discriminative-hallucination":
        return "existence", None
    if query_type in _ATTRIBUTE_TYPES:
        return "attribute", _ATTRIBUTE_TYPES[query_type]
    return "relation", None


def discriminative_metrics(truths: Sequence[str], answers: Sequence[str | None]) -> dict[str, float | int]:
    """AMBER's accuracy, precision, recall and F1 with "no" the positive class (0 where a denominator is 0)."""
    pairs = list(zip(truths, answers, strict=True))
    correct = sum(1 for truth, answer in pairs if answer is not None and answer.lower() == truth)
    answered_no = sum(1 for _, answer in pairs if answer == "No")
    truly_no = sum(1 for truth, _ in pairs if truth == "no")
    both = sum(1 for truth, answer in pairs if truth == "no" and answer == "No")
    precision = both / answered_no if answered_no else 0.0
    recall = both / truly_no if truly_no else 0.0
    return {"accuracy": correct / len(pairs) if pairs else 0.0, "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "questions": len(pairs)}


def read_annotations(path: str | Path) -> dict[int, dict[str, Any]]:
    """AMBER's annotations.json as {id: entry}."""
    data = read_json_file(Path(path), "annotations file")
    if not isinstance(data, list) or not all(isinstance(entry, dict) and "id" in entry and "type" in entry
                                             and "truth" in entry for entry in data):
        raise DamaError(f"{path} is not AMBER's annotations.json: expected a list of {{id, type, truth[, hallu]}}")
    return {int(entry["id"]): entry for entry in data}


def read_vocabulary(relations_path: str | Path, safe_words_path: str | Path | None) -> AmberVocabulary:
    relations = read_json_file(Path(relations_path), "relations file")
    if not isinstance(relations, dict) or not all(isinstance(words, list) for words in relations.values()):
        raise DamaError(f"{relations_path} is not AMBER's relation.json: expected {{object: [associated words]}}")
    safe = set()
    if safe_words_path is not None:
        path = Path(safe_words_path)
        if not path.is_file():
            raise DamaError(f"safe words file {path} does not exist")
        safe = {line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}
    return AmberVocabulary({str(key): [str(word) for word in words] for key, words in relations.items()},
                           frozenset(safe))


def read_amber_responses(path: str | Path) -> list[tuple[int, str]]:
    """(id, response) pairs from AMBER's `[{"id", "response"}]` JSON or `dama generate`'s JSONL."""
    path = Path(path)
    if not path.is_file():
        raise DamaError(f"responses file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as error:
            raise DamaError(f"{path} is neither a JSON list nor JSON lines ({error})") from error
    if isinstance(records, dict):  # JSON lines holding a single response
        records = [records]
    if not isinstance(records, list):
        raise DamaError(f"{path}: expected a list of {{id, response}}")
    pairs = []
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not isinstance(record.get("response"), str):
            raise DamaError(f"{path}, response {number}: expected an object with an AMBER `id` and a text `response`")
        try:
            pairs.append((int(record.get("id")), record["response"]))
        except (TypeError, ValueError) as error:
            raise DamaError(f"{path}, response {number}: id {record.get('id')!r} is not an AMBER query id (an "
                             "integer from 1 to 15220)") from error
    return pairs


def evaluate_amber(responses: Sequence[tuple[int, str]], annotations: Mapping[int, Mapping[str, Any]],
                   vocabulary: AmberVocabulary | None) -> dict[str, Any]:
    """The `{"discriminative": ..., "generative": ...}` report, each part present when the responses cover it."""
    seen, descriptions = set(), []
    groups: dict[str, tuple[list[str], list[str | None]]] = {}
    for id, response in responses:
        if id not in annotations:
            raise DamaError(f"response id {id} is not in the annotations file")
        if id in seen:
            raise DamaError(f"query {id} is answered twice")
        seen.add(id)
        entry = annotations[id]
        if entry["type"] == "generative":
            if vocabulary is None:
                raise DamaError("the responses answer generative queries: give --relations relation.json (and "
                                 "--safe-words safe_words.txt)")
            descriptions.append(score_description(vocabulary, response, entry["truth"], entry.get("hallu", []), id))
            continue
        dimension, attribute = dimension_of(entry["type"])
        answer, truth = yes_or_no(response), str(entry["truth"])
        for group in ("all", dimension, attribute):
            if group is not None:
                truths, answers = groups.setdefault(group, ([], []))
                truths.append(truth)
                answers.append(answer)
    report: dict[str, Any] = {}
    if groups:
        report["discriminative"] = {**discriminative_metrics(*groups["all"]),
                                    **{name: discriminative_metrics(*groups[name]) for name in DIMENSIONS
                                       if name in groups}}
    if descriptions:
        report["generative"] = {**generative_totals(descriptions),
                                "per_response": [vars(score) for score in descriptions]}
    if not report:
        raise DamaError("no responses to score")
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """AMBER's figures in percent, rounded to 0.1 as its script prints them."""
    lines = []
    if "generative" in report:
        part = report["generative"]
        lines += [f"Generative task ({part['responses']} descriptions, {part['nouns']} nouns):",
                  "  " + "   ".join(f"{name} {100 * part[key]:.1f}" for name, key in
                                    (("CHAIR", "chair"), ("Cover", "cover"), ("Hal", "hal"), ("Cog", "cog")))]
    if "discriminative" in report:
        part = report["discriminative"]
        lines.append(f"Discriminative task ({part['questions']} questions; 'no' is positive):")
        for name, metrics in (("overall", part), *((name, part[name]) for name in DIMENSIONS if name in part)):
            lines.append(f"  {name:<10}" + "   ".join(f"{key} {100 * metrics[key]:.1f}" for key in
                                                   ("accuracy", "precision", "recall", "f1")))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama eval-amber",
        description="Score responses to AMBER's queries with the rules of AMBER's inference.py, offline: the "
        "discriminative yes/no task (accuracy, precision, recall, F1 with 'no' positive, overall and per dimension) "
        "and the generative task (CHAIR, Cover, Hal, Cog from the nouns matched against AMBER's vocabulary). "
        "Exact word matching replaces AMBER's NLTK tagging and spaCy near-synonyms (see the README).",
    )
    parser.add_argument("responses", help='AMBER\'s response file ([{"id", "response"}]) or `dama generate`\'s '
                        "JSONL for the prompts of `dama benchmark-prompts amber`")
    parser.add_argument("--annotations", required=True, help="AMBER's data/annotations.json")
    parser.add_argument("--relations", default=None,
                        help="AMBER's data/relation.json (needed for generative responses)")
    parser.add_argument("--safe-words", default=None, help="AMBER's data/safe_words.txt (words never hallucinated)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help='also write {"discriminative": {accuracy, precision, recall, f1, <dimension>: {...}}, '
                        '"generative": {chair, cover, hal, cog, ...}} (fractions) to PATH')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        vocabulary = None if args.relations is None else read_vocabulary(args.relations, args.safe_words)
        report = evaluate_amber(read_amber_responses(args.responses), read_annotations(args.annotations), vocabulary)
        if args.json is None:
            return format_report(report)
        write_json_atomic(args.json, report)
        return f"{format_report(report)}\n\nwrote {args.json}"

    return run_command("eval-amber", action)


if __name__ == "__main__":
    sys.exit(main())

"""`dama eval-chair`: CHAIR object hallucination (Rohrbach et al., 2018) as Object HalBench reports it, offline.

Objects mentioned in a response are found by word matching: the text is lower-cased and split into words (letters
and digits; "hot-dog" is "hot dog"), and the longest phrase of the vocabulary that starts at each word is taken, so
"hot dogs" is one mention of "hot dog" and not one of "dog", "dining table" not one of "dining table" and "table".
The vocabulary is the annotation file's categories: each category is named by its own `synonyms` list when the file
gives one (an extension of the COCO format), else by the COCO synonyms of `coco_objects` when its name is a COCO
category, else by its name alone; plural forms are added to each.

A mention is hallucinated when its category is not among the image's ground-truth objects: the categories of the
image's `annotations` in the instances file(s), plus, with `--captions`, the objects mentioned in the image's
reference captions (as CHAIR does). Each category counts once per response, as Object HalBench counts the objects of
a response (a response that says "dog" twice mentions one object). Then

    CHAIR_s = responses with at least one hallucinated object / responses
    CHAIR_i = hallucinated mentions / all mentions            (0 when nothing is mentioned)
    recall  = mentioned ground-truth objects / all ground-truth objects of the responses' images

A response that mentions no object is counted in CHAIR_s's denominator as not hallucinating; recall shows whether a
lower CHAIR comes from saying less. Beside them, the report holds Object HalBench's own figures, `response_hall`,
`object_hall` and `object_recall`, counted by that benchmark's rules (`dama.evaluation.object_halbench`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dama.command import run_command
from dama.data.formats import read_json_file, write_json_atomic
from dama.errors import DamaError
from dama.evaluation.coco_objects import ANIMALS, COCO_SYNONYMS, NOT_OBJECTS, YOUNG_AND_OLD, plural
from dama.evaluation.object_halbench import format_object_halbench, object_halbench_totals

_WORD = re.compile(r"[a-z0-9]+")
# Punctuation that ends a phrase: "a computer, mice" mentions a computer and mice, never "computer mice".
_PHRASE_BREAK = re.compile(r"[^\w\s'’-]+")


def words(text: str) -> list[str]:
    """The lower-cased words of a text: runs of letters and digits (punctuation and hyphens separate words)."""
    return _WORD.findall(text.lower())


@dataclass(frozen=True)
class Mention:
    """One object mention: the words as they appear in the response, and the category they name."""

    text: str
    category: str


class ObjectVocabulary:
    """Phrases (tuples of words) that name categories, and the phrases that hide object words (`NOT_OBJECTS`).

    Args:
        synonyms: category name -> the singular words and phrases naming it; the name itself always counts.
    """

    def __init__(self, synonyms: Mapping[str, Sequence[str]]):
        self._phrases: dict[tuple[str, ...], str | None] = {}
        # A matched phrase (as `Mention.text` spells it) -> its singular form, for counting distinct object words.
        self.singular: dict[str, str] = {}
        for category, forms in synonyms.items():
            for form in (category, *forms):
                for variant in (form, plural(form)):
                    self._add(variant, category)
                self.singular[" ".join(words(plural(form)))] = " ".join(words(form))
        for animal in ANIMALS:
            category = self._phrases.get((animal,))
            if category is not None:
                for modifier in YOUNG_AND_OLD:
                    self._add(f"{modifier} {animal}", category)
                    self._add(f"{modifier} {plural(animal)}", category)
                    self.singular[f"{modifier} {' '.join(words(plural(animal)))}"] = f"{modifier} {animal}"
        for phrase in NOT_OBJECTS:
            for key in (tuple(words(phrase)), tuple(words(plural(phrase)))):
                if key not in self._phrases and self._contains_object(key):
                    self._phrases[key] = None
        self.categories = tuple(synonyms)
        self._longest = max((len(key) for key in self._phrases), default=1)

    def _add(self, phrase: str, category: str) -> None:
        key = tuple(words(phrase))
        if not key:
            raise DamaError(f"category {category!r}: {phrase!r} has no words to match")
        known = self._phrases.get(key)
        if known is not None and known != category:
            raise DamaError(f"{' '.join(key)!r} would name both {known!r} and {category!r}; give it to one only")
        self._phrases[key] = category

    def _contains_object(self, key: tuple[str, ...]) -> bool:
        return any(self._phrases.get(key[start:end]) for start in range(len(key))
                   for end in range(start + 1, len(key) + 1))

    @classmethod
    def for_categories(cls, names: Iterable[str], synonyms: Mapping[str, Sequence[str]] | None = None
                       ) -> ObjectVocabulary:
        """The vocabulary of an annotation file's categories: `synonyms[name]` when given, else the COCO synonyms
        when `name` is a COCO category, else the name alone."""
        synonyms = synonyms or {}
        return cls({name: tuple(synonyms.get(name) or COCO_SYNONYMS.get(name) or (name,)) for name in names})

    def mentions(self, text: str) -> list[Mention]:
        """Every object mention in `text`, in reading order (repeats included); longest phrase first."""
        found = []
        for segment in _PHRASE_BREAK.split(text):
            tokens, start = words(segment), 0
            while start < len(tokens):
                for length in range(min(self._longest, len(tokens) - start), 0, -1):
                    key = tuple(tokens[start:start + length])
                    if key in self._phrases:
                        category = self._phrases[key]
                        if category is not None:
                            found.append(Mention(" ".join(key), category))
                        start += length
                        break
                else:
                    start += 1
        return found


@dataclass
class GroundTruth:
    """The objects of each image, from COCO-format annotation files.

    `objects` maps an image id to the category names present; `file_names` maps an image's file name (its path as
    given, its base name and its stem) to its id, so that a response may name its image either way; `synonyms` holds
    the categories' own synonym lists.
    """

    categories: list[str]
    objects: dict[Any, set[str]]
    file_names: dict[str, Any] = field(default_factory=dict)
    synonyms: dict[str, list[str]] = field(default_factory=dict)

    def image_key(self, image_id: Any) -> Any:
        """The annotations' id of the image a response names (by id, id as text, or file name); None if unknown."""
        if image_id is None or isinstance(image_id, bool):
            return None
        if isinstance(image_id, int) and image_id in self.objects:
            return image_id
        text = str(image_id).strip()
        if text.lstrip("-").isdigit() and int(text) in self.objects:
            return int(text)
        if text in self.objects:
            return text
        for key in (text, Path(text).name, Path(text).stem):
            if key in self.file_names:
                return self.file_names[key]
        return None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise DamaError(f"{what} {path}: expected a COCO-format JSON object with images and annotations")
    return data


def _require(data: Mapping[str, Any], keys: Sequence[str], path: Path) -> None:
    missing = [key for key in keys if not isinstance(data.get(key), list)]
    if missing:
        raise DamaError(f"{path} is not a COCO instances file: it lacks the list(s) {missing}")


def read_instances(paths: Sequence[str | Path]) -> GroundTruth:
    """The images, categories and per-image objects of one or more COCO instances files (e.g. train and val)."""
    if not paths:
        raise DamaError("give at least one annotations file (COCO instances format)")
    names: dict[Any, str] = {}
    truth = GroundTruth(categories=[], objects={})
    for path in map(Path, paths):
        data = _read_json(path, "annotations file")
        _require(data, ("images", "annotations", "categories"), path)
        for category in data["categories"]:
            if "id" not in category or not category.get("name"):
                raise DamaError(f"{path}: every category needs an id and a name, got {category}")
            name = str(category["name"]).strip().lower()
            if names.setdefault(category["id"], name) != name:
                raise DamaError(f"{path}: category id {category['id']} is {name!r} here but {names[category['id']]!r}"
                                " in an earlier file")
            if name not in truth.categories:
                truth.categories.append(name)
            if category.get("synonyms"):
                truth.synonyms[name] = [str(s).lower() for s in category["synonyms"]]
        for image in data["images"]:
            truth.objects.setdefault(image["id"], set())
            if image.get("file_name"):
                file_name = Path(str(image["file_name"]))
                for key in (str(file_name), file_name.name, file_name.stem):
                    truth.file_names.setdefault(key, image["id"])
        for annotation in data["annotations"]:
            image_id, category_id = annotation.get("image_id"), annotation.get("category_id")
            if category_id not in names:
                raise DamaError(f"{path}: annotation {annotation.get('id')} has category_id {category_id}, which is "
                                "not among the categories")
            truth.objects.setdefault(image_id, set()).add(names[category_id])
    return truth


def add_caption_objects(truth: GroundTruth, paths: Sequence[str | Path], vocabulary: ObjectVocabulary,
                        images: set[Any] | None = None) -> None:
    """Adds the objects that COCO-format reference captions (`annotations` with `image_id`, `caption`) mention,
    for the images of `images` only when it is given (COCO has hundreds of thousands of captions)."""
    for path in map(Path, paths):
        data = _read_json(path, "captions file")
        _require(data, ("annotations",), path)
        for annotation in data["annotations"]:
            key = truth.image_key(annotation.get("image_id"))
            if key is not None and (images is None or key in images):
                truth.objects[key].update(m.category for m in vocabulary.mentions(str(annotation.get("caption", ""))))


@dataclass
class ResponseScore:
    """One response: the categories it mentions (once each, in order), those not in its image, and the words used."""

    id: Any
    image_id: Any
    mentioned: list[str]
    hallucinated: list[str]
    hallucinated_words: list[str]
    ground_truth: list[str]


def score_response(vocabulary: ObjectVocabulary, response: str, present: set[str], id: Any = None,
                   image_id: Any = None) -> ResponseScore:
    """Score one response against the set of category names present in its image."""
    mentioned: dict[str, str] = {}
    for mention in vocabulary.mentions(response):
        mentioned.setdefault(mention.category, mention.text)
    hallucinated = [category for category in mentioned if category not in present]
    return ResponseScore(id=id, image_id=image_id, mentioned=list(mentioned), hallucinated=hallucinated,
                         hallucinated_words=[mentioned[category] for category in hallucinated],
                         ground_truth=sorted(present))


def chair_totals(scores: Sequence[ResponseScore]) -> dict[str, Any]:
    """CHAIR_s, CHAIR_i and recall over scored responses, with the counts they come from (see the module docstring)."""
    mentions = sum(len(score.mentioned) for score in scores)
    hallucinated_mentions = sum(len(score.hallucinated) for score in scores)
    hallucinated_responses = sum(1 for score in scores if score.hallucinated)
    truth_objects = sum(len(score.ground_truth) for score in scores)
    found = sum(len(score.mentioned) - len(score.hallucinated) for score in scores)
    return {
        "chair_s": hallucinated_responses / len(scores) if scores else 0.0,
        "chair_i": hallucinated_mentions / mentions if mentions else 0.0,
        "recall": found / truth_objects if truth_objects else 0.0,
        "responses": len(scores),
        "hallucinated_responses": hallucinated_responses,
        "responses_with_objects": sum(1 for score in scores if score.mentioned),
        "mentions": mentions,
        "hallucinated_mentions": hallucinated_mentions,
        "ground_truth_objects": truth_objects,
    }


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """The records of a `dama generate` JSONL file (each needs `response` and `image_id`)."""
    path = Path(path)
    if not path.is_file():
        raise DamaError(f"responses file {path} does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DamaError(f"{path}, line {number}: not a JSON object ({error})") from error
            if not isinstance(record, dict) or not isinstance(record.get("response"), str) or "image_id" not in record:
                raise DamaError(f"{path}, line {number}: expected an object with a text `response` and an `image_id`"
                                " (the output of `dama generate`)")
            records.append(record)
    return records


def evaluate_chair(responses: Sequence[Mapping[str, Any]], annotations: Sequence[str | Path],
                   captions: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Score `dama generate` records against COCO-format annotations: the totals and a `per_response` list.

    DamaError when a response names an image the annotations do not hold (the wrong instances file, or no image_id).
    """
    truth = read_instances(annotations)
    vocabulary = ObjectVocabulary.for_categories(truth.categories, truth.synonyms)
    keys = [truth.image_key(record.get("image_id")) for record in responses]
    unknown = [record.get("image_id") for record, key in zip(responses, keys, strict=True) if key is None]
    if unknown:
        raise DamaError(f"{len(unknown)} of {len(responses)} responses name images the annotations do not hold (first:"
                        f" image_id {unknown[0]!r}); give the instances file of those images")
    if captions:
        add_caption_objects(truth, captions, vocabulary, images=set(keys))
    scores = [score_response(vocabulary, record["response"], truth.objects[key], id=record.get("id", number),
                             image_id=record.get("image_id"))
              for number, (record, key) in enumerate(zip(responses, keys, strict=True))]
    object_halbench = object_halbench_totals(vocabulary, [record["response"] for record in responses],
                                             [truth.objects[key] for key in keys])
    return {**chair_totals(scores), **object_halbench, "per_response": [asdict(score) for score in scores]}


def format_report(report: Mapping[str, Any], examples: int = 5) -> str:
    """The totals as a small table, then up to `examples` responses with their hallucinated objects."""
    header = ("responses", "mentions", "hallucinated", "CHAIR_s", "CHAIR_i", "recall")
    values = (f"{report['responses']}", f"{report['mentions']}", f"{report['hallucinated_mentions']}",
              f"{100 * report['chair_s']:.1f}%", f"{100 * report['chair_i']:.1f}%", f"{100 * report['recall']:.1f}%")
    widths = [max(len(a), len(b)) for a, b in zip(header, values, strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)),
             "  ".join(v.rjust(w) for v, w in zip(values, widths, strict=True))]
    lines += ["", format_object_halbench(report)]
    shown = [score for score in report["per_response"] if score["hallucinated"]][:examples]
    if shown:
        lines.append("")
        lines += [f"{score['id']}: hallucinated {', '.join(score['hallucinated_words'])} (image has: "
                  f"{', '.join(score['ground_truth']) or 'no annotated object'})" for score in shown]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dama eval-chair",
        description="Score responses for object hallucination with CHAIR, offline and rule-based: the objects a "
        "response mentions (COCO's 80 categories with synonyms and plurals, or the annotation file's own categories) "
        "are compared with the image's annotated objects. CHAIR_s = responses with a hallucinated object / "
        "responses; CHAIR_i = hallucinated mentions / mentions (each category once per response); recall = "
        "ground-truth objects mentioned / ground-truth objects. Also prints Object HalBench's Response Hall "
        "(hallucinating responses / responses naming a COCO object), Object Hall and Object Recall, by its rules.",
    )
    parser.add_argument("responses", help="JSONL written by `dama generate` (id, image_id, question, response)")
    parser.add_argument("--annotations", action="append", required=True, metavar="INSTANCES_JSON",
                        help="COCO-format instances file (images, annotations with category_id, categories with name); "
                        "repeat it to combine files, e.g. instances_train2014.json and instances_val2014.json")
    parser.add_argument("--captions", action="append", default=[], metavar="CAPTIONS_JSON",
                        help="COCO-format captions file(s): objects their reference captions mention also count as "
                        "present, as in CHAIR (optional, repeatable)")
    parser.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                        help="write the report as JSON (chair_s, chair_i, recall, response_hall, object_hall, "
                        "object_recall, counts and per_response detail) to "
                        "PATH; `--json` alone prints it instead of the table")
    parser.add_argument("--examples", type=int, default=5,
                        help="hallucinating responses shown under the table (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def action() -> str:
        report = evaluate_chair(read_responses(args.responses), args.annotations, args.captions)
        if args.json == "-":
            return json.dumps(report, indent=2)
        shown = format_report(report, args.examples)
        if args.json is not None:
            write_json_atomic(args.json, report)
            shown += f"\n\nwrote {args.json}"
        return shown

    return run_command("eval-chair", action)


if __name__ == "__main__":
    sys.exit(main())

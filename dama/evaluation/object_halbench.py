"""Object HalBench's three figures, counted as RLHF-V / RLAIF-V count them (`eval/eval_gpt_obj_halbench.py`, printed
by `eval/summarize_gpt_obj_halbench_review.py`), for `dama eval-chair`.

Their script asks GPT for the objects a response names, keeps each distinct (lemmatised) object word once, maps the
words to COCO categories with CHAIR's synonym list and compares the categories with the image's objects (COCO
instances and reference captions of train and val 2014). Here the object words are what `ObjectVocabulary` matches,
each counted once per response in its singular form ("dogs" and "dog" are one word, "puppy" and "dog" two words of
one category, as two extracted words would be). Their rules carried over:

- a response of at most three words (split at white space) names no object: their script skips GPT for it;
- Response Hall (`CHAIRs_refine`) = responses with a hallucinated object word / responses that name at least one
  COCO object, so a response that names none is left out instead of counting as faithful;
- Object Hall (`CHAIRi`) = hallucinated object words / object words;
- Object Recall (`obj_rec`) = distinct correctly named categories / the images' categories, summed over responses
  (every response counts in the denominator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dama.evaluation.chair import ObjectVocabulary

# Responses of at most this many words get no object extraction in Object HalBench's script.
SHORT_ANSWER_WORDS = 3


def object_words(vocabulary: ObjectVocabulary, response: str) -> dict[str, str]:
    """The distinct object words of a response (singular form -> category) in reading order; none for a response
    of at most `SHORT_ANSWER_WORDS` words."""
    if len(response.split()) <= SHORT_ANSWER_WORDS:
        return {}
    found: dict[str, str] = {}
    for mention in vocabulary.mentions(response):
        found.setdefault(vocabulary.singular.get(mention.text, mention.text), mention.category)
    return found


def object_halbench_totals(vocabulary: ObjectVocabulary, responses: Sequence[str],
                           present: Sequence[set[str]]) -> dict[str, Any]:
    """response_hall, object_hall and object_recall (fractions, 0 for an empty denominator) over responses and
    the category sets of their images, with the counts under `object_halbench`."""
    with_objects = hallucinating = word_count = hallucinated_words = recalled = truth = 0
    for response, objects in zip(responses, present, strict=True):
        truth += len(objects)
        found = object_words(vocabulary, response)
        if not found:
            continue
        wrong = [word for word, category in found.items() if category not in objects]
        with_objects += 1
        hallucinating += bool(wrong)
        word_count += len(found)
        hallucinated_words += len(wrong)
        recalled += len({category for category in found.values() if category in objects})
    return {
        "response_hall": hallucinating / with_objects if with_objects else 0.0,
        "object_hall": hallucinated_words / word_count if word_count else 0.0,
        "object_recall": recalled / truth if truth else 0.0,
        "object_halbench": {"responses_with_objects": with_objects, "hallucinating_responses": hallucinating,
                            "object_words": word_count, "hallucinated_words": hallucinated_words,
                            "recalled_objects": recalled, "ground_truth_objects": truth},
    }


def format_object_halbench(report: dict[str, Any]) -> str:
    """The three figures under Object HalBench's names, in percent with two decimals as its summary prints them."""
    return (f"Object HalBench: Response Hall {100 * report['response_hall']:.2f}   Object Hall "
            f"{100 * report['object_hall']:.2f}   Object Recall {100 * report['object_recall']:.2f}   "
            f"({report['object_halbench']['responses_with_objects']} of {report['responses']} responses name a "
            "COCO object)")

"""Sub-sentence splitting: the rule splitter's cases, its length limit, and the LM splitter's fallback."""

import pytest
import torch

from dama.demo.tiny_clip import train_clip_tokenizer
from dama.offline.splitting import (
    CLIP_TEXT_LIMIT,
    LMSplitter,
    RuleSplitter,
    Splitter,
    approximate_clip_tokens,
    clip_token_counter,
)

LONG_SENTENCE = (
    "The large brown dog with a bright red collar is sitting near the old wooden fence at the back of the garden, "
    "and a small white cat with green eyes is watching it closely from the open kitchen window, which has blue "
    "curtains; meanwhile two young children in yellow raincoats are playing with a striped beach ball on the wet "
    "grass but their mother is calling them inside because the rain is getting heavier and the sky is dark grey."
)


@pytest.fixture(scope="module")
def clip_count():
    return clip_token_counter(train_clip_tokenizer())


def test_rule_splitter_is_a_splitter():
    assert isinstance(RuleSplitter(), Splitter)


def test_sentences_and_abbreviations():
    text = "Mr. Smith walks a dog, e.g. a beagle, past Dr. Jones. The dog is brown! Is it happy? Yes."
    assert RuleSplitter().split(text) == [
        "Mr. Smith walks a dog, e.g. a beagle, past Dr. Jones.",
        "The dog is brown!",
        "Is it happy?",
        "Yes.",
    ]


def test_abbreviations_that_may_end_a_sentence():
    text = "There are apples, pears, etc. on the table. It also has cups, plates, etc. The table is made of oak."
    assert RuleSplitter().split(text) == [
        "There are apples, pears, etc. on the table.",
        "It also has cups, plates, etc.",
        "The table is made of oak.",
    ]


def test_numbers_initials_and_acronyms():
    text = "See Fig. 2 and No. 7 on the wall. J. K. Rowling signed a U.S. flag. Then she left... Nobody stayed."
    assert RuleSplitter().split(text) == [
        "See Fig. 2 and No. 7 on the wall.",
        "J. K. Rowling signed a U.S. flag.",
        "Then she left...",
        "Nobody stayed.",
    ]


def test_decimals_do_not_end_sentences():
    text = "The bottle holds 3.5 litres and costs $2.99. The ratio is 0.75."
    assert RuleSplitter().split(text) == ["The bottle holds 3.5 litres and costs $2.99.", "The ratio is 0.75."]


def test_numbered_and_bulleted_lists():
    text = (
        "The image shows:\n1. A red car parked on the street.\n2) A blue bus. It is empty.\n- a bicycle\n"
        "* a tree\n• a bench\n(a) a lamp post"
    )
    assert RuleSplitter().split(text) == [
        "The image shows:",
        "A red car parked on the street.",
        "A blue bus.",
        "It is empty.",
        "a bicycle",
        "a tree",
        "a bench",
        "a lamp post",
    ]


def test_inline_numbered_list():
    text = "There are three objects: 1. a red cup 2. a blue plate 3. a green bowl."
    assert RuleSplitter().split(text) == ["There are three objects:", "a red cup", "a blue plate", "a green bowl."]


def test_quotes_keep_their_sentences_whole():
    text = 'She said, "Stop." Then she left. The sign reads "No parking. Tow away zone." on the pole.'
    assert RuleSplitter().split(text) == [
        'She said, "Stop."',
        "Then she left.",
        'The sign reads "No parking. Tow away zone." on the pole.',
    ]
    curly = "The poster says “Welcome home. We missed you.” in gold letters."
    assert RuleSplitter().split(curly) == [curly]


def test_unbalanced_quote_does_not_swallow_the_text():
    text = 'The label says "fresh. The jar is full.'
    assert RuleSplitter().split(text) == ['The label says "fresh.', "The jar is full."]


def test_whitespace_and_empty_text():
    assert RuleSplitter().split("") == []
    assert RuleSplitter().split("  \n - \n") == []
    assert RuleSplitter().split("A   cat\tsits.\n\nA dog runs.") == ["A cat sits.", "A dog runs."]


def test_long_sentence_is_cut_at_clauses_under_the_limit(clip_count):
    splitter = RuleSplitter(count_tokens=clip_count, max_tokens=CLIP_TEXT_LIMIT)
    assert clip_count(LONG_SENTENCE) > CLIP_TEXT_LIMIT
    pieces = splitter.split(LONG_SENTENCE)
    assert len(pieces) > 1
    assert all(clip_count(piece) <= CLIP_TEXT_LIMIT for piece in pieces)
    assert " ".join(pieces).split() == LONG_SENTENCE.split()
    # Cuts fall on clause boundaries: every piece but the last ends in punctuation or before a conjunction.
    for piece, following in zip(pieces, pieces[1:], strict=False):
        assert piece[-1] in ",;:" or following.split()[0] in {"and", "but", "which", "while", "or", "because"}


def test_clauses_then_length_for_tight_limits(clip_count):
    splitter = RuleSplitter(count_tokens=clip_count, max_tokens=12)
    pieces = splitter.split(LONG_SENTENCE)
    assert all(clip_count(piece) <= 12 for piece in pieces)
    assert " ".join(pieces).split() == LONG_SENTENCE.split()
    no_punctuation = " ".join(["word"] * 200)
    pieces = splitter.split(no_punctuation)
    assert all(clip_count(piece) <= 12 for piece in pieces)
    assert " ".join(pieces) == no_punctuation


def test_default_counter_and_determinism():
    splitter = RuleSplitter()
    assert approximate_clip_tokens("a cat, 12 dogs!") == 9  # a, cat, ",", 1, 2, dogs, "!" + bos + eos
    first = splitter.split(LONG_SENTENCE * 3)
    assert first == RuleSplitter().split(LONG_SENTENCE * 3)
    assert all(approximate_clip_tokens(piece) <= CLIP_TEXT_LIMIT for piece in first)


def test_max_tokens_must_leave_room():
    with pytest.raises(ValueError, match="max_tokens must leave room"):
        RuleSplitter(max_tokens=2)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random two-layer GPT-2 and a byte-level BPE tokenizer trained in-process, saved like a real checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([LONG_SENTENCE, LMSplitter.PROMPT] * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=16, n_layer=2, n_head=2)
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_lm_splitter_falls_back_on_ungrounded_output(tiny_lm):
    rule = RuleSplitter()
    splitter = LMSplitter(str(tiny_lm), fallback=rule, max_new_tokens=24)
    assert isinstance(splitter, Splitter)
    text = "A cat sits on the mat. A dog sleeps."
    assert splitter.split(text) == rule.split(text)
    assert splitter.fallbacks == 1
    assert splitter.split("   ") == []


def test_lm_splitter_falls_back_on_empty_output_and_keeps_grounded_lines(tiny_lm, monkeypatch):
    splitter = LMSplitter(str(tiny_lm), fallback=RuleSplitter(max_tokens=8), max_new_tokens=4)
    text = "A cat sits on the mat and a dog sleeps by the door."
    monkeypatch.setattr(splitter, "generate", lambda _: "")
    assert splitter.split(text) == RuleSplitter(max_tokens=8).split(text)
    assert splitter.fallbacks == 1
    answer = "1. A cat sits on the mat\n2. and a dog sleeps by the door.\n"
    monkeypatch.setattr(splitter, "generate", lambda _: answer)
    # Grounded lines are kept (markers stripped) and cut to the fallback's limit of 8 tokens.
    assert splitter.split(text) == ["A cat sits on the mat", "and a dog sleeps by the", "door."]
    assert splitter.fallbacks == 1
    assert splitter.parse("- A unicorn flies over the moon\n", text) == []
    assert splitter.parse("A cat sits on the mat\n", text) == []  # covers too little of the text

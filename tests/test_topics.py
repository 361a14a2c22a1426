"""Topic grammar and the reference pattern matcher (``alkpubsub.topics``).

Every transport filters with :class:`Pattern`, so this table is the one
definition of matching; the conformance suite checks each transport agrees.
"""

from __future__ import annotations

import pytest

import alkpubsub
from alkpubsub import InvalidTopic, Pattern, validate_topic
from alkpubsub.conformance.patterns import BAD_PATTERNS, BAD_TOPICS, PATTERN_TABLE
from alkpubsub.topics import (
    MAX_SEGMENT_LENGTH,
    MAX_TOPIC_LENGTH,
    compile_pattern,
    dead_letter_topic,
    is_dead_letter,
    validate_publish_topic,
)

# What each bad topic's message must say about the rule it breaks.
BAD_TOPIC_RULES: dict[object, str] = {
    "": "segment 1 is empty",
    ":": "segment 1 is empty",
    "graph:": "segment 2 is empty",
    ":graph": "segment 1 is empty",
    "graph::created": "segment 2 is empty",
    "graph created": "contains ' '",
    "graph/created": "contains '/'",
    "graph:*": "is a wildcard",
    "graph:>": "is a wildcard",
    "x" * 129: "has 129 characters; the limit is 128",
    "a:" * 256 + "a": "is 513 characters; the limit is 512",
    "café": "contains 'é'",
    "tab\there": "contains '\\t'",
    None: "must be a str, got NoneType",
    42: "must be a str, got int",
}

BAD_PATTERN_RULES: dict[object, str] = {
    "": "segment 1 is empty",
    "graph:": "segment 2 is empty",
    "call:>:done": "'>' may only be the last segment",
    "graph:**": "contains '*'",
    "graph:a*": "contains '*'",
    "a.*": "contains '*'",
    "graph:>x": "contains '>'",
    "graph created": "contains ' '",
    None: "must be a str, got NoneType",
}


def _named_in(text: object, message: str) -> bool:
    """The message quotes the input (long topics are quoted by their first 40 characters)."""
    if not isinstance(text, str):
        return repr(text) in message
    return repr(text) in message or repr(text[:40]) in message


@pytest.mark.parametrize(("pattern", "topic", "expected"), PATTERN_TABLE)
def test_reference_matcher_agrees_with_pattern_table(
    pattern: str, topic: str, expected: bool
) -> None:
    assert Pattern(pattern).matches(topic) is expected
    assert alkpubsub.matches(pattern, topic) is expected


def test_rule_tables_cover_every_bad_input_of_the_suite() -> None:
    # If the shared tables grow, this file must say which rule each new row breaks.
    assert set(BAD_TOPIC_RULES) == set(BAD_TOPICS)
    assert set(BAD_PATTERN_RULES) == set(BAD_PATTERNS)


@pytest.mark.parametrize("bad", BAD_TOPICS, ids=repr)
def test_bad_topic_is_refused_naming_topic_and_rule(bad: object) -> None:
    with pytest.raises(InvalidTopic) as caught:
        validate_topic(bad)  # type: ignore[arg-type]
    message = str(caught.value)
    assert _named_in(bad, message), message
    assert BAD_TOPIC_RULES[bad] in message


@pytest.mark.parametrize("bad", BAD_PATTERNS, ids=repr)
def test_bad_pattern_is_refused_naming_pattern_and_rule(bad: object) -> None:
    for compile_ in (Pattern, compile_pattern):
        with pytest.raises(InvalidTopic) as caught:
            compile_(bad)  # type: ignore[arg-type]
        message = str(caught.value)
        assert _named_in(bad, message), message
        assert BAD_PATTERN_RULES[bad] in message


@pytest.mark.parametrize("bad", [None, 42, b"graph:created", ["graph"]], ids=repr)
def test_non_str_topic_raises_invalid_topic_not_type_error(bad: object) -> None:
    # InvalidTopic subclasses ValueError, never TypeError: callers catch one error kind.
    for check in (validate_topic, Pattern, compile_pattern):
        with pytest.raises(InvalidTopic) as caught:
            check(bad)  # type: ignore[arg-type]
        assert not isinstance(caught.value, TypeError)
    with pytest.raises(InvalidTopic):
        alkpubsub.matches("graph:*", bad)  # type: ignore[arg-type]


def test_segment_of_exactly_128_characters_is_accepted() -> None:
    topic = "graph:" + "s" * MAX_SEGMENT_LENGTH
    assert validate_topic(topic) == topic
    assert Pattern(topic).matches(topic)


def test_topic_of_exactly_512_characters_is_accepted_and_513_refused() -> None:
    # 3 full segments + 3 separators = 387; a 125-character last segment makes 512.
    topic = ":".join(["x" * 128] * 3 + ["y" * 125])
    assert len(topic) == MAX_TOPIC_LENGTH
    assert validate_topic(topic) == topic
    with pytest.raises(InvalidTopic, match="513 characters; the limit is 512"):
        validate_topic(topic + "y")
    with pytest.raises(InvalidTopic, match="513 characters; the limit is 512"):
        Pattern(topic + "y")


def test_wildcards_are_refused_in_publish_topics_but_allowed_in_patterns() -> None:
    for text in ("*", ">", "graph:*", "*:created", "call:>"):
        with pytest.raises(InvalidTopic, match="use wildcards only in subscribe patterns"):
            validate_topic(text)
        assert Pattern(text).text == text


def test_invalid_topic_is_a_pubsub_error_and_value_error() -> None:
    with pytest.raises(InvalidTopic) as caught:
        validate_topic("bad topic")
    assert isinstance(caught.value, alkpubsub.PubSubError)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    ("pattern", "prefix"),
    [
        ("graph:created", ("graph", "created")),
        ("graph:*", ("graph",)),
        ("call:*:done", ("call",)),
        ("call:>", ("call",)),
        ("call:req-1:>", ("call", "req-1")),
        ("*:created", ()),
        ("*", ()),
        (">", ()),
        ("v1.2:*", ("v1.2",)),
    ],
)
def test_literal_prefix_is_the_leading_run_of_literal_segments(
    pattern: str, prefix: tuple[str, ...]
) -> None:
    assert Pattern(pattern).literal_prefix == prefix


def test_pattern_shape_attributes() -> None:
    exact = Pattern("graph:created")
    assert (exact.exact, exact.tail, exact.segments) == (True, False, ("graph", "created"))
    star = Pattern("graph:*")
    assert (star.exact, star.tail, star.segments) == (False, False, ("graph", "*"))
    tail = Pattern("call:*:>")
    assert (tail.exact, tail.tail, tail.segments) == (False, True, ("call", "*"))


def test_patterns_compare_and_hash_by_text() -> None:
    assert Pattern("graph:*") == Pattern("graph:*")
    assert Pattern("graph:*") != Pattern("graph:>")
    assert len({Pattern("graph:*"), Pattern("graph:*"), Pattern("call:>")}) == 2
    assert compile_pattern("graph:*") is compile_pattern("graph:*")  # cached
    assert repr(Pattern("call:>")) == "Pattern('call:>')"


def test_dead_letters_live_under_the_reserved_first_segment() -> None:
    assert dead_letter_topic("graph:created") == "dead:graph:created"
    assert dead_letter_topic("jobs") == "dead:jobs"
    # A dead letter's dead letter would be a chain: the topic stays the same.
    assert dead_letter_topic("dead:jobs") == "dead:jobs"
    # Every valid topic has a valid dead-letter topic, the longest included.
    longest = ":".join(["s" * 128] * 4)[:512]
    assert validate_topic(dead_letter_topic(longest)) == "dead:" + longest
    assert is_dead_letter("dead:graph:created") and is_dead_letter("dead")
    assert not is_dead_letter("deadline:x") and not is_dead_letter("x:dead")


@pytest.mark.parametrize(
    ("pattern", "matches"),
    [
        (">", False),
        ("*", False),
        ("*:graph:created", False),
        ("*:*:*", False),
        ("graph:>", False),
        ("dead:>", True),
        ("dead:graph:*", True),
        ("dead:*:created", True),
        ("dead:graph:created", True),
    ],
)
def test_only_patterns_naming_dead_first_match_dead_letters(pattern: str, matches: bool) -> None:
    # So a consumer on 'orders:>' never receives its own dead letters.
    assert Pattern(pattern).matches("dead:graph:created") is matches


def test_publishers_cannot_use_the_dead_segment() -> None:
    for topic in ("dead", "dead:orders:created"):
        with pytest.raises(InvalidTopic, match="reserved for dead letters"):
            validate_publish_topic(topic)
    assert validate_publish_topic("deadline:x") == "deadline:x"

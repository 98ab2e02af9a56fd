"""Topics, patterns, filters and positions (broker/model.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.errors import Problem, RequestError
from broker.model import (
    MAX_SEQ,
    Filter,
    Pattern,
    Position,
    parse_pattern,
    parse_position,
    validate_event_name,
    validate_idempotency_key,
    validate_topic,
)

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,8}", fullmatch=True)
topics = st.lists(tokens, min_size=1, max_size=16).map(".".join)
# Surrogates included: JSON can smuggle lone ones in, "\ud800".
any_text = st.text() | st.text(st.characters(categories=("Cs", "Ll", "Po")))


@pytest.mark.parametrize(
    "topic",
    ["a", "orders.eu.created", "A-b_9.x", ".".join(["t"] * 16), "x" * 255, "Z"],
)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    [
        "",
        ".",
        "a.",
        ".a",
        "a..b",
        ".".join(["t"] * 17),
        "x" * 256,
        "a b",
        "a*",
        "*",
        "a.>",
        ">",
        "é",
        "a\n",
        "\ud800",  # a lone surrogate, as JSON "\ud800" decodes: refused, not UnicodeEncodeError
    ],
)
def test_invalid_topics(topic: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_topic(topic)
    assert info.value.problem is Problem.BAD_TOPIC


@pytest.mark.parametrize("text", ["*", "a.>", ">", "a.*.c", "*.*", "a.b", "a.*.>"])
def test_valid_patterns(text: str) -> None:
    assert parse_pattern(text).text == text


@pytest.mark.parametrize(
    "text", ["", "a.>.b", ">.a", "a*", "a.b*", "a..b", "**", ">>", "a.>>", "a b", "\udfff"]
)
def test_invalid_patterns(text: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_pattern(text)
    assert info.value.problem is Problem.BAD_PATTERN


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.*", "a.b.c", False),
        ("a.*", "b.b", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.>", "b.c", False),
        ("*", "x", True),
        ("*", "x.y", False),
        (">", "x", True),
        (">", "x.y.z", True),
        ("a.*.c", "a.b.c", True),
        ("a.*.c", "a.b.d", False),
        ("*.>", "a", False),
        ("*.>", "a.b", True),
        ("a.b", "a.b", True),
        ("a.b", "a.b.c", False),
        ("a.b", "a", False),
    ],
)
def test_pattern_matches(pattern: str, topic: str, expected: bool) -> None:
    assert parse_pattern(pattern).matches(topic) is expected


def test_is_literal() -> None:
    assert parse_pattern("a.b").is_literal
    assert not parse_pattern("a.*").is_literal
    assert not parse_pattern("a.>").is_literal


def test_filter_parse_dedupes_in_order() -> None:
    subscription = Filter.parse(["b", "a.*", "b", "a.*", "c"])
    assert [p.text for p in subscription.patterns] == ["b", "a.*", "c"]
    assert subscription.literals == frozenset({"b", "c"})
    assert [p.text for p in subscription.wildcards] == ["a.*"]
    assert str(subscription) == "b,a.*,c"


def test_filter_missing_topic() -> None:
    with pytest.raises(RequestError) as info:
        Filter.parse([])
    assert info.value.problem is Problem.MISSING_TOPIC


def test_filter_too_many_topics() -> None:
    Filter.parse([f"t{i}" for i in range(64)])
    with pytest.raises(RequestError) as info:
        Filter.parse([f"t{i}" for i in range(65)])
    assert info.value.problem is Problem.TOO_MANY_TOPICS
    # Duplicates count once.
    Filter.parse([f"t{i % 64}" for i in range(200)])
    Filter.parse(["a", "b", "c"], max_topics=3)
    with pytest.raises(RequestError):
        Filter.parse(["a", "b", "c"], max_topics=2)


def test_filter_bad_pattern() -> None:
    with pytest.raises(RequestError) as info:
        Filter.parse(["ok", "a.>.b"])
    assert info.value.problem is Problem.BAD_PATTERN


def test_filter_matches() -> None:
    subscription = Filter.parse(["chat.lobby", "orders.*.created", "audit.>"])
    assert subscription.matches("chat.lobby")
    assert subscription.matches("orders.eu.created")
    assert subscription.matches("audit.x.y")
    assert not subscription.matches("chat")
    assert not subscription.matches("chat.lobby.x")
    assert not subscription.matches("orders.eu.deleted")
    assert not subscription.matches("audit")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", Position(0)),
        ("42", Position(42)),
        ("E1:42", Position(42, "E1")),
        ("  7 ", Position(7)),
        (str(MAX_SEQ), Position(MAX_SEQ)),
        ("a_b-C:0", Position(0, "a_b-C")),
    ],
)
def test_parse_position(text: str, expected: Position) -> None:
    assert parse_position(text) == expected


@pytest.mark.parametrize(
    "text",
    ["-1", "1.5", "", "abc", "E 1:3", ":5", "1" * 20, str(2**63), "E1:", "E1:-1", "a:b:3", "٣"],
)
def test_parse_position_refuses(text: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_position(text)
    assert info.value.problem is Problem.BAD_POSITION


def test_position_str_round_trips() -> None:
    for position in (Position(0), Position(42, "E1")):
        assert parse_position(str(position)) == position
    assert str(Position(42, "E1")) == "E1:42"
    assert str(Position(3)) == "3"


@pytest.mark.parametrize("name", ["note", "a.b:c-d_e", "x" * 64])
def test_valid_event_names(name: str) -> None:
    assert validate_event_name(name) == name


@pytest.mark.parametrize("name", ["", "gap", "reset", "x" * 65, "a b", "é", "a\n"])
def test_invalid_event_names(name: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_event_name(name)
    assert info.value.problem is Problem.BAD_EVENT_NAME


@pytest.mark.parametrize("key", ["k", "key-17", "!~" * 100])
def test_valid_idempotency_keys(key: str) -> None:
    assert validate_idempotency_key(key) == key


@pytest.mark.parametrize("key", ["", "a b", "x" * 201, "é", "a\t"])
def test_invalid_idempotency_keys(key: str) -> None:
    with pytest.raises(RequestError) as info:
        validate_idempotency_key(key)
    assert info.value.problem is Problem.BAD_IDEMPOTENCY_KEY


@given(any_text | st.text(alphabet="E1: -9"))
def test_parse_position_raises_only_request_error(text: str) -> None:
    try:
        position = parse_position(text)
    except RequestError as exc:
        assert exc.problem is Problem.BAD_POSITION
    else:
        assert 0 <= position.seq <= MAX_SEQ


@given(any_text | st.text(alphabet="ab.*>_- "))
def test_parse_pattern_raises_only_request_error(text: str) -> None:
    try:
        parse_pattern(text)
    except RequestError as exc:
        assert exc.problem is Problem.BAD_PATTERN


@given(any_text | st.text(alphabet="ab.-"))
def test_validate_topic_raises_only_request_error(text: str) -> None:
    try:
        validate_topic(text)
    except RequestError as exc:
        assert exc.problem is Problem.BAD_TOPIC
    else:
        assert parse_pattern(text).is_literal


def _valid_token_by_token(text: str) -> bool:
    tokens = text.split(".")
    return (0 < len(text.encode("utf-8", "surrogatepass")) <= 255 and len(tokens) <= 16
            and all(t and all(c.isascii() and (c.isalnum() or c in "_-") for c in t)
                    for t in tokens))


@given(st.text(alphabet="aZ9_-.\n é", max_size=40) | st.from_regex(r"(a\.){14,17}a\Z")
       | st.text(alphabet="ab", min_size=250, max_size=260))
def test_validate_topic_fast_path_agrees_with_the_token_rules(text: str) -> None:
    """The whole-topic regex that accepts most topics at once accepts exactly the valid ones."""
    try:
        validate_topic(text)
        valid = True
    except RequestError:
        valid = False
    assert valid == _valid_token_by_token(text)


@given(topics, st.data())
def test_pattern_from_a_topics_own_tokens_matches_it(topic: str, data: st.DataObject) -> None:
    assert validate_topic(topic) == topic
    parts = topic.split(".")
    # Replace any tokens with "*", and maybe a non-empty suffix with ">".
    starred = [
        "*" if data.draw(st.booleans(), label=f"star {i}") else part for i, part in enumerate(parts)
    ]
    cut = data.draw(st.integers(0, len(parts) - 1), label="'>' from token")
    with_tail = data.draw(st.booleans(), label="use '>'")
    tokens = [*starred[:cut], ">"] if with_tail else starred
    pattern = parse_pattern(".".join(tokens))
    assert pattern.matches(topic)
    assert Filter.parse([pattern.text]).matches(topic)
    # One token more or less than a pattern without '>' never matches.
    if not with_tail:
        assert not pattern.matches(topic + ".extra")
        if len(parts) > 1:
            assert not pattern.matches(".".join(parts[:-1]))


def test_pattern_equality_is_by_text() -> None:
    assert parse_pattern("a.*") == Pattern("a.*", ("a", "*"))

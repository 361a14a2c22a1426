"""The pattern table every transport must agree with, row for row."""

from __future__ import annotations

# (pattern, topic, matches?)
PATTERN_TABLE: list[tuple[str, str, bool]] = [
    ("graph:created", "graph:created", True),
    ("graph:created", "graph:deleted", False),
    ("graph:created", "graph:created:x", False),
    ("graph:*", "graph:created", True),
    ("graph:*", "graph", False),
    ("graph:*", "graph:created:late", False),
    ("graph:*", "graphs:created", False),
    ("*:created", "graph:created", True),
    ("*:created", "node:created", True),
    ("*:created", "node:deleted", False),
    ("*", "graph", True),
    ("*", "graph:created", False),
    ("call:>", "call:req-42", True),
    ("call:>", "call:req-42:done", True),
    ("call:>", "call", False),
    ("call:>", "calls:req-42", False),
    ("call:*:done", "call:req-42:done", True),
    ("call:*:done", "call:req-42:failed", False),
    ("call:*:>", "call:req-42:done", True),
    ("call:*:>", "call:req-42", False),
    (">", "graph", True),
    (">", "graph:created:x", True),
    # A '.' is an ordinary character inside a segment, not a separator (NATS
    # tokens split on '.', so a transport must escape it).
    ("v1.2:*", "v1.2:ready", True),
    ("v1.2:*", "v1:2:ready", False),
    ("v1:*", "v1.2:ready", False),
    ("a.b", "a.b", True),
    ("a.b", "a:b", False),
    ("a-b_c:*", "a-b_c:x.y", True),
]

BAD_TOPICS: list[object] = [
    "",
    ":",
    "graph:",
    ":graph",
    "graph::created",
    "graph created",
    "graph/created",
    "graph:*",
    "graph:>",
    "x" * 129,
    "a:" * 256 + "a",
    "café",
    "tab\there",
    None,
    42,
]

BAD_PATTERNS: list[object] = [
    "",
    "graph:",
    "call:>:done",
    "graph:**",
    "graph:a*",
    "a.*",
    "graph:>x",
    "graph created",
    None,
]

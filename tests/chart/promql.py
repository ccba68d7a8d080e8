"""Metric names referenced by PromQL expressions.

Not a PromQL parser: enough of the grammar is stripped (strings, label
matchers, range and subquery selectors, grouping clauses, function calls,
keywords, numbers and durations, Grafana variables) that the identifiers left
are the metric names an expression selects. The chart tests use it to check
that the dashboard and the alerts only query metrics the code exports.
"""

from __future__ import annotations

import re

# Binary operators, modifiers and literals that look like identifiers.
KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "start",
    "end",
}

# Clauses whose parenthesised list holds label names, not expressions.
LABEL_LIST_CLAUSES = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
GRAFANA_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[\w+\]\]")
LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
RANGES = re.compile(r"\[[^\[\]]*\]")
# Numbers (hex, floats, exponents) and durations such as 5m or 1h30m, first, so
# that their letters are not read as identifiers.
TOKEN = re.compile(
    r"0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[a-zA-Z]*|\.\d+"
    r"|(?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<call>\s*\()?"
)
# Grafana's templating functions: only the first argument is a selector.
GRAFANA_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((.*),\s*[a-zA-Z_]\w*\s*\)\s*$", re.S)
GRAFANA_LABEL_NAMES = re.compile(r"^\s*label_names\s*\((.*)\)\s*$", re.S)
GRAFANA_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((.*)\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (`up`, `foo_total`, ...)."""
    for pattern in (GRAFANA_LABEL_VALUES, GRAFANA_QUERY_RESULT, GRAFANA_LABEL_NAMES):
        match = pattern.match(expr)
        if match:
            expr = match.group(1)
            break
    text = STRINGS.sub('""', expr)
    if re.search(r"\b__name__\b", text):
        raise ValueError(f"selects metrics by __name__, names cannot be checked: {expr!r}")
    text = GRAFANA_VARIABLES.sub("1", text)
    # Matchers and ranges do not nest once strings are gone, except subqueries
    # around ranges ("[1d:5m]" holds no brackets): strip until stable.
    previous = None
    while previous != text:
        previous = text
        text = LABEL_MATCHERS.sub(" ", text)
        text = RANGES.sub(" ", text)
    text = LABEL_LIST_CLAUSES.sub(" ", text)
    names = set()
    for token in TOKEN.finditer(text):
        ident = token.group("ident")
        if ident is None or token.group("call"):
            continue  # a number, a duration or a function/aggregation name
        if ident.lower() in KEYWORDS:
            continue
        names.add(ident)
    return names


HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def unexported(referenced: set[str], exported: set[str]) -> set[str]:
    """Names in `referenced` that no exported metric provides. A histogram is
    listed by its base name and queried as `_bucket`, `_sum` or `_count`;
    counters (listed with `_total`) have no such series."""
    missing = set()
    for name in referenced:
        if name in exported:
            continue
        base = next(
            (name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None
        )
        if base and base in exported and not base.endswith("_total"):
            continue
        missing.add(name)
    return missing

"""Issue 35, item 3: README's table "What the musician reads" is every message the code can write to
`error_message`, and nothing else. The messages are walked in the code itself: the set chosen by
kind (sona/job/messages.py), every BadRequest raised anywhere in sona/ (found by parsing the source,
so a new one cannot be missed), and every assignment to error_message in the state functions
(supabase/schemas/, which tests/test_schema_agreement.py proves equal to the migrations). Then the
rule that picks the message: by the error's kind, never the provider's text."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sona.errors import (
    BadRequest,
    Cancelled,
    DeadlineExceeded,
    PermanentError,
    ServiceOutage,
    StorageRefused,
    StorageUnavailable,
    TransientError,
)
from sona.job.messages import MESSAGES, musician_message

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCHEMAS = ROOT / "supabase" / "schemas"
# Where the worker's own message reaches SQL: fail_job's p_error, pause_service's p_message.
FROM_PYTHON = {"p_error", "p_message"}
ANY = "{}"


def shape(text: str) -> str:
    """A message with every blank the same: `{n}`, `{duration}` and `%s` all read `{}`."""
    return re.sub(r"\{[^}]*\}", ANY, text.replace("%s", ANY))


# -- the table ---------------------------------------------------------------------------------------


def table_rows() -> list[list[str]]:
    text = README.read_text()
    section = text[text.index("## What the musician reads") :]
    section = section[: section.index("\n## ", 1)]
    rows = [line for line in section.splitlines() if line.startswith("|") and not set(line) <= set("|-")]
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]  # past the head
    assert cells, "no table under 'What the musician reads'"
    return cells


def table_messages() -> set[str]:
    messages = set()
    for cells in table_rows():
        (quoted,) = re.findall(r"`([^`]+)`", cells[3])
        messages.add(shape(quoted))
    return messages


# -- Python: the set chosen by kind, and every BadRequest ------------------------------------------


def _template(node: ast.expr, constants: dict[str, str]) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(part.value if isinstance(part, ast.Constant) else ANY for part in node.values)
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    raise AssertionError(f"a BadRequest message that is not written out: {ast.unparse(node)}")


def bad_requests() -> Iterator[tuple[str, str]]:
    """(where, message) for every BadRequest(...) in sona/."""
    for path in sorted((ROOT / "sona").rglob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "BadRequest":
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                yield where, _template(node.args[0], constants)


# -- SQL: every assignment to error_message in the state functions ---------------------------------

_ASSIGN = re.compile(r"\berror_message\s*(?::=|=(?!=))", re.I)
_STOP = re.compile(r"(?:,|;|\bwhere\b|\breturning\b|\bfrom\b)", re.I)


def _without_comments(sql: str) -> str:
    """The SQL with its `--` comments blanked (a comment may quote a message, or hold a quote)."""
    out, quoted, i = [], False, 0
    while i < len(sql):
        if not quoted and sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
            continue
        quoted ^= sql[i] == "'"
        out.append(sql[i])
        i += 1
    return "".join(out)


def _expression(sql: str, start: int) -> str:
    """The expression assigned at `start`: up to the first comma, semicolon or clause keyword outside
    parentheses and quotes."""
    depth, i, quoted = 0, start, False
    while i < len(sql):
        c = sql[i]
        if c == "'":
            quoted = not quoted
        elif not quoted:
            if c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            elif depth == 0 and _STOP.match(sql, i) and (c in ",;" or not sql[i - 1].isalnum()):
                return sql[start:i]
        i += 1
    raise AssertionError(f"no end to the expression at {sql[start : start + 60]!r}")


def _split(text: str, separator: str) -> list[str]:
    """Split at `separator` outside parentheses and quotes."""
    parts, depth, quoted, last, i = [], 0, False, 0, 0
    while i < len(text):
        c = text[i]
        if c == "'":
            quoted = not quoted
        elif not quoted and c in "()":
            depth += 1 if c == "(" else -1
        elif not quoted and depth == 0 and text.startswith(separator, i):
            parts.append(text[last:i])
            last = i = i + len(separator)
            continue
        i += 1
    return [*parts, text[last:]]


def _literal(term: str) -> str | None:
    """Adjacent quoted strings (SQL joins them across a line break) as one text; None if not that."""
    pieces = re.fullmatch(r"\s*((?:'(?:[^']|'')*'\s*)+)", term)
    if pieces is None:
        return None
    return "".join(p.replace("''", "'") for p in re.findall(r"'((?:[^']|'')*)'", pieces.group(1)))


def _branches(expression: str) -> list[str]:
    """The values a CASE can take (its THEN and ELSE arms), or the expression itself."""
    text = expression.strip()
    if not re.match(r"case\b", text, re.I):
        return [text]
    arms = re.findall(r"\b(?:then|else)\b(.*?)(?=\bwhen\b|\belse\b|\bend\b\s*$)", text, re.I | re.S)
    assert arms, text
    return arms


def _templates(expression: str, variables: dict[str, list[str]]) -> Iterator[str]:
    for arm in _branches(expression):
        arm = arm.strip()
        if arm.lower() == "null":
            continue
        if arm in variables:
            for value in variables[arm]:
                yield from _templates(value, variables)
            continue
        text = ""
        for term in _split(arm, "||"):
            term = term.strip()
            literal = _literal(term)
            if literal is not None:
                text += literal
            elif term.lower().startswith("format("):
                first = _literal(_split(term[len("format(") : -1], ",")[0])
                assert first is not None, term
                text += first
            elif term in FROM_PYTHON:
                text += "{message}"
            else:
                text += ANY  # a number or a word the row supplies (j.attempts)
        yield text


def sql_messages() -> Iterator[tuple[str, str]]:
    """(where, template) for every value an error_message assignment can take; `{message}` is the
    worker's own message passed in (checked on the Python side)."""
    for path in sorted(SCHEMAS.glob("*.sql")):
        sql = _without_comments(path.read_text())
        variables: dict[str, list[str]] = {}
        for match in re.finditer(r"\b(v_\w+)\s*:=", sql):
            variables.setdefault(match.group(1), []).append(_expression(sql, match.end()))
        for match in _ASSIGN.finditer(sql):
            where = f"{path.relative_to(ROOT)}:{sql.count(chr(10), 0, match.start()) + 1}"
            for template in _templates(_expression(sql, match.end()), variables):
                yield where, template


def code_messages() -> dict[str, str]:
    """Every message the code can write, in its shape, and where it is written."""
    found = {shape(text): "sona/job/messages.py" for text in MESSAGES.values()}
    found.update({shape(text): where for where, text in bad_requests()})
    found.update({shape(t): where for where, t in sql_messages() if t != "{message}"})
    return found


# -- the walk -----------------------------------------------------------------------------------------


def test_every_message_the_code_can_write_is_in_the_readme_table() -> None:
    missing = {
        message: where for message, where in code_messages().items() if message not in table_messages()
    }
    assert not missing, "add these to README's 'What the musician reads':\n" + "\n".join(
        f"{where}: {message}" for message, where in sorted(missing.items(), key=lambda m: m[1])
    )


def test_every_message_in_the_readme_table_is_one_the_code_writes() -> None:
    assert table_messages() - set(code_messages()) == set()


def test_the_walk_finds_each_source_of_messages() -> None:
    """The parsers above read what they claim to: a message from each kind of source is found."""
    messages = code_messages()
    for expected in (
        "The duration must be 1 to {} seconds, not {}.",  # BadRequest, f-string (sona/job/modes.py)
        "The input file is not MP3 or WAV audio. Upload an MP3 or WAV file.",  # BadRequest, constant
        "You cancelled this job.",  # SQL literal (cancel_job)
        "{} (gave up after {} attempts)",  # SQL concatenation (fail_job), the worker's message first
        "You have {} {} running; wait for one to finish. Your tokens were refunded.",  # SQL format()
        "You have started {} jobs in the last 24 hours, the most allowed; try again later. "
        "Your tokens were refunded.",  # SQL format() over two adjacent literals
    ):
        assert expected in messages, expected
    assert {t for _, t in sql_messages()} >= {"{message}"}  # p_error and p_message reach the row


def test_the_tokens_column_follows_the_refund_rule() -> None:
    """supabase/schemas/50_tokens.sql: a job failed by the service gives its tokens back; a cancel
    does only before generation began; a job still waiting has been settled neither way."""
    expected = {
        "failed": "yes",
        "cancelled": "yes, if cancelled before generation began",
        "queued": "not yet",
    }
    for cells in table_rows():
        status = cells[2].split()[0].strip("`")
        assert cells[4].startswith(expected[status]), cells


# -- the rule: by kind, never the provider's text ----------------------------------------------------

RAW = "RuntimeError: CUDA error: an illegal memory access was encountered"


@pytest.mark.parametrize(
    ("error", "reads"),
    [
        (PermanentError(f"failed: {RAW}", detail=RAW), MESSAGES["could_not_generate"]),
        (PermanentError("flagged", detail=RAW, says="moderation"), MESSAGES["moderation"]),
        (PermanentError("English", detail=RAW, says="english_only"), MESSAGES["english_only"]),
        (TransientError(f"503 {RAW}", detail=RAW), MESSAGES["temporary_problem"]),
        (DeadlineExceeded(f"slow {RAW}"), MESSAGES["timed_out"]),
        (ServiceOutage(f"401 {RAW}", code="provider_unauthorized"), MESSAGES["service_unavailable"]),
        (StorageRefused(f"400 {RAW}"), MESSAGES["could_not_store"]),
        (StorageUnavailable(f"503 {RAW}"), MESSAGES["could_not_store"]),
        (Cancelled("cancelled"), MESSAGES["cancelled"]),
        (RuntimeError(RAW), MESSAGES["unexpected"]),
        (
            PermanentError("spent", says="out_of_attempts", facts={"attempts": 3}),
            "The job timed out after 3 attempts.",
        ),
        (
            BadRequest("The prompt is empty. Describe the sound you want."),
            "The prompt is empty. Describe the sound you want.",
        ),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_the_message_is_chosen_by_the_errors_kind_never_its_text(error: BaseException, reads: str) -> None:
    assert musician_message(error) == reads
    assert "CUDA" not in musician_message(error)

"""One set of rules for every value (coupons.validation): every command-line flag that takes a
value is checked by a rule before anything connects, and out of range is exit 2 naming the flag
and the range; the API's request schema carries the same bounds; the README's bad-input table
names every rule."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.api.app import create_app
from app.cli import main, parser
from app.cli.args import _Arg
from app.embedded import free_port
from coupons import validation as rules
from coupons.config import Settings
from coupons.errors import InvalidField

README = Path(__file__).resolve().parent.parent / "README.md"

# Flags whose values no rule of coupons.validation checks, and why that is right.
UNRULED = {
    ("report", "--out"): "a file path; refused when it cannot be written",
    ("codec init", "--keys"): "a file path; refused when it cannot be read or written",
    ("codec rotate", "--keys"): "a file path; refused when it cannot be read or written",
    ("codec show", "--keys"): "a file path; refused when it cannot be read",
}


def _commands(
    p: argparse.ArgumentParser, prefix: str = ""
) -> Iterator[tuple[str, argparse.Action]]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, f"{prefix} {name}".strip())
        elif action.nargs != 0 and not isinstance(action, argparse._HelpAction):
            yield prefix, action


def _flag(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.dest


# A value each rule refuses, and what the refusal must say.
_RANGES: dict[str, rules.Whole | rules.Text | rules.Seconds] = {
    rule.name: rule
    for rule in vars(rules).values()
    if isinstance(rule, rules.Whole | rules.Text | rules.Seconds)
}
_BAD: dict[str, tuple[str, str]] = {
    rules.ID: ("no spaces", "is not valid: use 1 to 64 letters"),
    rules.COUPON_ID: ("no spaces", "is not a coupon id"),
    rules.TIME: ("2026-06-01T00:00:00", "has no timezone"),
    rules.DURATION: ("400d", "out of range: at most 366 days"),
    rules.TASK: ("a b=Name", "is not valid: use 1 to 64 letters"),
}


def _bad_value(rule: str) -> tuple[str, str]:
    if rule in _BAD:
        return _BAD[rule]
    ranged = _RANGES[rule]
    if isinstance(ranged, rules.Whole):
        return str(ranged.high + 1), f"out of range: {ranged.range}"
    if isinstance(ranged, rules.Seconds):
        return "0", f"out of range: {ranged.range}"
    return "x" * (ranged.high + 1), f"is not valid: {ranged.range}"


def _every_flag() -> list[tuple[str, str, str]]:
    """(command, flag, rule) for every flag and positional that takes a value."""
    found = []
    for command, action in _commands(parser()):
        key = (command, _flag(action))
        if action.choices is not None or key in UNRULED:
            continue  # argparse refuses a value outside `choices` itself
        assert isinstance(action.type, _Arg), f"{key}: no rule checks this value"
        found.append((command, _flag(action), action.type.rule))
    return found


EVERY_FLAG = _every_flag()


def test_every_value_the_command_line_takes_is_checked_by_a_rule() -> None:
    assert len(EVERY_FLAG) > 40  # the walk found the commands, not an empty tree
    commands = {command for command, _, _ in EVERY_FLAG}
    assert {"claim", "batch create", "campaign create", "campaign update", "key create"} <= commands


def _argv(command: str, flag: str, value: str) -> list[str]:
    """The command with `flag` bad and every other required value good."""
    argv = command.split()
    good = {
        "--campaign": "c",
        "--user": "u",
        "--coupon": "c:u:1",
        "--task": "t",
        "--id": "x",
        "--batch": "b",
        "--quantity": "5",
        "--quota": "5",
        "--name": "n",
        "--tenant": "t",
        "--scope": "app",
    }
    sub = parser()
    for word in argv:
        sub = next(
            a.choices[word] for a in sub._actions if isinstance(a, argparse._SubParsersAction)
        )
    for action in sub._actions:
        name = _flag(action)
        if name == flag:
            argv += [value] if not action.option_strings else [flag, value]
        elif action.required and action.option_strings:
            argv += [name, good[name]]
        elif action.required and not action.option_strings:
            argv.append("ok")
    return argv


@pytest.mark.parametrize(("command", "flag", "rule"), EVERY_FLAG, ids=lambda v: str(v))
def test_an_out_of_range_value_is_exit_2_naming_the_flag_and_the_range_before_any_connection(
    command: str, flag: str, rule: str, capsys: pytest.CaptureFixture[str]
) -> None:
    value, says = _bad_value(rule)
    # Nothing listens on these: a command that got as far as connecting would fail otherwise.
    closed = free_port()
    environ = {
        "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed}/none",
        "TEMPORAL_ADDRESS": f"127.0.0.1:{closed}",
        "PLATFORM_URL": f"http://127.0.0.1:{closed}",
    }
    code = main(_argv(command, flag, value), environ)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: invalid_request: "), err
    assert flag.lstrip("-") in err and says in err, (command, flag, err)


def test_a_long_value_is_cut_in_the_message(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["claim", "--campaign", "x" * 10_000, "--user", "u"], {}) == 2
    err = capsys.readouterr().err
    assert len(err) < 300 and "(10000 characters)" in err, err


@pytest.mark.parametrize("text", ["1e20", "5.0", "0x10", "", " ", "five", "9" * 40])
def test_whole_numbers_are_digits_only(text: str) -> None:
    with pytest.raises(InvalidField, match=r"quantity: .*(not a whole number|out of range)"):
        rules.QUANTITY.parse("quantity", text)


def test_whole_numbers_refuse_booleans_and_floats_from_python_callers() -> None:
    for value in (True, 5.0, "5", None):
        with pytest.raises(InvalidField, match="not a whole number"):
            rules.QUANTITY.check("quantity", value)
    assert rules.QUANTITY.check("quantity", rules.QUANTITY.high) == rules.QUANTITY.high


def test_text_refuses_control_characters_and_lengths_outside_the_range() -> None:
    for value in ("", "a\x00b", "tab\there", "n" * (rules.NAME.high + 1)):
        with pytest.raises(InvalidField, match="name: "):
            rules.NAME.check("name", value)
    assert rules.NAME.check("name", "春季 campaign") == "春季 campaign"


def test_times_outside_2000_to_2099_are_refused() -> None:
    with pytest.raises(InvalidField, match="between the years 2000 and 2099"):
        rules.parse_time("--ends-at", "9999-12-31T23:59:59Z")


def _schema_bounds(schema: dict[str, Any], components: dict[str, Any]) -> Iterator[Any]:
    """Every (name, property schema) of the API's request bodies, parameters included."""
    for path in schema["paths"].values():
        for operation in path.values():
            for parameter in operation.get("parameters", []):
                yield parameter["name"], parameter["schema"]
            body = operation.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            yield from _properties(body["schema"], components)


def _properties(schema: dict[str, Any], components: dict[str, Any]) -> Iterator[Any]:
    if "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    for name, prop in schema.get("properties", {}).items():
        for variant in prop.get("anyOf", [prop]):
            if "$ref" in variant:
                yield from _properties(variant, components)
            elif variant.get("type") == "array":
                yield name, variant
                yield from _properties(variant["items"], components)
            else:
                yield name, variant


def test_every_value_the_api_takes_is_bounded_by_the_same_rules() -> None:
    schema = create_app(Settings()).openapi()
    components = schema["components"]["schemas"]
    ranges = {(r.low, r.high) for r in _RANGES.values() if isinstance(r, rules.Whole)}
    texts = {(r.low, r.high) for r in _RANGES.values() if isinstance(r, rules.Text)}
    patterns = {rules.ID_PATTERN, rules.COUPON_ID_PATTERN}
    seen = 0
    for name, prop in _schema_bounds(schema, components):
        kind = prop.get("type")
        if kind == "integer":
            assert (prop.get("minimum"), prop.get("maximum")) in ranges, (name, prop)
        elif kind == "string" and prop.get("format") == "date-time":
            pass  # AwareDatetime between 2000 and 2099 (rules.plausible; tested in tests/app/api)
        elif kind == "string" and "enum" not in prop:
            bounded = prop.get("pattern") in patterns or (
                (prop.get("minLength", 0), prop.get("maxLength")) in texts
            )
            assert bounded or name == "Idempotency-Key", (name, prop)
        elif kind == "array":
            assert prop.get("maxItems") in (rules.TASKS.high, rules.TASK_EVENTS.high), name
        seen += 1
    assert seen > 20


def _readme_table() -> str:
    text = README.read_text()
    start = text.index("### Bad input")
    return text[start : text.index("\n#", start + 1)]


def test_the_readme_bad_input_table_names_every_rule_with_its_range() -> None:
    table = _readme_table()
    rows = {line.split("|")[1].strip().strip("`") for line in table.splitlines() if "|" in line}
    for name, rule in _RANGES.items():
        assert name in rows, f"README's bad-input table has no row for {name!r}"
        assert rule.range in table, (name, rule.range)
    for name in (rules.ID, rules.COUPON_ID, rules.TIME, rules.DURATION, rules.TASK):
        assert name in rows, f"README's bad-input table has no row for {name!r}"
    for _, flag, _ in EVERY_FLAG:
        if flag.startswith("--"):
            assert f"`{flag}`" in table, f"README's bad-input table does not name {flag}"

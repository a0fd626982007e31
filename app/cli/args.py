"""Value parsing for the command line: the parser class, the `type=` converters over
coupons.validation's rules, and the flags several commands share."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, NoReturn, TypeAlias, TypeVar

from app.cli.render import CommandResult
from app.service import DEFAULT_TENANT, Backends, Task
from coupons import validation as rules
from coupons.errors import InvalidField

T = TypeVar("T")

# What a command is: it runs over the backends with the parsed flags.
Command = Callable[[Backends, argparse.Namespace], Awaitable[CommandResult]]
Commands = dict[str, Command]
# The subparsers a noun adds its own parser to.
Nouns: TypeAlias = "argparse._SubParsersAction[Any]"


class _Parser(argparse.ArgumentParser):
    """Bad input on the command line is answered like every refusal: one line, with the
    code `invalid_request` and the flag named, exit 2 (subcommands' parsers are this class)."""

    def error(self, message: str) -> NoReturn:
        if message.startswith("argument "):
            message = message.removeprefix("argument ")
        self.exit(2, f"error: invalid_request: {message} (see {self.prog} --help)\n")


@dataclass(frozen=True)
class _Arg(Generic[T]):
    """An argparse `type=` checking one rule of coupons.validation: a refusal becomes
    argparse's own error (exit 2 naming the flag) before anything connects, writes or calls
    the platform. `rule` is the rule's name, as the README's bad-input table gives it."""

    rule: str
    parse: Callable[[str], T]

    def __call__(self, text: str) -> T:
        try:
            return self.parse(text)
        except InvalidField as err:
            raise argparse.ArgumentTypeError(err.detail) from None


def rule(checked: rules.Whole | rules.Text | rules.Seconds) -> _Arg[Any]:
    if isinstance(checked, rules.Text):
        return _Arg(checked.name, lambda text: checked.check("", text))
    return _Arg(checked.name, lambda text: checked.parse("", text))


def ident(kind: str) -> _Arg[str]:
    return _Arg(rules.ID, lambda text: rules.validate_id(kind, text))


coupon_id = _Arg(rules.COUPON_ID, rules.validate_coupon_id)


def _task(text: str) -> Task:
    """`KEY[=Display name]`: the key an id, the name (the key when absent) printable text."""
    key, given, name = text.partition("=")
    return Task(
        rules.validate_id("task", key), rules.NAME.check("task name", name) if given else key
    )


task_arg = _Arg(rules.TASK, _task)


def time_arg(flag: str) -> _Arg[datetime]:
    return _Arg(rules.TIME, lambda text: rules.parse_time(flag, text))


def duration_arg(flag: str) -> _Arg[timedelta]:
    return _Arg(rules.DURATION, lambda text: rules.parse_duration(flag, text))


def wait(args: argparse.Namespace) -> timedelta:
    return timedelta(seconds=args.timeout)


def json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def timeout_flag(p: argparse.ArgumentParser, default: float, help: str) -> None:
    p.add_argument(
        "--timeout",
        type=rule(rules.TIMEOUT),
        default=default,
        help=f"{help} (default {default:g}; {rules.TIMEOUT.range})",
    )


def tenant_flag(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--tenant",
        default=DEFAULT_TENANT,
        type=ident("tenant"),
        help=f"the tenant that owns the {what} (default: %(default)s)",
    )

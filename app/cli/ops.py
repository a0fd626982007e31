"""The operator's own commands, which run without the ledger's pool: `codec` (payload
encryption keys) and `doctor` (which stack this shell speaks to, and each part's health)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from app import doctor
from app.cli.args import Nouns, json_flag
from app.cli.render import Answer, doctor_view
from app.running import settings_from_env, stack_for
from coupons import codec


def add_codec(nouns: Nouns) -> None:
    codec.add_commands(
        nouns.add_parser("codec", help="payload encryption keys: init, rotate, show")
    )


def add_doctor(nouns: Nouns) -> None:
    json_flag(
        nouns.add_parser(
            "doctor",
            help="which stack this shell speaks to, and each part's health (exit 0: all well)",
        )
    )


def run_codec(args: argparse.Namespace, environ: Mapping[str, str] | None) -> str:
    return codec.run_command(args, settings_from_env(environ))


def run_doctor(environ: Mapping[str, str] | None) -> Answer:
    # Apart from the other commands: it must answer when PostgreSQL is the part that is down.
    settings = settings_from_env(environ)
    found = asyncio.run(doctor.diagnose(settings, stack_for(settings, environ)))
    problems = sorted({f.part for f in found.problems})
    return Answer(
        {
            "stack": found.stack,
            "settings": found.settings,
            "findings": found.findings,
            "ok": found.ok,
        },
        lambda: doctor_view(found),
        error=f"{len(problems)} part(s) not well: {', '.join(problems)}" if problems else None,
    )

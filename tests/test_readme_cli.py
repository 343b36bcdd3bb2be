"""Every `mlcapsule` command line in the README's bash blocks is one the CLI accepts as written.

The Python blocks are run end to end (tests/test_readme.py), and tests/test_e2e.py runs the same
provider and client flow as the CLI blocks against a real server. This test keeps the printed
commands themselves honest: each is parsed by the real click command tree, with its options and
arguments (optional parts in ``[...]`` both left out and put in), so a renamed option, a removed
command or a wrong argument count in the README fails CI. Placeholders (TOKEN, HEX, URL,
LICENSE_ID, F, FILE) are filled in; files the command expects to exist are created empty.
"""

from __future__ import annotations

import re
import shlex
from itertools import product
from pathlib import Path

import click
import pytest

from mlcapsule.cli.main import cli

README = Path(__file__).resolve().parent.parent / "README.md"
FILLS = {"TOKEN": "tok", "HEX": "ab" * 32, "URL": "http://127.0.0.1:8700", "LICENSE_ID": "0123456789abcdef",
         "F": "pass.txt", "FILE": "receipts-out.json"}


def _commands() -> list[str]:
    text = README.read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split(";"):
                part = part.strip()
                part = re.sub(r"^(sudo |\.venv/bin/)", "", part)
                if part.startswith("mlcapsule "):
                    lines.append(part)
    return lines


def _variants(cmd: str) -> list[list[str]]:
    """The command with each ``[...]`` part left out, or put in."""
    parts = re.split(r"(\[[^\]]*\])", cmd)
    optional = [i for i, p in enumerate(parts) if p.startswith("[")]
    out = []
    for choice in product([False, True], repeat=len(optional)):
        chosen = list(parts)
        for i, keep in zip(optional, choice):
            chosen[i] = chosen[i][1:-1] if keep else ""
        out.append([FILLS.get(w, w) for w in shlex.split("".join(chosen))][1:])
    return out


def _parse(args: list[str]) -> None:
    """Resolve the subcommand chain and let click parse the rest, without running anything."""
    group: click.Command = cli
    ctx = group.make_context("mlcapsule", list(args), resilient_parsing=False)
    while isinstance(group, click.Group):
        tokens = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click 8.2 keeps the subcommand apart
        if not tokens:
            break
        name, *rest = tokens
        sub = group.get_command(ctx, name)
        assert sub is not None, f"no command {name!r}"
        group, ctx = sub, sub.make_context(name, rest, parent=ctx, resilient_parsing=False)


COMMANDS = _commands()


def test_the_readme_has_cli_commands() -> None:
    assert len(COMMANDS) >= 25, COMMANDS


@pytest.mark.parametrize("cmd", COMMANDS)
def test_readme_command_is_accepted_by_the_cli(cmd: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for variant in _variants(cmd):
        for word in variant:  # files a command may expect to exist (click.Path(exists=True))
            if re.search(r"\.(capsule|key|pem|pub|npy|png|json|onnx|txt|csv|wav)$", word) and not word.startswith("-"):
                Path(word).touch()
        try:
            _parse(variant)
        except click.exceptions.Exit:
            pass
        except click.ClickException as e:
            raise AssertionError(f"README command refused by the CLI: mlcapsule {' '.join(variant)}: {e}") from e

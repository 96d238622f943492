"""The documentation's links resolve and the commands it quotes parse.

Pages: README.md, CONTRIBUTING.md, bench/README.md and docs/*.md. Every relative link (and image) must
name a file or folder of the repository, and its ``#anchor``, on a Markdown page, one of that page's
headings as GitHub spells anchors. Every command of the package quoted in a code block or in inline code
must be accepted by its command's argument parser, and the ``--section.key`` flags of the commands that
take the config by the config's declaration; nothing runs. The commands: ``python -m onlinemix.train``
(and ``eval``, ``plan``, ``stats``, ``cache``, ``data``, ``tinymodel``), ``python -m onlinemix env``,
``accelerate launch ... onlinemix/train.py ...``, ``torchrun ... onlinemix/train.py ...`` or
``torchrun ... -m onlinemix.train ...``, and the ``onlinemix-*`` scripts. Shell continuations,
``&&``/``;``/``|`` chains, environment assignments and ``#`` comments are handled; the placeholders of
``PLACEHOLDERS`` stand for example values and ``...`` for more flags. Flags must be spelt in full
(argparse alone would take a prefix of one).

A transcript line ``$ COMMAND`` followed by an error line (``config error: ...``, ``error: ...``) shows
a refusal: that command must be refused. Inline code may mention a command without its required arguments
(``python -m onlinemix.data prepare``); a code block may not.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "bench" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]

# Placeholders a page may use in a command, and the example value each stands for.
PLACEHOLDERS = {
    "RUN_DIR": "runs/example", "CHECKPOINT": "runs/example", "DIR": "runs/example", "OUT_DIR": "runs/example",
    "STORE": "runs/example", "FILE": "configs/tiny.yaml", "CONFIG": "configs/tiny.yaml",
    "N": "2", "K": "2", "H": "2", "<method>": "simclr", "<pairing>": "mixdiff",
}
SKIP_LANGUAGES = {"python", "yaml", "yml", "json", "toml"}
ERROR_LINES = ("config error", "error:", "usage:")


# ----------------------------------------------------------------------------- reading a page


@dataclass(frozen=True)
class Block:
    language: str
    lines: list[str]
    first_line: int  # 1-based line number of the block's first content line


@dataclass(frozen=True)
class Page:
    path: Path
    prose: list[tuple[int, str]]  # (line number, text) outside code blocks
    blocks: list[Block]

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def anchors(self) -> Iterator[str]:
        """The anchors of the page's headings; a repeated heading's get -1, -2, ..."""
        seen: dict[str, int] = {}
        for _, line in self.prose:
            match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
            if match:
                base = slug(match.group(1))
                seen[base] = seen.get(base, 0) + 1
                yield base if seen[base] == 1 else f"{base}-{seen[base] - 1}"


def read_page(path: Path, text: str | None = None) -> Page:
    """The page at ``path`` (its ``text``, when given, instead of the file's)."""
    prose, blocks = [], []
    fence, language, body, start = None, "", [], 0
    text = path.read_text() if text is None else text
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if fence is None:
            match = re.match(r"(`{3,}|~{3,})\s*([\w+-]*)", stripped)
            if match:
                fence, language, body, start = match.group(1), match.group(2).lower(), [], number + 1
            else:
                prose.append((number, line))
        elif stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append(Block(language, body, start))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{path}: a code block opened at line {start - 1} is never closed"
    return Page(path, prose, blocks)


def inline_code(page: Page) -> Iterator[tuple[int, str]]:
    """(line, text) of every inline code span of the page's prose; a span may run over a line break."""
    text = "\n".join(line for _, line in page.prose)
    numbers = [number for number, _ in page.prose]
    for match in re.finditer(r"(`+)(.+?)\1", text, flags=re.S):
        yield numbers[text.count("\n", 0, match.start())], " ".join(match.group(2).split())


def without_code(line: str) -> str:
    return re.sub(r"(`+).+?\1", "code", line)


# ----------------------------------------------------------------------------- links and anchors


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: links reduced to their text, lower case, punctuation other than
    '-' and '_' dropped, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def links(page: Page) -> Iterator[tuple[int, str]]:
    for number, line in page.prose:
        for match in re.finditer(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", without_code(line)):
            yield number, match.group(1)


def broken_links(page: Page) -> list[str]:
    broken = []
    for number, target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path_part, _, anchor = target.partition("#")
        where = f"{page.name}:{number}: {target}"
        if not path_part:  # an anchor of this page
            if anchor not in set(page.anchors()):
                broken.append(f"{where}: no heading with anchor #{anchor} here")
            continue
        resolved = (page.path.parent / path_part).resolve()
        if not resolved.exists():
            broken.append(f"{where}: no such file or folder")
        elif ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{where}: outside the repository")
        elif anchor and resolved.suffix == ".md" and anchor not in set(read_page(resolved).anchors()):
            broken.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(ROOT)}")
    return broken


# ----------------------------------------------------------------------------- commands


def parse_with_config(build_parser: Callable, argv: list[str]) -> None:
    """The command's parser, then its config keys through the config, as the command would load them."""
    from onlinemix.core.cli import parse_config_args
    from onlinemix.core.config import load_config

    args, overrides = parse_config_args(build_parser(), argv)
    load_config(args.config, overrides)


def parse_train(argv: list[str]) -> None:
    from onlinemix.core import cli
    from onlinemix.core.config import load_config

    args, overrides = cli.parse_args(argv)
    load_config(args.config, overrides)


def parse_eval(argv: list[str]) -> None:
    from onlinemix.evaluation.evaluate import parse_args

    parse_args(argv)


def parse_plan(argv: list[str]) -> None:
    from onlinemix.tools.plan import build_parser

    parse_with_config(build_parser, argv)


def parse_stats(argv: list[str]) -> None:
    from onlinemix.tools.stats import parse_args

    parse_args(argv)


def parse_cache(argv: list[str]) -> None:
    from onlinemix.cache.__main__ import build_parser

    parse_with_config(build_parser, argv)


def parse_data(argv: list[str]) -> None:
    from onlinemix.data.__main__ import build_parser

    build_parser().parse_args(argv)


def parse_tinymodel(argv: list[str]) -> None:
    from onlinemix.tinymodel.__main__ import parse_args

    parse_args(argv)


def parse_package(argv: list[str]) -> None:
    """``python -m onlinemix <command> ...``: the command must exist, then its own parser."""
    from onlinemix.__main__ import COMMANDS
    from onlinemix.tools.env import build_parser

    if not argv or argv[0] not in COMMANDS:
        raise ValueError(f"python -m onlinemix has no command {argv[:1]}; known: {', '.join(COMMANDS)}")
    build_parser().parse_args(argv[1:])


PARSERS: dict[str, Callable[[list[str]], None]] = {
    "onlinemix": parse_package, "onlinemix.train": parse_train, "onlinemix.eval": parse_eval,
    "onlinemix.plan": parse_plan, "onlinemix.stats": parse_stats, "onlinemix.cache": parse_cache,
    "onlinemix.data": parse_data, "onlinemix.tinymodel": parse_tinymodel,
}
SCRIPTS = {f"onlinemix-{name}": f"onlinemix.{name}" for name in ("train", "eval", "stats", "cache", "data")}
COMMAND_START = re.compile(r"(?<![\w./-])(python3? -m onlinemix\b|accelerate launch\b|torchrun\b|onlinemix-[a-z]+\b)")


@dataclass(frozen=True)
class Command:
    where: str     # page:line
    text: str      # as quoted
    module: str    # a key of PARSERS
    argv: list[str]
    inline: bool   # quoted in inline code: a mention may leave out required arguments
    refused: bool  # shown being refused
    error: str | None = None  # what makes the quote itself unreadable (quotes, placeholders)


def placeholder_free(token: str) -> str:
    if token in PLACEHOLDERS:
        return PLACEHOLDERS[token]
    for name in re.findall(r"<[^<>\s]+>", token):
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {name}: write an example value, or add it to PLACEHOLDERS")
        token = token.replace(name, PLACEHOLDERS[name])
    if re.fullmatch(r"[A-Z][A-Z0-9_]*", token):
        raise ValueError(f"unknown placeholder {token}: write an example value, or add it to PLACEHOLDERS")
    return token


def package_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """(module, arguments) when ``tokens`` run one of the package's commands, else None."""
    if not tokens:
        return None
    head = tokens[0]
    if head in SCRIPTS:
        return SCRIPTS[head], tokens[1:]
    if head in ("python", "python3") and len(tokens) > 2 and tokens[1] == "-m":
        return (tokens[2], tokens[3:]) if tokens[2] in PARSERS else None
    if head in ("accelerate", "torchrun"):
        for i, token in enumerate(tokens):
            if token == "onlinemix/train.py" or token.endswith("/onlinemix/train.py"):
                return "onlinemix.train", tokens[i + 1:]
            if token == "-m" and tokens[i + 1:i + 2] == ["onlinemix.train"]:
                return "onlinemix.train", tokens[i + 2:]
    return None


def commands_in(text: str, where: str, inline: bool, refused: bool) -> Iterator[Command]:
    """The package's commands in one logical shell line (continuations joined)."""
    for match in COMMAND_START.finditer(text):
        before = text[:match.start()]
        if re.search(r"(^|\s)#", before):  # inside a comment
            return
        # A command starts a line, follows an environment assignment, a chain operator or a colon
        # ("continue with: python -m ..."); elsewhere in a code block the words are prose.
        if not (inline or re.fullmatch(r"(\w+=\S*\s+)*", before) or re.search(r"(&&|;|\||:)\s*$", before)):
            continue
        try:
            tokens = shlex.split(text[match.start():], comments=True)
        except ValueError as e:
            yield Command(where, text[match.start():], "", [], inline, refused, f"not a shell line: {e}")
            return
        segment: list[str] = []
        for token in [*tokens, "&&"]:
            if token not in ("&&", "||", ";", "|"):
                segment.append(token)
                continue
            found = package_command(segment)
            if found:
                module, argv = found
                try:
                    argv, error = [placeholder_free(t) for t in argv if t != "..."], None
                except ValueError as e:
                    error = str(e)
                yield Command(where, " ".join(segment), module, argv, inline, refused, error)
            segment = []
        return


def logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    current, start = "", 0
    for offset, line in enumerate(block.lines):
        if not current:
            start = block.first_line + offset
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            yield start, current + line
            current = ""
    if current:
        yield start, current


def page_commands(page: Page) -> Iterator[Command]:
    for block in page.blocks:
        if block.language in SKIP_LANGUAGES:
            continue
        lines = list(logical_lines(block))
        for i, (number, line) in enumerate(lines):
            following = next((text.strip() for _, text in lines[i + 1:] if text.strip()), "")
            refused = line.lstrip().startswith("$ ") and following.startswith(ERROR_LINES)
            yield from commands_in(line.lstrip().removeprefix("$ "), f"{page.name}:{number}", False, refused)
    for number, code in inline_code(page):
        yield from commands_in(code, f"{page.name}:{number}", True, False)


@contextlib.contextmanager
def flags_in_full() -> Iterator[None]:
    """Parsers built meanwhile take no abbreviated flag (argparse would read ``--gpu`` as ``--gpus``): a
    page spells every flag as it is declared."""
    init = argparse.ArgumentParser.__init__

    def exact(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        init(self, *args, **{**kwargs, "allow_abbrev": False})

    argparse.ArgumentParser.__init__ = exact
    try:
        yield
    finally:
        argparse.ArgumentParser.__init__ = init


def problem(command: Command) -> str | None:
    """None when the command parses as a user would run it (or, shown refused, when it is refused)."""
    from onlinemix.core.errors import UserError

    if command.error:
        return command.error
    if command.inline and not command.argv:
        return None  # the command's name in prose
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), flags_in_full():
            PARSERS[command.module](command.argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help
            error = None
        elif command.inline and "the following arguments are required" in err.getvalue():
            error = None  # a mention of the command, not a run of it
        else:
            error = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {e.code}"
    except (UserError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    else:
        error = None
    if command.refused:
        return None if error else "shown refused, but accepted"
    return error


def all_commands() -> list[Command]:
    return [command for page in PAGES for command in page_commands(read_page(page))]


# ----------------------------------------------------------------------------- tests


def test_the_pages_exist() -> None:
    assert (ROOT / "docs" / "README.md").is_file()
    assert len(PAGES) > 10


def test_every_relative_link_resolves() -> None:
    broken = [link for page in PAGES for link in broken_links(read_page(page))]
    assert broken == [], "\n".join(broken)


def test_every_quoted_command_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository root, as the docs run them
    commands = all_commands()
    wrong = [f"{c.where}: {c.text}: {message}" for c in commands if (message := problem(c))]
    assert wrong == [], "\n".join(wrong)


def test_the_commands_of_every_kind_are_found() -> None:
    """The extraction itself: each command is quoted somewhere, the launchers included, and the
    transcripts of refused flags are recognised as such."""
    commands = all_commands()
    assert set(PARSERS) <= {c.module for c in commands}
    launchers = {c.text.split()[0] for c in commands if c.module == "onlinemix.train"}
    assert {"accelerate", "torchrun", "python"} <= launchers
    assert any(c.refused and "--train.epochz" in c.argv for c in commands)
    assert any(c.inline for c in commands) and any(not c.inline for c in commands)


SNIPPET = """# A page

```bash
python -m onlinemix.train --train.epochs 2 --config configs/tiny.yaml
accelerate launch --num_processes 2 onlinemix/train.py --gen-gpus 1 \\
    --train.epochz 3                      # a misspelt config key
torchrun --nproc-per-node 2 -m onlinemix.train --no-such-flag
pip install -e . && python -m onlinemix.eval RUN_DIR --protocol fastest
python -m onlinemix.cache warm --variations 4 --cache.dirr /data/cache
python -m onlinemix.data prepare digits --out runs/s --sizes 32
python -m onlinemix env --jsn
```

Prose quotes `python -m onlinemix.plan --gpus 8 --dataset-size 10 --gen-rate 1 --train-rate 2 --gpu 3` and
`python -m onlinemix.stats runs/x --guidance -3` and `python -m onlinemix.tinymodel quality --stepz 3`, and
[a link](no-such-page.md) and [an anchor](#no-such-heading) and [a good one](#a-page).
"""


def test_a_wrong_flag_or_link_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: every wrong flag and link of the snippet is reported, and only they are."""
    monkeypatch.chdir(ROOT)
    page = read_page(ROOT / "docs" / "snippet.md", SNIPPET)  # as if it were a page under docs/
    commands = list(page_commands(page))
    assert len(commands) == 10
    results = {c.text: problem(c) for c in commands}
    assert results.pop("python -m onlinemix.train --train.epochs 2 --config configs/tiny.yaml") is None
    assert all(message for message in results.values()), results
    misspelt = "accelerate launch --num_processes 2 onlinemix/train.py --gen-gpus 1 --train.epochz 3"
    assert "train.epochz" in results[misspelt]
    assert sorted(broken.split(": ", 2)[1] for broken in broken_links(page)) == ["#no-such-heading", "no-such-page.md"]

"""The README and docs/: every relative link resolves, and every teskd-train / teskd-compare flag they name exists.

Links: ``[text](target)`` outside code, relative to the page; the file (or folder) must exist, and a ``#anchor``
must be a heading of the page it points into (GitHub's anchors). Flags: every ``--flag`` of a command line (in a
code block or in backticks) after ``teskd-train``, ``teskd-compare`` or ``-m teskd_fast.train[.compare]``, and every
backticked ``--flag`` in a paragraph that names one of those commands (or on that command's own page), must be an
option of the command's parser, built without running anything; a value given to a flag with choices (``--loader
dali``, ``--precision bf16|fp16``) must be one of them.
"""

import argparse
import re
from pathlib import Path

import pytest

from teskd_fast.train.compare import build_compare_parser
from teskd_fast.train.config import build_parser

ROOT = Path(__file__).resolve().parents[1]
# The pages whose flags are checked; their links too, and those of the results they point to.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINKED = [*PAGES, ROOT / "bench" / "RESULTS.md"]

PARSERS = {"teskd-train": build_parser(), "teskd-compare": build_compare_parser()}
MODULES = {"teskd_fast.train": "teskd-train", "teskd_fast.train.compare": "teskd-compare"}
# The command a backticked flag belongs to on a page about one command, where a paragraph does not name it.
PAGE_COMMAND = {"training.md": "teskd-train", "training-details.md": "teskd-train", "comparing.md": "teskd-compare"}

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _without_code_blocks(text: str) -> str:
    return FENCE.sub("", text)


def _code_blocks(text: str) -> list[str]:
    return [m.group(0) for m in FENCE.finditer(text)]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated heading gets ``-1``, ``-2``, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(_without_code_blocks(text)):
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(page: Path) -> list[str]:
    """One line per relative link of ``page`` that does not resolve."""
    text = page.read_text(encoding="utf-8")
    prose = CODE_SPAN.sub("", _without_code_blocks(text))
    problems = []
    for target in LINK.findall(prose):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue  # http:, https:, mailto:
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            problems.append(f"{page.name}: link to {target}: {dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
            problems.append(f"{page.name}: link to {target}: no heading '#{anchor}' in {dest.name}")
    return problems


def _command_at(tokens: list[str]) -> tuple[str | None, int]:
    """The command a token list runs (teskd-train / teskd-compare) and the index of its first argument."""
    for i, tok in enumerate(tokens):
        if tok in PARSERS:
            return tok, i + 1
        if tok == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
            return MODULES[tokens[i + 1]], i + 2
    return None, 0


def _flag_problems(command: str, tokens: list[str], where: str) -> list[str]:
    """Unknown flags among ``tokens`` (arguments of ``command``), and values outside a flag's choices."""
    actions = PARSERS[command]._option_string_actions
    problems = []
    for i, tok in enumerate(tokens):
        flags = FLAG.findall(tok) if tok.startswith("--") else []
        for flag in flags:
            if flag not in actions:
                problems.append(f"{where}: {command} has no flag {flag}")
        if len(flags) != 1 or flags[0] not in actions:
            continue
        choices = actions[flags[0]].choices
        value = tok.partition("=")[2] if "=" in tok else (tokens[i + 1] if i + 1 < len(tokens) else "")
        # A placeholder (NAME, RUN_DIR), an elision or another flag is not a value.
        if (choices is None or not value or value.startswith(("-", "<")) or value.isupper()
                or "..." in value):
            continue
        for v in value.strip(",.;:)").split("|"):
            if v not in choices:
                problems.append(f"{where}: {command} {flags[0]}: {v!r} is not one of {sorted(choices)}")
    return problems


def _command_line_problems(line: str, where: str) -> list[str] | None:
    """The problems of a command line, or None when ``line`` runs neither command."""
    tokens = re.sub(r"(^|\s)#.*", "", line).split()  # a shell comment is prose
    command, start = _command_at(tokens)
    if command is None:
        return None
    return _flag_problems(command, tokens[start:], where)


def _paragraph_command(paragraph: str, default: str | None) -> str | None:
    # teskd-compare takes every teskd-train flag: on its page, a teskd-train flag is one of its own too.
    if default == "teskd-compare" or "teskd-compare" in paragraph or "teskd_fast.train.compare" in paragraph:
        return "teskd-compare"
    if "teskd-train" in paragraph or "-m teskd_fast.train" in paragraph:
        return "teskd-train"
    return default


def flag_problems_in(name: str, text: str) -> list[str]:
    """One line per unknown ``teskd-train`` / ``teskd-compare`` flag, or bad choice, that ``text`` names."""
    problems = []
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            problems += _command_line_problems(line, f"{name}: `{line.strip()}`") or []
    default = PAGE_COMMAND.get(name)
    for paragraph in re.split(r"\n\s*\n", _without_code_blocks(text)):
        command = _paragraph_command(paragraph, default)
        for m in CODE_SPAN.finditer(paragraph):
            span = m.group(2).strip()
            where = f"{name}: `{span}`"
            found = _command_line_problems(span, where)
            if found is not None:
                problems += found
            elif command is not None and FLAG.search(span) and span.startswith("--"):
                problems += _flag_problems(command, span.split(), where)
    return problems


@pytest.mark.parametrize("page", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert link_problems(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_flags_exist(page):
    assert flag_problems_in(page.name, page.read_text(encoding="utf-8")) == []


def test_the_readme_is_short_and_starts_with_the_quickstart():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "the README is the five-minute page: details go to docs/"
    quickstart = text.split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert quickstart.splitlines() == [
        'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[dev,dali]" && teskd-train',
        'python -m pytest tests/ -m "not slow"',
    ]
    # .ci/run installs and tests as the Quickstart says, then runs the slow tier: every test runs in CI.
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in ("pip install --quiet torch==2.14.1 torchvision==0.29.1", 'pip install --quiet -e ".[dev,dali]"',
                 'python -m pytest tests/ -q -m "not slow"\npython -m pytest tests/ -q -m slow\n'):
        assert step in ci


def test_the_parsers_are_the_commands():
    assert isinstance(PARSERS["teskd-train"], argparse.ArgumentParser)
    assert PARSERS["teskd-train"].prog == "teskd-train" and PARSERS["teskd-compare"].prog == "teskd-compare"
    # --seeds is teskd-compare's own: the check must tell the two commands apart.
    assert "--seeds" in PARSERS["teskd-compare"]._option_string_actions
    assert "--seeds" not in PARSERS["teskd-train"]._option_string_actions


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/other.md) [ok](docs/other.md#a-code-heading-yes) [ok](docs/other.md#twice-1) [ok](#top)\n"
        "[web](https://example.com/missing.md) `[in code](missing-in-code.md)`\n\n# Top\n\n"
        "```\n[in a block](missing-in-block.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/other.md#no-such-heading) [bad self](#nowhere)\n"
    )
    problems = link_problems(page)
    assert len(problems) == 3, problems
    assert "docs/missing.md" in problems[0]
    assert "#no-such-heading" in problems[1] and "#nowhere" in problems[2]


def test_an_unknown_flag_is_found():
    text = (
        "```bash\n"
        "teskd-train --preset cifar100-resnet18 --data-dir data/   # --not-a-flag in a comment is not checked\n"
        "teskd-train --no-such-flag\n"
        "torchrun --nproc_per_node 8 -m teskd_fast.train --arch resnet18 \\\n    --bogus-after-continuation 1\n"
        "teskd-compare --seeds 3 --loader jpeg\n"
        "```\n\n"
        "With `teskd-train`, `--seeds 3` is another command's flag, `--lr` is fine, `--precision bf16|fp17` is not.\n\n"
        "A paragraph naming no command: `--cache PATH` belongs to another tool.\n\n"
        "`teskd-compare --seeds 5 --method baseline` and `--nope` after teskd-compare.\n"
    )
    problems = flag_problems_in("README.md", text)
    expected = ["--no-such-flag", "--bogus-after-continuation", "'jpeg'", "--seeds", "'fp17'", "--nope"]
    assert len(problems) == len(expected), problems
    for problem, word in zip(problems, expected, strict=True):
        assert word in problem, (problem, word)
    # On the training page a paragraph that names no command is about teskd-train.
    assert flag_problems_in("training.md", "Then `--warmup-epochs` and `--made-up`.\n") == [
        "training.md: `--made-up`: teskd-train has no flag --made-up"
    ]

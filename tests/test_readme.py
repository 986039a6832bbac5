"""Every ```python block of README.md runs as written, and prints what its comments say.

A ``print(...)`` line whose comment holds text is a promise: the comment, up to an
optional ``": "`` that starts an explanation, is what the line prints, with ``...``
standing for any text (``print(x)  # 0.8003: the nearest whole number`` promises
``0.8003``). A print without a comment promises nothing.

The README is the landing page: the two set-up commands first, a quick start, links into
the documentation (whose guides ``test_docs.py`` runs the same way), under 150 lines.
"""

import re
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
PROMISE = re.compile(r"^\s*print\(.*\)\s*#\s*(?P<comment>.+)$")


def promises(block: str) -> dict[int, str]:
    """``{line number: printed text promised}`` for the print lines of ``block``."""
    found = {}
    for number, line in enumerate(block.splitlines(), start=1):
        match = PROMISE.match(line)
        if match:
            found[number] = match["comment"].split(": ", 1)[0].strip()
    return found


def run_and_capture(block: str, name: str) -> dict[int, str]:
    """Run ``block`` (called ``name``); ``{line number: what the print on that line printed}``."""
    printed: dict[int, str] = {}

    def recording_print(*values, sep=" ", end="\n", **kwargs):
        caller = sys._getframe(1)
        if caller.f_code.co_filename == name:
            printed[caller.f_lineno] = sep.join(map(str, values))
        print(*values, sep=sep, end=end, **kwargs)

    exec(compile(block, name, "exec"), {"print": recording_print})
    return printed


def assert_prints_what_it_promises(block: str, name: str) -> None:
    printed = run_and_capture(block, name)
    for line, promised in promises(block).items():
        assert line in printed, f"{name} line {line} promises {promised!r} but never printed"
        assert matches(promised, printed[line]), (
            f"{name} line {line} promises {promised!r} and printed {printed[line]!r}"
        )


def matches(promised: str, printed: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in promised.split("..."))
    return re.fullmatch(pattern, printed) is not None


def test_readme_is_a_landing_page_with_a_short_quick_start():
    lines = README.read_text().splitlines()
    assert len(lines) < 150, "the README is the landing page: the rest belongs in docs/"
    assert lines[2] == "```bash"  # the two set-up commands come first
    assert lines[3].startswith("make demo") and lines[4].startswith("make test")
    assert len(BLOCKS) >= 1 and all(len(block.splitlines()) <= 30 for block in BLOCKS)
    assert sum(len(promises(block)) for block in BLOCKS) >= 2


def test_promises_are_read_as_written():
    block = "print(a)  # 0.8003: the nearest\nprint(b)\nprint(c)  # [1, ...]\n"
    assert promises(block) == {1: "0.8003", 3: "[1, ...]"}
    assert matches("[1, ...]", "[1, 2, 3]") and not matches("[1, ...]", "[2, 3]")
    assert not matches("['explicit', 'explicit']", "['woodbury', 'explicit']")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_and_prints_what_it_promises(index):
    assert_prints_what_it_promises(BLOCKS[index], f"README.md block {index}")

"""The documentation site's pages against the code.

Every guide in ``docs/guides/`` runs: its ```python blocks in order, each as written, and
each print prints what its comment promises (the convention of ``test_readme.py``). A
block whose first line is ``# torchrun --nproc_per_node N ...`` is a script for several
processes: it runs under ``torchrun`` on N CPU processes, and each promise must be printed
by every rank. Every public package has an API page in the site's navigation that
renders each name of its ``__all__``; ``make docs`` checks that the pages build.
"""

import importlib
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_readme import assert_prints_what_it_promises, matches, promises

import secondorder

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GUIDES = sorted((DOCS / "guides").glob("*.md"))
TORCHRUN = re.compile(r"# torchrun --nproc_per_node (?P<processes>\d+)\b")
NOT_DOCUMENTED = {"cli", "demo"}  # the console script and the demo: documented by --help
# Appended to a script for several processes: a rank that finished leaves without
# finalising the interpreter around gloo's threads, which can abort a process that passed
# ("terminate called without an active exception"; see _distributed_workers._init_and_run).
LEAVE_WITHOUT_FINALISING = "\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def run_under_torchrun(block: str, processes: int, name: str, directory: Path) -> None:
    script = directory / "script.py"
    script.write_text(block + LEAVE_WITHOUT_FINALISING)
    # --standalone: the rendezvous store binds a port the system picks as it listens
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    # each rank's stdout to its own file: printed together, two ranks' lines can interleave
    logs = directory / "logs"
    command += ["--log-dir", str(logs), "--redirects", "1"]
    result = subprocess.run(
        [*command, "--nproc_per_node", str(processes), str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=directory,
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # this checkout's package, as pytest's
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
    outputs = sorted(logs.rglob("stdout.log"))
    assert len(outputs) == processes, outputs
    lines = [line for out in outputs for line in out.read_text().splitlines()]
    for line, promised in promises(block).items():
        printed = sum(matches(promised, out) for out in lines)
        assert printed == processes, (
            f"{name} line {line} promises {promised!r} on each of {processes} ranks; "
            f"it was printed {printed} times in:\n{lines}"
        )


def guide_param(path: Path):
    several = any(TORCHRUN.match(block) for block in python_blocks(path))
    return pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if several else [])


def test_every_guide_shows_code_that_promises_something():
    assert len(GUIDES) >= 6
    for guide in GUIDES:
        blocks = python_blocks(guide)
        assert any(promises(block) for block in blocks), f"{guide.name} promises nothing"


@pytest.mark.parametrize("guide", [guide_param(path) for path in GUIDES])
def test_guide_runs_and_prints_what_it_promises(guide, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the files a guide writes land here
    for index, block in enumerate(python_blocks(guide)):
        name = f"docs/guides/{guide.name} block {index}"
        several = TORCHRUN.match(block)
        if several:
            run_under_torchrun(block, int(several["processes"]), name, tmp_path)
        else:
            assert_prints_what_it_promises(block, name)


def public_packages() -> list[str]:
    return [
        module.name
        for module in pkgutil.iter_modules(secondorder.__path__)
        if not module.name.startswith("_") and module.name not in NOT_DOCUMENTED
    ]


@pytest.mark.parametrize("package", public_packages())
def test_every_public_name_has_its_place_in_the_api_reference(package):
    page = DOCS / "api" / f"{package}.md"
    assert page.exists(), f"secondorder.{package} has no API page ({page.relative_to(ROOT)})"
    nav = (ROOT / "mkdocs.yml").read_text()
    in_nav = re.search(rf"^\s*- [^#\n]*: api/{package}\.md\s*$", nav, flags=re.MULTILINE)
    assert in_nav, f"api/{package}.md is not in the nav of mkdocs.yml"
    rendered = set(re.findall(r"^::: (\S+)", page.read_text(), flags=re.MULTILINE))
    module = importlib.import_module(f"secondorder.{package}")
    missing = [name for name in module.__all__ if f"secondorder.{package}.{name}" not in rendered]
    assert not missing, f"{page.relative_to(ROOT)} leaves out {missing}"


def test_readme_links_lead_to_files_that_exist():
    links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text())
    assert links, "the README links into the documentation"
    assert [link for link in links if not (ROOT / link).exists()] == []


SPHINX_STYLE = '''
class Thing:
    r"""A thing; see :func:`helper`, :class:`~torch.Tensor` and :mod:`.maths`.

    .. math::

        a &= b \\\\
        c &= d

    Args:
        lr, betas,
        eps: as for AdamW.
        size: how many.
        Other arguments as for :class:`Thing`.
    """

    def __init__(self, lr: float, betas: tuple, eps: float, size: int):
        pass

    def method(self):
        """Does nothing."""


def helper():
    """Helps; :meth:`Thing.method` of :class:`Thing`."""


def forwarding(x: int, **options):
    """Forwards.

    Args:
        x: kept.
        layerwise, accumulation_steps: taken by ``**options``.
        **options: the rest.
    """
'''


def load_with_sphinx_habits(directory: Path, modules: dict[str, str]):
    """The package ``pkg`` made of ``modules``, loaded by Griffe with docs/griffe_roles.py."""
    griffe = pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_roles", DOCS / "griffe_roles.py")
    roles = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roles)
    (directory / "pkg").mkdir()
    for name, code in modules.items():
        (directory / "pkg" / f"{name}.py").write_text(code)
    extensions = griffe.load_extensions(roles.SphinxHabits())
    return griffe.load("pkg", search_paths=[str(directory)], extensions=extensions)


def test_docstrings_written_for_sphinx_render_without_warnings(tmp_path, caplog):
    """docs/griffe_roles.py: roles become optional links, math a block, groups of
    arguments one entry each; mkdocstrings' parser then finds every argument."""
    init = '"""Helpers.\n\n.. math:: y = 2 x\n"""\n'
    with caplog.at_level("WARNING"):
        pkg = load_with_sphinx_habits(tmp_path, {"__init__": init, "maths": SPHINX_STYLE})

    thing = pkg["maths.Thing"].docstring
    assert '<autoref identifier="pkg.maths.helper" optional><code>helper</code>' in thing.value
    assert '<autoref identifier="torch.Tensor" optional><code>Tensor</code>' in thing.value
    assert '<autoref identifier="pkg.maths" optional><code>.maths</code>' in thing.value
    assert "\\begin{aligned}\na &= b \\\\\nc &= d\n\\end{aligned}\n$$" in thing.value
    assert pkg.docstring.value == "Helpers.\n\n$$\ny = 2 x\n$$\n"
    assert 'identifier="pkg.maths.Thing.method"' in pkg["maths.helper"].docstring.value
    with caplog.at_level("WARNING"):
        sections = thing.parse("google", warn_missing_types=False)  # as mkdocs.yml parses
    assert caplog.records == []  # neither the roles nor the parser found anything amiss
    parameters = next(s for s in sections if s.kind.value == "parameters")
    assert [p.name for p in parameters.value] == ["lr", "betas", "eps", "size"]
    assert parameters.value[1].description == "as for AdamW."
    assert "Other arguments as for" in sections[-1].value  # moved below the arguments

    with caplog.at_level("WARNING"):
        sections = pkg["maths.forwarding"].docstring.parse("google", warn_missing_types=False)
    assert caplog.records == []
    kinds = {section.kind.value: section for section in sections}
    assert [p.name for p in kinds["parameters"].value] == ["x", "**options"]
    forwarded = kinds["other parameters"].value
    assert [p.name for p in forwarded] == ["layerwise", "accumulation_steps"]


def test_a_role_naming_nothing_in_the_package_fails_the_build(tmp_path, caplog):
    code = '"""See :func:`pkg.helper`, :func:`pkg.helpr` and :class:`torch.Nothing`."""\n'
    with caplog.at_level("WARNING"):
        load_with_sphinx_habits(tmp_path, {"__init__": code + "def helper():\n    pass\n"})
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert messages[0].endswith("__init__.py:1: :func:`pkg.helpr` names nothing in pkg")

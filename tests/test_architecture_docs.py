"""Every ```python block of docs/architecture.md runs, and prints what its comments say."""

import re
from pathlib import Path

import pytest
from test_readme import assert_prints_what_it_promises, promises

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_document_shows_every_extension_point_with_a_promise():
    assert len(BLOCKS) == 4  # an optimiser, a projector, an operator, a pruner
    assert all(promises(block) for block in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_architecture_example_runs_and_prints_what_it_promises(index):
    assert_prints_what_it_promises(BLOCKS[index], f"docs/architecture.md block {index}")

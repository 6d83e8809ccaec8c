"""The mutation list (tests/mutants.py) stays applicable: every replacement's text occurs exactly once in its file,
every killing test exists, and names are unique. A refactor that moves the text makes this fail in the fast suite,
before CI's `make mutants` would report the mutant as stale."""

from __future__ import annotations

import pytest

import mutants


@pytest.mark.parametrize("m", mutants.MUTANTS, ids=lambda m: m.name)
def test_mutant_applies_once_and_names_existing_tests(m):
    assert mutants.check_text(m) is None, mutants.check_text(m)
    for node in m.tests:
        path, _, name = node.partition("::")
        text = (mutants.REPO / path).read_text()
        assert not name or f"def {name.split('[')[0]}(" in text, f"{node}: no such test"


def test_names_are_unique_and_the_list_covers_the_table_of_issue_11():
    names = [m.name for m in mutants.MUTANTS]
    assert len(names) == len(set(names))
    assert len(names) >= 12

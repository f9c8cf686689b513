"""dev/mutation_check.py reads its list strictly: a snippet that is not in its file exactly
once, an unknown alias or a missing field stops it with the mutation named."""

from __future__ import annotations

import pytest

from helpers import import_script

mutation_check = import_script("dev/mutation_check.py")
Mutation, MutationListError = mutation_check.Mutation, mutation_check.MutationListError
check_anchors, load_mutations = mutation_check.check_anchors, mutation_check.load_mutations


ENTRY = """
[[mutation]]
id = "{id}"
area = "layer"
bug = "a bug"
file = "pkg/code.py"
find = '{find}'
replace = 'x = 2'
tests = [{tests}]
"""


def write_list(tmp_path, *entries: str, aliases: str = "") -> list[Mutation]:
    path = tmp_path / "mutations.toml"
    path.write_text(aliases + "".join(entries))
    return load_mutations(path)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\ny = 1\ny = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_code.py").write_text("")
    return tmp_path


def test_aliases_expand_and_a_unique_snippet_passes(repo):
    mutations = write_list(
        repo, ENTRY.format(id="a", find="x = 1", tests='"@code", "tests/test_code.py::test_x"'),
        aliases='[aliases]\ncode = "tests/test_code.py"\n')
    assert mutations[0].tests == ("tests/test_code.py", "tests/test_code.py::test_x")
    check_anchors(mutations, repo)


@pytest.mark.parametrize("find,message", [("z = 1", "snippet not found"),
                                          ("y = 1", "snippet found 2 times")])
def test_a_missing_or_ambiguous_snippet_names_the_mutation(repo, find, message):
    mutations = write_list(repo, ENTRY.format(id="broken", find=find,
                                              tests='"tests/test_code.py"'))
    with pytest.raises(MutationListError, match=f"broken: {message} in pkg/code.py"):
        check_anchors(mutations, repo)


def test_missing_test_file_and_list_errors(repo):
    mutations = write_list(repo, ENTRY.format(id="a", find="x = 1",
                                              tests='"tests/test_gone.py"'))
    with pytest.raises(MutationListError, match="a: test file tests/test_gone.py does not"):
        check_anchors(mutations, repo)
    with pytest.raises(MutationListError, match="b: unknown test alias @nothing"):
        write_list(repo, ENTRY.format(id="b", find="x = 1", tests='"@nothing"'))
    with pytest.raises(MutationListError, match="duplicate id a"):
        write_list(repo, *[ENTRY.format(id="a", find="x = 1", tests='"t.py"')] * 2)
    with pytest.raises(MutationListError, match=r"\(c\): missing \['tests'\]"):
        write_list(repo, ENTRY.format(id="c", find="x = 1", tests="").replace("tests = []", ""))

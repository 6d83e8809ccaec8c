"""The code cites the method by section of docs/method.md, a file in the repository: every cited section exists,
and nothing cites a document a reader of the repository does not have."""

import re

from conftest import REPO

SOURCES = [p for d in ("distill", "tests", "benchmarks", "configs", "slurm") for p in (REPO / d).rglob("*")
           if p.suffix in (".py", ".yaml", ".sbatch", ".sh") and p.is_file()] + [REPO / "README.md"]


def test_every_cited_section_of_docs_method_exists():
    headings = set(re.findall(r"^## (§\d+)", (REPO / "docs" / "method.md").read_text(), flags=re.M))
    assert headings >= {f"§{i}" for i in range(1, 10)}
    cited = {}
    for path in SOURCES:
        for m in re.finditer(r"docs/method\.md (§\d+)(?:–(§\d+))?", path.read_text()):
            for section in filter(None, m.groups()):
                cited.setdefault(section, path.relative_to(REPO))
    assert cited, "nothing cites docs/method.md"
    missing = {s: str(p) for s, p in cited.items() if s not in headings}
    assert not missing, missing


def test_no_citation_of_a_document_outside_the_repository():
    this = __file__.rsplit("/", 1)[-1]
    offenders = [str(p.relative_to(REPO)) for p in SOURCES if p.name != this and re.search(r"DESIGN(\.md| §)",
                                                                                            p.read_text())]
    assert not offenders, offenders

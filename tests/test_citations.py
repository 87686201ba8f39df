"""One citations source (issue 19): the metric modules, which load standalone and so carry vendored
copies, cite exactly the entries of ``publishing.citations``, and so do their READMEs and ours."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from publishing.citations import METRIC_CITATIONS, NDLB, bibtex

ROOT = Path(__file__).resolve().parents[1]


def module_citation(name: str) -> str:
    """The `_CITATION` string of metrics/<name>/<name>.py, read from the source (no import)."""
    tree = ast.parse((ROOT / "metrics" / name / f"{name}.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_CITATION"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"metrics/{name}/{name}.py has no _CITATION")


@pytest.mark.parametrize("name", sorted(METRIC_CITATIONS))
def test_vendored_metric_citation_equals_the_source(name):
    assert module_citation(name) == bibtex(*METRIC_CITATIONS[name]), (
        f"metrics/{name}/{name}.py: set _CITATION to publishing.citations.bibtex(*METRIC_CITATIONS[{name!r}]):\n"
        + bibtex(*METRIC_CITATIONS[name]))
    readme = (ROOT / "metrics" / name / "README.md").read_text(encoding="utf-8")
    for entry in METRIC_CITATIONS[name]:
        assert entry in readme, f"metrics/{name}/README.md does not carry {entry.splitlines()[0]}"


def test_every_metric_module_citing_ndlb_is_listed():
    citing = {p.parent.name for p in (ROOT / "metrics").glob("*/*.py")
              if p.stem == p.parent.name and "gaur2024" in p.read_text(encoding="utf-8")}
    assert citing == {n for n, entries in METRIC_CITATIONS.items() if NDLB in entries}


def test_readme_cites_the_source_entry():
    assert f"```bibtex\n{NDLB}\n```" in (ROOT / "README.md").read_text(encoding="utf-8")

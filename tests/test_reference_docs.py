"""The generated reference tables in docs/ match the models."""

from dispatcher.reference import DOCS, TARGETS, render


def test_reference_tables_are_up_to_date():
    for name, table in TARGETS.items():
        path = DOCS / name
        assert path.read_text() == render(path, table()), (
            f"docs/{name} is stale: run `python -m dispatcher.reference`"
        )

"""The README is the operator's manual: every setting `quotagate serve` reads has a row in
its configuration table, and the row gives the default the code really has."""

from __future__ import annotations

from pathlib import Path

from quotagate.settings import PREFIX, Settings

README = Path(__file__).resolve().parents[1] / "README.md"
#: set by the worker supervisor for its workers, not by an operator
INTERNAL = {"reuseport"}


def _rows() -> dict[str, str]:
    """Variable -> its default cell, from the table rows that start with a variable."""
    rows = {}
    for line in README.read_text().splitlines():
        if line.startswith(f"| `{PREFIX}"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    return rows


def _shown(value: object) -> str | None:
    """How the table writes a default, or None where it describes it in words."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int):
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    if isinstance(value, str) and value:
        return f"`{value}`"
    return None


def test_every_setting_has_a_row_with_its_default() -> None:
    rows = _rows()
    missing = [PREFIX + n.upper() for n in Settings.model_fields
               if n not in INTERNAL and PREFIX + n.upper() not in rows]
    assert not missing, f"README's configuration table lacks {missing}"
    for name, field in Settings.model_fields.items():
        if name in INTERNAL or field.default_factory is not None:
            continue
        cell = rows[PREFIX + name.upper()]
        want = _shown(field.default)
        if isinstance(field.default, Path):
            assert Path(cell.strip("`")) == field.default, f"{PREFIX}{name.upper()}: {cell!r}"
        elif want is None:  # empty string or list: the row says what empty means
            assert cell.startswith("empty"), f"{PREFIX}{name.upper()}: {cell!r}"
        else:
            assert want in cell, f"{PREFIX}{name.upper()}: default {want}, README {cell!r}"
    unknown = set(rows) - {PREFIX + n.upper() for n in Settings.model_fields}
    assert not unknown, f"README documents settings the code does not read: {unknown}"

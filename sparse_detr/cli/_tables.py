"""Tables that read at the terminal's width, whatever it is.

:func:`layout` picks the first of three layouts that fits ``width`` without cutting anything:

1. the table with its full headers (a wide terminal: the table as it always looked);
2. the table with the short headers its columns name, and a legend line saying what each short header means;
3. one block per row: its first field, then the others under it as ``header value`` pairs, as many to a line
   as fit, aligned from block to block (long text on lines of its own); short headers and the legend again.

Headers are never wrapped or cut, cells never end in "…": columns of long text (paths, descriptions) wrap
and fold instead. Cells are plain text (a ``[model]`` in a value stays), or :class:`~rich.text.Text` for
styled ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import RenderableType
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

WRAP_FLOOR = 16  # the narrowest a column of long text is worth wrapping into
INDENT = 2  # block layout: the fields under a row's first cell
GAP = 3  # block layout: between the fields of a line


@dataclass(frozen=True)
class Column:
    """A column: its header, and optionally a shorter one for narrow terminals with what it means (the legend
    entry), whether its cells are numbers (right-aligned) and whether they are long text that may wrap."""

    header: str
    short: str | None = None
    meaning: str = ""
    numeric: bool = False
    wrap: bool = False

    def label(self, narrow: bool) -> str:
        """The header a layout shows: the short one when ``narrow`` and there is one."""
        return self.short if narrow and self.short else self.header


def _cell(value) -> Text:
    """A cell as text: a :class:`~rich.text.Text` as it is, anything else as its plain string (never markup)."""
    return value.copy() if isinstance(value, Text) else Text(str(value))


def layout(title: str, columns: Sequence[Column], rows: Sequence[Sequence], width: int) -> list[RenderableType]:
    """What to print for the table ``rows`` (one cell per column) under ``title`` at ``width`` columns."""
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [max([_text_width(row[index]) for row in cells], default=0) for index in range(len(columns))]
    if _table_width(columns, widths, narrow=False) <= width:
        return [_table(title, columns, cells, widths, narrow=False, width=width)]
    legend = _legend(columns)
    if legend and _table_width(columns, widths, narrow=True) <= width:
        return [_table(title, columns, cells, widths, narrow=True, width=width), legend]
    return [*_blocks(title, columns, cells, widths, width), *([legend] if legend else [])]


def _text_width(text: Text) -> int:
    return max((cell_len(line) for line in text.plain.splitlines()), default=0)


def _column_width(column: Column, width: int, narrow: bool) -> int:
    """The narrowest ``column`` may be in a table: its header whole, and its widest cell unless it wraps."""
    content = min(width, WRAP_FLOOR) if column.wrap else width
    return max(cell_len(column.label(narrow)), content)


def _table_width(columns: Sequence[Column], widths: list[int], narrow: bool) -> int:
    """The narrowest the boxed table can be: the columns, a space either side of each, the rules between."""
    return sum(_column_width(column, width, narrow) for column, width in zip(columns, widths)) + 3 * len(columns) + 1


def _table(title: str, columns: Sequence[Column], cells: list[list[Text]], widths: list[int], narrow: bool,
           width: int) -> Table:  # fmt: skip
    """The boxed table; as wide as its title (up to ``width``) so the title does not wrap over a narrow table.
    Columns of long text shrink to fit, down to their :func:`_column_width`; the others keep their width."""
    table = Table(title=Text(title, style="table.title"), min_width=min(cell_len(title), width))
    for column, content in zip(columns, widths):
        justify = "right" if column.numeric else "left"
        narrowest = _column_width(column, content, narrow) if column.wrap else None
        table.add_column(Text(column.label(narrow)), justify=justify, no_wrap=not column.wrap, overflow="fold",
                         min_width=narrowest)  # fmt: skip
    for row in cells:
        table.add_row(*row)
    return table


def _legend(columns: Sequence[Column]) -> Text | None:
    """``short: meaning`` of each column whose short header differs from its header; None when none does."""
    entries = [f"{column.short}: {column.meaning}" for column in columns if column.label(True) != column.header]
    return Text("; ".join(entries), style="dim") if entries else None


def _blocks(
    title: str, columns: Sequence[Column], cells: list[list[Text]], widths: list[int], width: int
) -> Iterator[RenderableType]:
    """One block per row: its first field, then the others; those that fit beside others go in a grid of
    ``header value`` pairs that is the same in every block, the others on lines of their own, wrapped."""
    labels = [column.label(narrow=True) for column in columns]
    inline = [index for index in range(1, len(columns)) if not columns[index].wrap
              and INDENT + cell_len(labels[index]) + 1 + widths[index] <= width]  # fmt: skip
    own_line = [index for index in range(1, len(columns)) if index not in inline]
    grid = _grid(inline, labels, widths, width)
    yield Text(title, style="table.title")
    for row in cells:
        heading = Text.assemble(f"{labels[0]} ", row[0])
        heading.stylize("bold", cell_len(labels[0]) + 1)
        yield heading
        for line in grid:
            pairs = [_pair(labels[index], label_width, row[index], value_width, columns[index].numeric)
                     for index, label_width, value_width in line]  # fmt: skip
            text = Text.assemble(" " * INDENT, Text(" " * GAP).join(pairs))
            text.rstrip()
            yield text
        long_fields = [index for index in own_line if row[index].plain]
        if long_fields:
            yield Padding(_own_lines(labels, row, long_fields), (0, 0, 0, INDENT), expand=False)


def _grid(fields: list[int], labels: list[str], widths: list[int], width: int) -> list[list[tuple[int, int, int]]]:
    """``fields`` in as many grid columns as fit ``width``, row by row: each line a list of (field, label width,
    value width), the widths those of the field's grid column."""
    if not fields:
        return []
    for per_line in range(len(fields), 0, -1):  # one a line always fits: longer fields get lines of their own
        grid_columns = [fields[start::per_line] for start in range(per_line)]
        label_widths = [max(cell_len(labels[index]) for index in column) for column in grid_columns]
        value_widths = [max(widths[index] for index in column) for column in grid_columns]
        if INDENT + sum(label_widths) + per_line + sum(value_widths) + GAP * (per_line - 1) <= width:
            break
    lines = [fields[start : start + per_line] for start in range(0, len(fields), per_line)]
    return [[(index, label_widths[position], value_widths[position]) for position, index in enumerate(line)]
            for line in lines]  # fmt: skip


def _pair(label: str, label_width: int, value: Text, value_width: int, numeric: bool) -> Text:
    """``label value``, the label and the value padded to their grid column's widths."""
    value = value.copy()
    value.align("right" if numeric else "left", value_width)
    return Text.assemble(label, " " * (label_width - cell_len(label) + 1), value)


def _own_lines(labels: list[str], row: list[Text], fields: list[int]) -> Table:
    """``label value`` lines whose values wrap (and fold a word longer than the line) under themselves."""
    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for index in fields:
        grid.add_row(Text(labels[index]), row[index])
    return grid

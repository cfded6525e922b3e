"""CSV cells that a spreadsheet will not run: OWASP's defence against formula (CSV) injection.

Identity names, labels and notes are data (folder names, names files, suite files). Excel, LibreOffice and Google
Sheets read a cell that starts with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage return before one) as a
formula, which can fetch URLs with the sheet's data (``=HYPERLINK(...)``, ``=WEBSERVICE(...)``) or, in old Excel,
run commands (DDE). Such a *text* cell is written with a leading ``'``, which spreadsheets show as text and hide.
Numbers are never touched: a negative number stays a number (only ``str`` values are text here).
"""

from __future__ import annotations

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """``value`` as a CSV cell: text that would start a formula gets a leading ``'``; anything else as it is."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value

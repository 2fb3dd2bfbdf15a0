"""Built-in fusion operators, one small module each (installed as ``fusionsearch.operators``).

Importing this package registers them; the operator registry does so on first lookup.
"""

from fusionsearch.operators import add, awf, concat, max, mean, mul  # noqa: F401  (registers the built-ins)

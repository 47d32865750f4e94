"""Examples of your own scorers for fdpg-scale targets (``target.scorer: examples.my_scorers:has_docstring``).

A regular package (this file), so that ``examples.my_scorers`` resolves to this folder from the repository root.
"""

"""CoDiNet's training objective: the path terms, the cost term, the budget control and the combined loss.

The public names are exported by :mod:`dynroute`; import them from there.
"""

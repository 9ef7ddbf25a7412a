"""What a routed model does: MAC accounting, routing metrics, summaries and plots.

The public names are exported by :mod:`dynroute`; import them from there.
"""

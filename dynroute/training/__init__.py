"""Training support: multi-view data, the two stages and checkpoints.

The public names are exported by :mod:`dynroute`; import them from there.
"""

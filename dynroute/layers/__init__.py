"""The routing layers: :class:`Router`, :class:`GatedBlock`, :class:`GatedSequential`, and whole-model routing state.

The public names are exported by :mod:`dynroute`; import them from there.
"""

"""Retrofitting routers onto a ResNet: the converter, the block registry (one adapter module per block
family) and the MACs table.

The public names are exported by :mod:`dynroute`; import them from there.
"""

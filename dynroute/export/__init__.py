"""Exporting a converted model for deployment.

The public names are exported by :mod:`dynroute`; import them from there.
"""

"""Deploying a converted model: saved models shared on disk or the Hugging Face Hub, and exported programs.

The public names are exported by :mod:`dynroute`; import them from there.
"""

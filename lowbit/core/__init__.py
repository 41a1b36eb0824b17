"""Leaf helpers shared by every layer of the package; nothing here imports from the rest of lowbit."""

"""Thin clients for the artists' tools, over livediffusion.shared."""

"""Compression techniques: one module per method (see DESIGN.md)."""

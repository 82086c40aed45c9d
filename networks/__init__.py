"""Torch modules of the ResNext+ network."""

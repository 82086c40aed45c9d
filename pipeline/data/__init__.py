"""Data a user brings: data lists and their checks, collections, case discovery for batch
inference, and the atomic file writers (text, CSV, NIfTI) everything else writes through.

May import :mod:`transforms` and :mod:`networks`; never another :mod:`pipeline` subpackage.
"""

"""The jobs a user runs: the demo, the accuracy study and the command line
(``python -m pipeline``) that starts them.

May import every other part of :mod:`pipeline`, :mod:`transforms` and :mod:`networks`; nothing
imports it but ``pipeline.__main__``.
"""

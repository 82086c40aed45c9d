"""Data on disk: data lists and their checks, case discovery for batch inference, the demo's
volumes (phantoms, real-scan volumes, synthetic lesions, the data set writer) and the atomic
file writers everything else writes through.

May import :mod:`transforms` and :mod:`networks`; never :mod:`pipeline.workflow`,
:mod:`pipeline.export` or :mod:`pipeline.jobs`.
"""

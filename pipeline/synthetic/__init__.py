"""The demo's data makers: chest phantoms, volumes built from a real chest CT (and fetching that
CT), COVID-19-like lesions with exact voxel masks, and the demo data set writer.

May import :mod:`pipeline.data`, :mod:`transforms` and :mod:`networks`; only :mod:`pipeline.jobs`
imports it, so that training, evaluation and inference never depend on synthetic data.
"""

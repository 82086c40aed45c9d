"""The bundle's workflow parts, referenced by its configs: preprocessing chains and their
transforms, Ignite handlers, volume- and slice-level metrics, the slice rule and the score
ranking behind it, the inferer, checkpoint loading, batch-norm re-estimation, distributed
set-up, config checks and batch-inference data.

May import :mod:`pipeline.data`, :mod:`transforms` and :mod:`networks`; never
:mod:`pipeline.export` or :mod:`pipeline.jobs`.
"""

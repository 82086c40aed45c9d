"""What a run writes for people: predictions and slice-attention files, figures, the demo's
report and the accuracy study's results tables.

May import :mod:`pipeline.workflow`, :mod:`pipeline.data`, :mod:`transforms` and
:mod:`networks`; never :mod:`pipeline.jobs`.
"""

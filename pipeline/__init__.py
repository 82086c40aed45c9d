"""Glue of the COVID-19 CT pipeline, one subpackage a concern.

- :mod:`pipeline.data`: data on disk: data lists, case discovery, demo data, atomic file writing;
- :mod:`pipeline.workflow`: the bundle's parts: preprocessing chains, Ignite handlers, metrics,
  inferer, checkpoints, distributed set-up, batch-inference data;
- :mod:`pipeline.export`: what a run writes for people: predictions, slice attention, figures,
  reports, results tables;
- :mod:`pipeline.jobs`: the jobs and the command line (``python -m pipeline``).

Imports flow one way: jobs -> export -> workflow -> data -> {transforms, networks}, never back up.
"""

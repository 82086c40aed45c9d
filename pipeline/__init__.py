"""Glue of the COVID-19 CT pipeline: data, training and inference helpers, reports, command line."""

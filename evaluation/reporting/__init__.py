"""Reports over finished run folders (`python -m experiments.report`), one role per module:

common    what a run folder may hold (metrics, severity measures), the phantom marker, errors and notes
runs      finding run folders and reading them into validated RunRecords
grouping  configurations (runs that differ only in the seed) and per-case means over seeds
tables    every number as plain data: mean +- std, bootstrap CIs, gap, matrices, severity agreement
render    markdown, CSV and LaTeX tables; summary.md and report.json (atomic writes)
plots     matplotlib (Agg) figures
wandb_log one W&B run holding the tables and plots
"""

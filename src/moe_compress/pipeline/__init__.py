"""The whole experiment in one call (run.py): compress, score, distill with a watcher beside, and its report
(report.py)."""

"""Compression of experts modules into shared cores and low-rank factors: the configs, the budget, the fit of one
experts module, the report, and one engine (engine.py) that two drivers run, over a loaded model (in_memory.py) and
over a checkpoint folder read one experts module at a time (from_folder.py)."""

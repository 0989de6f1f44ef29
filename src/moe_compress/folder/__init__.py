"""The compressed folder: a Hugging Face model folder with its own model type (config.py, marking.py), loaded by a
transformers quantizer (quantizer.py); writing (save.py, shards.py), loading (load.py) and the dense export (export.py).

Importing this package must stay light: the start-up hook imports config.py and quantizer.py in every process that
imports transformers."""

"""Calibration: observing the experts' routed inputs (observe.py), their Gram statistics (grams.py), the layer-by-layer
pass of calibration tokens (layers.py) over a loaded model or over one offloaded to disk (offloaded.py), and the store
that keeps a checkpoint's statistics for reuse (store.py)."""

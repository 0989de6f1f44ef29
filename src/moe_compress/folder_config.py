"""Kept for folders written by moe-compress 0.1: their configuration_moe_compress.py shim imports CompressedConfig
from here. New folders' shims import it from moe_compress.folder.config."""

from moe_compress.folder.config import CompressedConfig

__all__ = ["CompressedConfig"]

"""Brotli (quality 11) as an artifact compressor, for the variants that name COMPRESSOR=brotli."""

import brotli

from templates.registry import COMPRESSORS, register

register(COMPRESSORS, "brotli")((lambda raw: brotli.compress(raw, quality=11), brotli.decompress))

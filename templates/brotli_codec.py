"""Brotli (quality 11) as an artifact compressor, for the variants that name COMPRESSOR=brotli."""

import brotli

from templates.registry import register_compressor

register_compressor("brotli")((lambda raw: brotli.compress(raw, quality=11), brotli.decompress))

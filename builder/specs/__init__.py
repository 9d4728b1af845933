"""Variant specs, one JSON file each."""

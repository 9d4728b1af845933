"""Bundled data of the validator (the frontier table used for significance and attribution)."""

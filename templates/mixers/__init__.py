"""Sequence mixers: attention and the state-space mixers of the variants."""

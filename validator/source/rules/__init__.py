"""Legality rules of the illegal-trick taxonomy, each a function from a RuleContext to a list of Hits.

A Hit is strong (the pattern itself breaks a rule: an error when live) or suggestive (a warning when live);
either is a note when the code is dead with the default settings. `ALL_RULES` is the order they run in.
"""

from validator.source.rules.bos import bos_leak
from validator.source.rules.calibration import calibration_on_val
from validator.source.rules.ngram import ngram_cache
from validator.source.rules.slot import slot_delta
from validator.source.rules.ttt import test_time_training
from validator.source.rules.twopass import two_pass
from validator.source.rules.valdata import val_in_training

ALL_RULES = (ngram_cache, slot_delta, test_time_training, calibration_on_val, val_in_training, bos_leak, two_pass)

__all__ = ["ALL_RULES"]

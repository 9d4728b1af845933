"""Input features added to the token embedding before the first block (hashed n-grams, ...)."""

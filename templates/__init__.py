"""The source of every assembled train_gpt.py: real, importable, tested modules, one concern each."""

"""Static analysis of a submission's source: legality rules, self-extracting wrappers, code bytes, byte tables.

Nothing here executes or imports the analysed code: scripts are read as text (capped, inside the folder only),
parsed with `ast`, and wrappers are decoded from their literals. Entry points:
`validator.source.audit.audit_source` and `validator.source.codebytes.code_bytes`.
"""

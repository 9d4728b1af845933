"""Credits: a PR number credited to an author who did not write it (checked against the bundled frontier table)."""

from __future__ import annotations

import re

from validator.checks.context import Context
from validator.findings import Finding, warning
from validator.significance import load_frontier

CREDIT = re.compile(
    r"(?:PR\s*)?#(\d{2,5})\s*\)?\s*(?:by\s+)?@([A-Za-z0-9][A-Za-z0-9-]{0,38})|@([A-Za-z0-9][A-Za-z0-9-]{0,38})\s*\(?\s*(?:PR\s*)?#(\d{2,5})"
)


def credits(text: str) -> list[tuple[int, str]]:
    """(PR number, github id) pairs written as 'PR #N @user', '#N by @user' or '@user (PR #N)'."""
    pairs = []
    for m in CREDIT.finditer(text):
        if m.group(1):
            pairs.append((int(m.group(1)), m.group(2)))
        else:
            pairs.append((int(m.group(4)), m.group(3)))
    return pairs


def check(ctx: Context) -> list[Finding]:
    known = {
        row["pr"]: row["github_id"]
        for row in load_frontier(ctx.options.frontier_file)
        if row.get("pr") and row.get("github_id")
    }
    sources: list[tuple[str, str]] = []
    if ctx.readme:
        sources.append(("README.md", ctx.readme))
    if ctx.submission is not None and ctx.submission.attribution:
        sources.append((ctx.submission.file, " ".join(ctx.submission.attribution.values())))
    out: list[Finding] = []
    seen: set[tuple[int, str]] = set()
    for file, text in sources:
        for pr, user in credits(text):
            author = known.get(pr)
            if author and author.lower() != user.lower() and (pr, user) not in seen:
                seen.add((pr, user))
                out.append(
                    warning("ATTRIBUTION_MISMATCH", f"PR #{pr} credited to @{user}; its author is @{author}", file)
                )
    return out

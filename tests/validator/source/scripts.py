"""Synthetic training-script fragments for the source-audit tests (written for these tests, not copied)."""

from validator.findings import Finding


def codes(findings: list[Finding], severity: str | None = None) -> set[str]:
    return {f.code for f in findings if severity is None or f.severity.value == severity}


HEADER = """import os
import math
import torch
import torch.nn.functional as F


class Hyperparameters:
    ngram_enabled = bool(int(os.environ.get("NGRAM_ENABLED", "{ngram}")))
    slot_enabled = bool(int(os.environ.get("SLOT_ENABLED", "{slot}")))
    ttt_enabled = bool(int(os.environ.get("TTT_ENABLED", "{ttt}")))
    ttt_epochs = int(os.environ.get("TTT_EPOCHS", "2"))
    train_files = os.path.join("data", "fineweb_train_*.bin")
    val_files = os.path.join("data", "fineweb_val_*.bin")

"""

CANONICAL_LUT = """
def build_sentencepiece_luts(sp, vocab_size, device):
    size = max(int(sp.vocab_size()), vocab_size)
    base_bytes = torch.zeros(size, dtype=torch.int16)
    has_space = torch.zeros(size, dtype=torch.bool)
    is_boundary = torch.ones(size, dtype=torch.bool)
    for token_id in range(int(sp.vocab_size())):
        if sp.is_control(token_id) or sp.is_unknown(token_id) or sp.is_unused(token_id):
            continue
        is_boundary[token_id] = False
        if sp.is_byte(token_id):
            base_bytes[token_id] = 1
            continue
        piece = sp.id_to_piece(token_id)
        if piece.startswith("\u2581"):
            has_space[token_id] = True
            piece = piece[1:]
        base_bytes[token_id] = len(piece.encode("utf-8"))
    return base_bytes, has_space, is_boundary
"""

EVAL = """
def eval_val(args, model, val_tokens, base_bytes, has_space, is_boundary, seq_len=64):
    loss_sum = torch.zeros((), dtype=torch.float64)
    byte_count = torch.zeros((), dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, val_tokens.numel() - 1, seq_len):
            chunk = val_tokens[start : start + seq_len + 1]
            x, y = chunk[:-1][None], chunk[1:][None]
            loss_sum += model(x, y).double() * y.numel()
            byte_count += (base_bytes[y] + (has_space[y] & ~is_boundary[x])).sum()
    return float(loss_sum / byte_count / math.log(2.0))
"""

TRAIN = """
def train(args, model, train_loader, opt, steps):
    for step in range(steps):
        x, y = train_loader.next_batch()
        loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
"""

MAIN = """
def main():
    args = Hyperparameters()
    model = make_model()
    val_tokens = load_tokens(args.val_files)
    train_loader = TokenLoader(args.train_files)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    luts = build_sentencepiece_luts(load_sp(), 1024, "cpu")
    train(args, model, train_loader, opt, 10)
{extra}    print(eval_val(args, model, val_tokens, *luts))


if __name__ == "__main__":
    main()
"""


def script(*parts: str, extra: str = "", ngram: str = "0", slot: str = "0", ttt: str = "0") -> str:
    """A complete small script: header, canonical LUT, eval, train, the given parts, and a main calling `extra`."""
    return (
        HEADER.format(ngram=ngram, slot=slot, ttt=ttt)
        + CANONICAL_LUT
        + EVAL
        + TRAIN
        + "".join(parts)
        + MAIN.format(extra=extra)
    )


NGRAM_CACHE = """
def ngram_eval(args, model, val_tokens):
    table = torch.zeros(1 << 20)
    loss_sum = 0.0
    for pos in range(1, val_tokens.numel() - 1):
        ctx_hash = int(val_tokens[pos - 1]) * 2654435761
        tgt = int(val_tokens[pos + 1])
        full_key = (ctx_hash ^ (tgt * 40503)) % (1 << 20)
        table[full_key] += 1
        loss_sum += -math.log((table[full_key] + 1) / (pos + 2))
    return loss_sum
"""

CONTEXT_HASH = """
def bigram_hash(input_ids, buckets=4096):
    prev = torch.nn.functional.pad(input_ids[:, :-1], (1, 0))
    return (prev * 1000003 ^ input_ids) % buckets
"""

SLOT = """
def eval_slot(args, model, val_tokens, seq_len=64):
    loss_sum = 0.0
    for start in range(0, val_tokens.numel() - 1, seq_len):
        chunk = val_tokens[start : start + seq_len + 1]
        x, y = chunk[:-1][None], chunk[1:][None]
        hidden = model.hidden(x).detach()
        delta = torch.zeros(1, 1, hidden.shape[-1], requires_grad=True)
        opt = torch.optim.AdamW([delta], lr=1e-3)
        for _ in range(3):
            loss = F.cross_entropy(model.head(hidden + delta)[0], y[0])
            loss.backward()
            opt.step()
        with torch.no_grad():
            loss_sum += F.cross_entropy(model.head(hidden + delta)[0], y[0], reduction="sum")
    return loss_sum
"""

PREQUANT_TTT = """
def ttt_adapt(args, model, tokens, seq_len=64):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for epoch in range(args.ttt_epochs):
        for start in range(0, tokens.numel() - 1, seq_len):
            chunk = tokens[start : start + seq_len + 1]
            loss = model(chunk[:-1][None], chunk[1:][None])
            loss.backward()
            opt.step()
            opt.zero_grad()
"""

SCORE_FIRST_TTT = """
def eval_val_ttt(args, model, val_tokens, chunk_tokens=256, seq_len=64):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_sum = torch.zeros((), dtype=torch.float64)
    num_chunks = (val_tokens.numel() - 1) // chunk_tokens
    for ci in range(num_chunks):
        chunk = val_tokens[ci * chunk_tokens : (ci + 1) * chunk_tokens + 1]
        with torch.inference_mode():
            for start in range(0, chunk.numel() - 1, seq_len):
                piece = chunk[start : start + seq_len + 1]
                loss_sum += model(piece[:-1][None], piece[1:][None]).double()
        if ci < num_chunks - 1:
            for epoch in range(args.ttt_epochs):
                loss = model(chunk[:-1][None], chunk[1:][None])
                loss.backward()
                opt.step()
                opt.zero_grad()
    return loss_sum
"""

UPDATE_THEN_SCORE = """
def eval_adapt_each(args, model, val_tokens, seq_len=64):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_sum = 0.0
    for start in range(0, val_tokens.numel() - 1, seq_len):
        chunk = val_tokens[start : start + seq_len + 1]
        loss = model(chunk[:-1][None], chunk[1:][None])
        loss.backward()
        opt.step()
        with torch.no_grad():
            loss_sum += model(chunk[:-1][None], chunk[1:][None]).item()
    return loss_sum
"""

GPTQ_ON_VAL = """
def collect_hessians(model, batches):
    return {name: batch.float().T @ batch.float() for name, batch in batches}


def quantize_with_val(model, val_tokens):
    hessians = collect_hessians(model, val_tokens[:8192])
    return hessians
"""

GPTQ_ON_TRAIN = """
def collect_hessians(model, batches):
    return {name: batch.float().T @ batch.float() for name, batch in batches}


def quantize_with_train(model, train_loader):
    hessians = collect_hessians(model, train_loader.next_batch())
    return hessians
"""

VAL_IN_TRAIN = """
def make_train_loader(args):
    train_pattern = args.val_files
    return TokenLoader(train_pattern)
"""

BOTH_SPLITS = """
def make_train_loader(args):
    train_pattern = "data/fineweb_*.bin"
    return TokenLoader(train_pattern)
"""

DOC_ATTENTION = """
def doc_attention(q, k, v, cu_seqlens, max_len):
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, causal=True)
"""

SMEAR_STREAM = """
def smear(x, gate):
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    return x + gate * prev
"""

SMEAR_UNMASKED = DOC_ATTENTION + SMEAR_STREAM

SMEAR_MASKED = (
    DOC_ATTENTION
    + """
def smear(x, gate, input_ids, bos_id=1):
    prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
    not_bos = (input_ids != bos_id).unsqueeze(-1)
    return x + gate * prev * not_bos
"""
)

TWO_PASS = """
def eval_two_pass(args, model, val_tokens, cache, seq_len=64):
    loss_sum = 0.0
    for start in range(0, val_tokens.numel() - 1, seq_len):
        chunk = val_tokens[start : start + seq_len + 1]
        cache.update(chunk)
        loss_sum += model(chunk[:-1][None], chunk[1:][None]).item()
    for start in range(0, val_tokens.numel() - 1, seq_len):
        chunk = val_tokens[start : start + seq_len + 1]
        loss_sum += model(chunk[:-1][None], chunk[1:][None], cache=cache).item()
    return loss_sum
"""

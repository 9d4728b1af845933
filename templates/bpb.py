"""Bits per byte, the canonical way: sentencepiece byte tables and the tokens-to-bytes conversion.

Bytes of a target token = UTF-8 length of its piece without the leading-space marker, plus one for that space
unless the previous token is a boundary (control, unknown or unused piece). Byte-fallback pieces <0xNN> are one
byte. val_bpb = (nats per token / ln 2) * (tokens / bytes).
"""

import math

import sentencepiece as spm
import torch

SPACE_MARKER = "\u2581"


def build_byte_tables(
    sp: spm.SentencePieceProcessor, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base_bytes int16, has_leading_space bool, is_boundary bool), each of length max(vocab_size, pieces)."""
    n = max(vocab_size, sp.get_piece_size())
    base_bytes = torch.zeros(n, dtype=torch.int16)
    leading_space = torch.zeros(n, dtype=torch.bool)
    boundary = torch.ones(n, dtype=torch.bool)
    for i in range(sp.get_piece_size()):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE_MARKER):
            leading_space[i] = True
            piece = piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return base_bytes.to(device), leading_space.to(device), boundary.to(device)


def target_bytes(
    prev: torch.Tensor, target: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Bytes each target token stands for, given the token before it (same shapes; int32)."""
    base_bytes, leading_space, boundary = tables
    extra = leading_space[target] & ~boundary[prev]
    return base_bytes[target].to(torch.int32) + extra.to(torch.int32)


def bits_per_byte(loss_sum_nats: float, token_count: float, byte_count: float) -> float:
    """val_bpb from summed nats over `token_count` targets that stand for `byte_count` bytes."""
    if token_count <= 0 or byte_count <= 0:
        raise ValueError("bits_per_byte needs at least one token and one byte")
    return (loss_sum_nats / token_count) / math.log(2.0) * (token_count / byte_count)

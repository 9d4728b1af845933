"""Score-first test-time training against a plain reference: chunk k is scored by the model trained on chunks
0..k-1 only, never on its own tokens; changing chunk k changes nothing before it; and adaptation helps."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from templates.config import model_config_from_env
from templates.evaluate import evaluate
from templates.model import LanguageModel
from templates.ttt import ttt_evaluate

from .conftest import use_recipe  # noqa: TID252

SEQ, CHUNK, EPOCHS, LR, MOM = 8, 2, 2, 0.05, 0.9
TABLES = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))


def _model(monkeypatch) -> LanguageModel:
    use_recipe(monkeypatch, "lru", VOCAB_SIZE=64, MODEL_DIM=16, NUM_LAYERS=1, LRU_STATE=1)
    torch.manual_seed(0)
    model = LanguageModel(model_config_from_env())
    for m in model.modules():  # zero-initialised outputs would leave the first chunks' gradients degenerate
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.05)
    return model


def _stream(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 64, (7,), generator=gen)
    return motif.repeat(20)[: 6 * SEQ + 1]  # 6 windows = 3 chunks of 2


def _ttt(model, tokens):
    return ttt_evaluate(model, tokens, TABLES, SEQ, CHUNK, EPOCHS, LR, MOM, 0, 1, torch.device("cpu"), None, True)


def _reference_scores(model: LanguageModel, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Chunk k's losses from a fresh copy trained, with its own SGD, on chunks 0..k-1 and nothing else."""
    windows = [(tokens[i * SEQ : (i + 1) * SEQ], tokens[i * SEQ + 1 : (i + 1) * SEQ + 1]) for i in range(6)]
    chunks = [windows[i : i + CHUNK] for i in range(0, 6, CHUNK)]
    out = []
    for k in range(len(chunks)):
        net = copy.deepcopy(model)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOM)
        for past in chunks[:k]:
            x, y = torch.stack([w[0] for w in past]), torch.stack([w[1] for w in past])
            for _ in range(EPOCHS):
                logits = net.logits(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
                opt.zero_grad()
                loss.backward()
                opt.step()
        x, y = torch.stack([w[0] for w in chunks[k]]), torch.stack([w[1] for w in chunks[k]])
        with torch.no_grad():
            out.append(F.cross_entropy(net.logits(x).flatten(0, 1), y.flatten(), reduction="none"))
    return out


def test_each_chunk_is_scored_by_the_model_trained_on_earlier_chunks_only(monkeypatch):
    model = _model(monkeypatch)
    tokens = _stream()
    reference = _reference_scores(model, tokens)
    _, _, kept = _ttt(copy.deepcopy(model), tokens)
    per_chunk = kept.view(3, CHUNK * SEQ)
    for k in range(3):
        assert torch.allclose(per_chunk[k], reference[k], atol=1e-5), k


def test_changing_chunk_k_changes_nothing_before_it_and_its_score_never_saw_it(monkeypatch):
    model = _model(monkeypatch)
    tokens = _stream()
    other = tokens.clone()
    other[2 * CHUNK * SEQ + 1 :] = (other[2 * CHUNK * SEQ + 1 :] + 5) % 64  # chunk 2's targets differ
    _, _, a = _ttt(copy.deepcopy(model), tokens)
    _, _, b = _ttt(copy.deepcopy(model), other)
    split = 2 * CHUNK * SEQ
    assert torch.equal(a[:split], b[:split])
    assert not torch.allclose(a[split:], b[split:])
    assert torch.allclose(b.view(3, -1)[2], _reference_scores(model, other)[2], atol=1e-5)


def test_adaptation_lowers_the_loss_on_a_repetitive_stream(monkeypatch):
    model = _model(monkeypatch)
    tokens = _stream(seed=3)
    plain, _, _ = evaluate(copy.deepcopy(model), tokens, TABLES, SEQ, CHUNK, 0, 1, torch.device("cpu"), None)
    adapted, bpb, _ = _ttt(copy.deepcopy(model), tokens)
    assert adapted < plain and bpb > 0


def test_ttt_stage_is_called_like_evaluate_and_reads_its_knobs(monkeypatch):
    from templates.registry import STAGES

    model = _model(monkeypatch)
    monkeypatch.setenv("TTT_EPOCHS", str(EPOCHS))
    monkeypatch.setenv("TTT_LR", str(LR))
    monkeypatch.setenv("TTT_MOMENTUM", str(MOM))
    tokens = _stream()
    args = (tokens, TABLES, SEQ, CHUNK, 0, 1, torch.device("cpu"), None)
    staged = STAGES["ttt"](copy.deepcopy(model), *args, stateful=False, keep_losses=True)
    direct = _ttt(copy.deepcopy(model), tokens)
    assert staged[0] == direct[0] and torch.equal(staged[2], direct[2])

"""Stateful scoring with several streams (the ttsm and lru recipes: EVAL_MODE=stateful, EVAL_BATCH_SEQS=32): each
stream is a contiguous run of windows carried through the recurrent state, the windows left over at the end are
scored on their own, and every target token is scored exactly once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from templates.evaluate import evaluate

from .conftest import build_model, use_recipe, wake_zero_weights  # noqa: TID252

TINY = dict(
    VOCAB_SIZE=64, MODEL_DIM=32, NUM_LAYERS=2, SSM_STATE=8, BIGRAM_BUCKETS=31, TRIGRAM_BUCKETS=64, BIGRAM_DIM=4,
    TRIGRAM_DIM=4,
)  # fmt: skip
SEQ_LEN, WINDOWS, STREAMS = 8, 10, 3  # 3 streams of 3 windows, then 1 window left over


@pytest.mark.parametrize("variant", ["ttsm", "lru"])
def test_several_streams_score_contiguous_runs_with_state_and_the_leftover_cold(monkeypatch, variant):
    use_recipe(monkeypatch, variant, **TINY)
    model = build_model().eval()
    wake_zero_weights(model, 0.3)
    with torch.no_grad():
        model.tok_emb.weight.normal_(0, 0.5)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (WINDOWS * SEQ_LEN + 1,), generator=gen, dtype=torch.int32)
    tables = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    cpu = torch.device("cpu")

    loss, _, kept = evaluate(model, tokens, tables, SEQ_LEN, STREAMS, 0, 1, cpu, None, stateful=True, keep_losses=True)

    # independently: stream s is windows [3s, 3s + 3) seen as one pass (the carried state = one long window)
    per_stream = WINDOWS // STREAMS
    ids = tokens.long()
    expected = []
    with torch.no_grad():
        for s in range(STREAMS):
            run = ids[s * per_stream * SEQ_LEN : (s + 1) * per_stream * SEQ_LEN + 1]
            logits = model.logits(run[None, :-1])
            expected.append(F.cross_entropy(logits[0].float(), run[1:], reduction="none"))
        for w in range(STREAMS * per_stream, WINDOWS):  # the leftover window: on its own, no state
            x, y = ids[w * SEQ_LEN : (w + 1) * SEQ_LEN][None], ids[w * SEQ_LEN + 1 : (w + 1) * SEQ_LEN + 1][None]
            expected.append(model(x, y, reduction="none")[0].float())
        cold = model(ids[:-1].view(WINDOWS, SEQ_LEN), ids[1:].view(WINDOWS, SEQ_LEN), reduction="none").flatten()
    expected = torch.cat(expected)

    assert kept.shape == (WINDOWS * SEQ_LEN,) and (kept > 0).all()  # every target scored (a loss is never 0 here)
    torch.testing.assert_close(kept, expected, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(expected.double().mean().item(), rel=1e-5)
    # the test can see the state: carried windows differ from cold ones, the leftover window equals its cold score
    assert (kept[SEQ_LEN : per_stream * SEQ_LEN] - cold[SEQ_LEN : per_stream * SEQ_LEN]).abs().max() > 1e-3
    torch.testing.assert_close(kept[-SEQ_LEN:], cold[-SEQ_LEN:], rtol=1e-4, atol=1e-5)

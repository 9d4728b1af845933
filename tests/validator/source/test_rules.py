"""Each taxonomy rule on synthetic scripts: flagged when live, a note behind a default-off flag, silent when legal."""

from __future__ import annotations

import pytest
from source_audit_scripts import (
    BOTH_SPLITS,
    CONTEXT_HASH,
    GPTQ_ON_TRAIN,
    GPTQ_ON_VAL,
    NGRAM_CACHE,
    PREQUANT_TTT,
    SCORE_FIRST_TTT,
    SLOT,
    SMEAR_MASKED,
    SMEAR_STREAM,
    SMEAR_UNMASKED,
    TWO_PASS,
    UPDATE_THEN_SCORE,
    VAL_IN_TRAIN,
    codes,
    script,
)

from validator.source.audit import audit_source


def audit(make_folder, text: str, **kwargs):
    folder = make_folder({"train_gpt.py": text})
    return audit_source(folder, folder / "train_gpt.py", **kwargs)


def test_clean_script_has_no_error_or_warning(make_folder):
    findings = audit(make_folder, script())
    assert codes(findings, "error") == set() and codes(findings, "warning") == set()


# (fragment, call in main, expected code, severity when live)
LIVE_CASES = [
    (NGRAM_CACHE, "    ngram_eval(args, model, val_tokens)\n", "NGRAM_HASH_KEYED_ON_TARGET", "error"),
    (SLOT, "    eval_slot(args, model, val_tokens)\n", "SLOT_DELTA_ON_SCORED_TARGETS", "error"),
    (PREQUANT_TTT, "    ttt_adapt(args, model, val_tokens)\n", "TTT_TRAIN_THEN_SCORE", "error"),
    (UPDATE_THEN_SCORE, "    eval_adapt_each(args, model, val_tokens)\n", "TTT_UPDATE_BEFORE_SCORE", "error"),
    (GPTQ_ON_VAL, "    quantize_with_val(model, val_tokens)\n", "CALIBRATION_ON_VAL", "error"),
    (VAL_IN_TRAIN, "    make_train_loader(args)\n", "VAL_IN_TRAINING_DATA", "error"),
    (BOTH_SPLITS, "    make_train_loader(args)\n", "VAL_IN_TRAINING_DATA", "error"),
    (SMEAR_UNMASKED, "    smear(model, 0.5)\n", "BOS_LEAK_TOKEN_SHIFT", "error"),
    (TWO_PASS, "    eval_two_pass(args, model, val_tokens, {})\n", "TWO_PASS_RESCORE", "error"),
]


CASE_IDS = [f"{case[2]}-{index}" for index, case in enumerate(LIVE_CASES)]


@pytest.mark.parametrize("fragment,call,code,severity", LIVE_CASES, ids=CASE_IDS)
def test_rule_flags_live_code(make_folder, fragment, call, code, severity):
    findings = audit(make_folder, script(fragment, extra=call))
    hits = [f for f in findings if f.code == code]
    assert hits, f"{code} not found in {[f.code for f in findings]}"
    assert hits[0].severity.value == severity
    assert hits[0].file == "train_gpt.py" and isinstance(hits[0].line, int)


FLAGS = {
    "NGRAM_HASH_KEYED_ON_TARGET": ("args.ngram_enabled", "NGRAM_ENABLED"),
    "SLOT_DELTA_ON_SCORED_TARGETS": ("args.slot_enabled", "SLOT_ENABLED"),
    "TTT_TRAIN_THEN_SCORE": ("args.ttt_enabled", "TTT_ENABLED"),
}


@pytest.mark.parametrize("code", sorted(FLAGS))
def test_rule_behind_default_off_flag_is_a_note(make_folder, code):
    fragment, call = next((c[0], c[1]) for c in LIVE_CASES if c[2] == code)
    condition, env_name = FLAGS[code]
    guarded = f"    if {condition}:\n    " + call
    findings = audit(make_folder, script(fragment, extra=guarded))
    hits = [f for f in findings if f.code == code]
    assert hits and all(f.severity.value == "note" for f in hits)
    assert env_name in hits[0].message
    # the same script with the flag turned on (default "1", or an override) is an error again
    assert any(f.code == code and f.severity.value == "error" for f in audit_flag_on(make_folder, fragment, guarded))
    overridden = audit(make_folder, script(fragment, extra=guarded), env={env_name: "1"})
    assert any(f.code == code and f.severity.value == "error" for f in overridden)


def audit_flag_on(make_folder, fragment, guarded):
    return audit(make_folder, script(fragment, extra=guarded, ngram="1", slot="1", ttt="1"))


def test_env_helper_and_early_return_guards_are_understood(make_folder):
    helper = """
def env_flag(name, default="0"):
    return bool(int(os.environ.get(name, default)))


def maybe_ngram(args, model, val_tokens):
    if not env_flag("USE_CACHE"):
        return None
    return ngram_eval(args, model, val_tokens)
"""
    findings = audit(make_folder, script(NGRAM_CACHE, helper, extra="    maybe_ngram(args, model, val_tokens)\n"))
    hits = [f for f in findings if f.code == "NGRAM_HASH_KEYED_ON_TARGET"]
    assert hits and hits[0].severity.value == "note" and "USE_CACHE" in hits[0].message


def test_never_called_function_is_a_note(make_folder):
    findings = audit(make_folder, script(NGRAM_CACHE))
    hits = [f for f in findings if f.code == "NGRAM_HASH_KEYED_ON_TARGET"]
    assert hits and hits[0].severity.value == "note" and "never reached" in hits[0].message


def test_context_only_hash_is_not_flagged(make_folder):
    findings = audit(make_folder, script(CONTEXT_HASH, extra="    bigram_hash(val_tokens[None])\n"))
    assert "NGRAM_HASH_KEYED_ON_TARGET" not in codes(findings)


def test_score_first_ttt_is_legal(make_folder):
    findings = audit(make_folder, script(SCORE_FIRST_TTT, extra="    eval_val_ttt(args, model, val_tokens)\n"))
    assert codes(findings, "error") == set() and codes(findings, "warning") == set()
    assert "TTT_SCORE_FIRST" in codes(findings, "note")


def test_score_first_through_a_helper_function_is_legal(make_folder):
    helper = """
def adapt_on(model, opt, chunk):
    loss = model(chunk[:-1][None], chunk[1:][None])
    loss.backward()
    opt.step()


def eval_phased(args, model, val_tokens, chunk_tokens=256):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_sum = 0.0
    for ci in range(4):
        chunk = val_tokens[ci * chunk_tokens : (ci + 1) * chunk_tokens + 1]
        with torch.no_grad():
            loss_sum += model(chunk[:-1][None], chunk[1:][None]).item()
        adapt_on(model, opt, chunk)
    return loss_sum
"""
    findings = audit(make_folder, script(helper, extra="    eval_phased(args, model, val_tokens)\n"))
    assert codes(findings, "error") == set()


def test_calibration_on_training_data_is_legal(make_folder):
    findings = audit(make_folder, script(GPTQ_ON_TRAIN, extra="    quantize_with_train(model, train_loader)\n"))
    assert "CALIBRATION_ON_VAL" not in codes(findings)


def test_masked_token_shift_is_legal(make_folder):
    findings = audit(make_folder, script(SMEAR_MASKED, extra="    smear(model, 0.5, val_tokens)\n"))
    assert "BOS_LEAK_TOKEN_SHIFT" not in codes(findings)


def test_token_shift_in_a_continuous_stream_is_not_flagged(make_folder):
    findings = audit(make_folder, script(SMEAR_STREAM, extra="    smear(model, 0.5)\n"))
    assert "BOS_LEAK_TOKEN_SHIFT" not in codes(findings)


def test_training_loop_with_periodic_validation_is_legal(make_folder):
    loop = """
def train_with_val(args, model, train_loader, val_tokens, opt, luts):
    for step in range(100):
        x, y = train_loader.next_batch()
        loss = model(x, y)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            val_loss = eval_val(args, model, val_tokens, *luts)
"""
    call = "    train_with_val(args, model, train_loader, val_tokens, opt, luts)\n"
    findings = audit(make_folder, script(loop, extra=call))
    assert codes(findings, "error") == set()

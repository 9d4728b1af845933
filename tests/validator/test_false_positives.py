"""False errors found on merged upstream records (issue 13, item 4), each fixed at its mechanism and pinned here by a
synthetic folder of the same shape."""

from __future__ import annotations

import json

from validator.checks import run_checks
from validator.checks.context import CheckOptions, load_context
from validator.findings import Severity
from validator.logs import parse_log
from validator.source.audit import audit_source

from .conftest import CLEAN_SCRIPT, loss_for


def _run(folder, **options):
    ctx = load_context(folder, CheckOptions(**options))
    return ctx, run_checks(ctx)


def _errors(findings) -> set[str]:
    return {f.code for f in findings if f.severity is Severity.ERROR}


def _codes(findings) -> dict:
    out: dict = {}
    for f in findings:
        out.setdefault(f.code, []).append(f)
    return out


def _edit_json(folder, **changes):
    path = folder / "submission.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return data


# -- score lines -------------------------------------------------------------------------------------------------


def test_score_tag_suffix_is_a_qualifier_not_part_of_the_tag(make_submission):
    seeds = {42: 1.16, 1337: 1.161, 2024: 1.162}
    sliding = {s: b - 0.03 for s, b in seeds.items()}
    folder = make_submission(seeds=seeds)
    for seed, bpb in sliding.items():
        log = folder / f"train_seed{seed}.log"
        extra = (
            f"final_sliding_window_eval stride:64 val_loss:{loss_for(bpb):.4f} val_bpb:{bpb:.4f} eval_time:72650ms\n"
            f"final_sliding_window_eval_exact stride:64 val_loss:{loss_for(bpb):.8f} val_bpb:{bpb:.8f}\n"
        )
        log.write_text(log.read_text().replace("result_json", extra + "result_json"))
    mean = sum(sliding.values()) / 3
    results = {str(s): {"val_bpb": b} for s, b in sliding.items()}
    _edit_json(folder, val_bpb=round(mean, 8), seed_results=results, val_loss=None)
    ctx, findings = _run(folder)
    score = ctx.runs[0].log.score
    assert score.tag == "final_sliding_window_eval_exact" and "stride:64" in score.rest
    assert ctx.runs[0].log.eval_time_ms == 72650.0  # from its 4-dp twin
    assert not _errors(findings) & {"JSON_VAL_BPB_MISMATCH", "SEED_BPB_MISMATCH"}


def test_mean_val_bpb_key_is_read_as_the_claim(make_submission):
    folder = make_submission()
    data = json.loads((folder / "submission.json").read_text())
    _edit_json(folder, val_bpb=None, mean_val_bpb=data["val_bpb"])
    _, findings = _run(folder)
    assert "JSON_NO_VAL_BPB" not in _errors(findings)
    assert "mean_val_bpb" in _codes(findings)["JSON_CLAIM_SPELLING"][0].message


def test_failed_later_pass_does_not_outrank_the_claimed_line(make_submission):
    folder = make_submission()
    log = folder / "train_seed42.log"
    failed = f"final_int6_ttt val_loss:{loss_for(1.336):.8f} val_bpb:1.33603200 eval_time:1000ms\n"
    log.write_text(log.read_text().replace("result_json", failed + "result_json"))
    assert parse_log(log.read_text()).priority_score.tag == "final_int6_ttt"  # the pick by priority alone
    ctx, findings = _run(folder)
    assert ctx.runs[0].log.score.tag == "final_int8_zlib_roundtrip_exact"
    assert not _errors(findings) & {"SEED_BPB_MISMATCH", "JSON_VAL_BPB_MISMATCH", "NOT_A_RECORD"}
    assert "final_int6_ttt" in _codes(findings)["SCORE_LINE_CLAIMED"][0].message


# -- BOS leak ----------------------------------------------------------------------------------------------------

SMEAR_MODEL = """
import os

import torch


class Hyperparameters:
    smear_gate_enabled = bool(int(os.environ.get("SMEAR_GATE_ENABLED", "{default}")))


class GPT(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.smear_gate_enabled = h.smear_gate_enabled

    def forward(self, input_ids, cu_seqlens=None):
        return self.blocks(input_ids, cu_seqlens=cu_seqlens)

    def forward_ttt(self, input_ids, lora):
        x = self.emb(input_ids)
        if self.smear_gate_enabled:
            x = torch.cat([x[:, :1], x[:, 1:] + x[:, :-1]], dim=1)
        return x


def {caller}(model, all_tokens, batch, forward_ttt_train):
{body}


def main():
    model = GPT(Hyperparameters())
    fwd = torch.compile(lambda ids, lora: model.forward_ttt(ids, lora))
    {caller}(model, None, [], forward_ttt_train=fwd)


if __name__ == "__main__":
    main()
"""
PER_DOC = """    for b in range(len(batch)):
        doc_start, doc_len = batch[b]
        x = all_tokens[doc_start : doc_start + doc_len][None]
        forward_ttt_train(x, lora=None)"""
PACKED = """    for start in range(0, all_tokens.numel(), 2048):
        x = all_tokens[start : start + 2048][None]
        forward_ttt_train(x, lora=None)"""


def _bos(tmp_path, default: str, body: str, env=None):
    text = SMEAR_MODEL.format(default=default, caller="eval_ttt", body=body)
    folder = tmp_path / f"bos_{default}_{len(body)}_{bool(env)}"
    folder.mkdir()
    (folder / "train_gpt.py").write_text(text)
    return [f for f in audit_source(folder, folder / "train_gpt.py", env=env) if f.code == "BOS_LEAK_TOKEN_SHIFT"]


def test_bos_shift_behind_a_default_off_flag_copied_to_self_is_dead_code(tmp_path):
    hits = _bos(tmp_path, "0", PACKED)
    assert hits and all(h.severity is Severity.NOTE for h in hits)
    live = _bos(tmp_path, "0", PACKED, env={"SMEAR_GATE_ENABLED": "1"})  # a log that echoes it on
    assert live and live[0].severity is Severity.ERROR


def test_bos_shift_on_rows_of_one_document_each_is_not_a_leak(tmp_path):
    assert _bos(tmp_path, "1", PER_DOC) == []
    packed = _bos(tmp_path, "1", PACKED)
    assert packed and packed[0].severity is Severity.ERROR  # packed rows still leak


def test_logs_echoing_a_switch_on_make_its_code_live(make_submission):
    text = SMEAR_MODEL.format(default="0", caller="eval_ttt", body=PACKED)
    folder = make_submission(script=text, log_kwargs={"hparams": {"smear_gate_enabled": "True"}})
    _, findings = _run(folder)
    assert "BOS_LEAK_TOKEN_SHIFT" in _errors(findings)


# -- legality flags ----------------------------------------------------------------------------------------------


def test_family_switch_off_outranks_its_other_settings(make_submission):
    off = {"prequant_ttt_enabled": "False", "prequant_ttt_compile": "True"}
    _, findings = _run(make_submission(log_kwargs={"hparams": off}))
    assert "PREQUANT_TTT_ENABLED" not in _errors(findings)
    on = {"prequant_ttt_enabled": "True", "prequant_ttt_compile": "True"}
    _, findings = _run(make_submission(log_kwargs={"hparams": on}))
    assert "PREQUANT_TTT_ENABLED" in _errors(findings)


# -- embedded source ---------------------------------------------------------------------------------------------

DOCSTRING_SCRIPT = '''"""
A Title
=========================================
Notes under a docstring underline.
"""

import os


def main():
    print(os.environ.get("SEED", "1"))
'''


def test_docstring_underline_does_not_end_the_embedded_source(make_submission):
    folder = make_submission(script=DOCSTRING_SCRIPT, log_kwargs={"embedded_source": DOCSTRING_SCRIPT})
    ctx, findings = _run(folder)
    assert ctx.runs[0].log.embedded_source.strip() == DOCSTRING_SCRIPT.strip()
    assert "EMBEDDED_SOURCE_DIFFERS" not in _codes(findings)


def test_one_unused_line_is_a_warning_with_the_diff(make_submission):
    logged = CLEAN_SCRIPT.replace("import torch\n", 'import torch\n\nRESUME_FROM = os.environ.get("RESUME_FROM", "")\n')
    folder = make_submission(log_kwargs={"embedded_source": logged})
    _, findings = _run(folder)
    hits = _codes(findings)["EMBEDDED_SOURCE_DIFFERS"]
    assert {h.severity for h in hits} == {Severity.WARNING}
    assert "RESUME_FROM" in hits[0].message and "nothing reads" in hits[0].message
    used = logged.replace('print(f"seed:{seed}")', 'print(f"seed:{seed}", RESUME_FROM)')
    _, findings = _run(make_submission(log_kwargs={"embedded_source": used}))
    assert "EMBEDDED_SOURCE_DIFFERS" in _errors(findings)


def test_embedded_source_is_compared_with_the_script_that_wrote_it(make_submission):
    other = CLEAN_SCRIPT.replace("Synthetic training script", "Second experiment's script")
    folder = make_submission(log_kwargs={"embedded_source": other})
    (folder / "train_other.py").write_text(other)
    _, findings = _run(folder)
    assert "EMBEDDED_SOURCE_DIFFERS" not in _codes(findings)


def test_seeds_are_paired_within_the_claimed_experiment(make_submission):
    from .conftest import make_log

    folder = make_submission()
    code = len(CLEAN_SCRIPT.encode())
    sub = folder / "logs_experiment"
    sub.mkdir()
    for seed, bpb in ((42, 1.40), (1337, 1.41)):  # another experiment, same seeds, other figures
        (sub / f"ablation_seq16384_seed{seed}.txt").write_text(make_log(seed, bpb, code_bytes=code))
    ctx, findings = _run(folder)
    assert not _errors(findings), _errors(findings)
    assert {r.rel for r in ctx.scored_runs} == {"train_seed42.log", "train_seed1337.log", "train_seed2024.log"}
    for log in folder.glob("train_seed*.log"):  # only the subfolder experiment left: it holds no claimed figure
        log.rename(folder / "ignored.bin")
    _, findings = _run(folder)
    assert "SEED_BPB_MISMATCH" in _errors(findings)


def test_artifact_mb_line_is_a_size_line(make_submission):
    folder = make_submission()
    for log in folder.glob("train_seed*.log"):
        kept = [
            x for x in log.read_text().splitlines() if not x.startswith(("Total submission", "Serialized", "result"))
        ]
        log.write_text("\n".join([*kept, "artifact:15.92MB ternary:64880640(14239486B) code:70853"]) + "\n")
    _, findings = _run(folder)
    assert "NO_SIZE_LINE" not in _codes(findings)


def test_eval_only_claim_keeps_the_training_logs_of_its_seeds(make_submission):
    from .conftest import make_log

    folder = make_submission(log_kwargs={"train_ms": 601_500.0, "stopped": False})  # training over the cap
    data = json.loads((folder / "submission.json").read_text())
    sub = folder / "rescore"
    sub.mkdir()
    for seed, claim in data["seed_results"].items():
        text = "TTT_EVAL_ONLY=1 skipping training, loading saved artifact\n" + make_log(
            int(seed), claim["val_bpb"] - 0.001, code_bytes=len(CLEAN_SCRIPT.encode())
        )
        lines = [x for x in text.splitlines() if not x.startswith(("step:", "stopping_early"))]
        (sub / f"seed_{seed}.log").write_text("\n".join(lines) + "\n")
        claim["val_bpb"] -= 0.001
    data["val_bpb"] = round(sum(c["val_bpb"] for c in data["seed_results"].values()) / 3, 8)
    (folder / "submission.json").write_text(json.dumps(data))
    ctx, findings = _run(folder)
    assert ctx.claimed_rels is None or "train_seed42.log" in ctx.claimed_rels
    assert "TRAIN_TIME_OVER_LIMIT" in _errors(findings)

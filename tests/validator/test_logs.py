"""The log grammar: score tags and priority, size/time lines, echo, fingerprints, prefixes, embedded source."""

from __future__ import annotations

from validator.logs import parse_log


def test_score_priority_prefers_ttt_over_sliding_over_roundtrip():
    text = "\n".join(
        [
            "final_int8_zlib_roundtrip_exact val_loss:2.1 val_bpb:1.20000000",
            "quantized_sliding_window val_loss:2.0 val_bpb:1.10000000 eval_time:1000ms",
            "diagnostic quantized val_loss:1.0 val_bpb:0.50000000 eval_time:5ms",
            "quantized_ttt_phased val_loss:1.9 val_bpb:1.05000000 eval_time:500000ms",
        ]
    )
    log = parse_log(text)
    assert log.score.tag == "quantized_ttt_phased"
    assert log.score.val_bpb == 1.05
    assert log.eval_time_ms == 500000
    assert any(s.diagnostic for s in log.scores)


def test_exact_twin_carries_timer_and_compat_alias_is_outranked():
    text = "\n".join(
        [
            "final_int6_sliding_window val_loss:1.9 val_bpb:1.1500 stride:64 eval_time:70000ms",
            "final_int6_sliding_window_exact val_loss:1.90000000 val_bpb:1.15000000",
            "final_int8_zlib_roundtrip val_loss:1.9 val_bpb:1.1500 eval_time:71000ms",
            "final_int8_zlib_roundtrip_exact val_loss:1.90000000 val_bpb:1.15000001",
        ]
    )
    log = parse_log(text)
    assert log.score.tag == "final_int6_sliding_window_exact"
    assert log.eval_time_ms == 70000


def test_equals_style_and_sliding_variant_tags():
    log = parse_log("ttt_sliding:done val_loss=1.9 val_bpb=1.1 elapsed=120.5s\n")
    assert log.score.tag == "ttt_sliding:done" and log.eval_time_ms == 120500
    log = parse_log("final_int8_zlib_roundtrip sliding val_loss:2.0 sliding val_bpb:1.18\n")
    assert log.score.tag == "final_int8_zlib_roundtrip sliding" and log.score.val_bpb == 1.18


def test_in_training_val_lines_are_not_scores():
    text = (
        "step:1000/20000 val_loss:2.3 val_bpb:1.38 train_time:43898ms step_avg:43.90ms\n"
        "4000/20000 val_loss: 2.87 val_bpb: 1.11\n"
    )
    log = parse_log(text)
    assert log.scores == [] and log.score is None
    assert [p[0] for p in log.val_points] == [1000, 4000]
    assert not log.complete


def test_sizes_times_and_gptq():
    text = "\n".join(
        [
            "gptq:reserving 8.0s, effective=592000ms",
            "stopping_early: wallclock_cap train_time: 592054ms step: 4942/20000",
            "Serialized model: 135417533 bytes",
            "Code size (uncompressed): 157868 bytes",
            "Code size (compressed): 31999 bytes",
            "GPTQ:collected 67 Hessians in 3.5s",
            "Serialized model quantized+pergroup: 15865260 bytes",
            "Total submission size quantized+pergroup: 15897259 bytes",
            "serialize_wallclock: 81.816s",
            "artifact_production_wallclock: 1121.067s (must be < 600.0)",
            "ttt_lora:compile warmup done (153.3s)",
            "quantized_ttt_phased val_loss:2.3 val_bpb:1.06 eval_time:525512ms",
            "total_eval_time:525.5s",
        ]
    )
    log = parse_log(text)
    assert (log.train_time_ms, log.stop_step, log.total_steps) == (592054, 4942, 20000)
    assert log.gptq_reserve_s == 8.0 and log.gptq_effective_ms == 592000
    assert log.hessian_s == 3.5 and not log.gptq_self_generated
    assert (log.code_bytes_raw, log.code_bytes_compressed, log.bytes_code) == (157868, 31999, 31999)
    assert (log.bytes_model_raw, log.bytes_model, log.model_format) == (135417533, 15865260, "quantized+pergroup")
    assert (log.bytes_total, log.total_format) == (15897259, "quantized+pergroup")
    assert log.serialize_wallclock_s == 81.816 and log.artifact_wallclock_s == 1121.067
    assert log.compile_warmup_s == 153.3 and log.total_eval_time_s == 525.5
    assert log.complete


def test_raw_total_label_reused_for_the_artifact():
    log = parse_log("Total submission size: 15000000 bytes\nfinal_ternary_roundtrip_exact val_loss:2 val_bpb:1.2\n")
    assert log.bytes_total == 15000000 and log.score.tag == "final_ternary_roundtrip_exact"


def test_timestamp_prefix_and_new_step_format():
    text = "\n".join(
        [
            "1776143349.100 seed:7",
            "1776143349.200 500/20000 train_loss: 3.2523 train_time: 0.8m tok/s: 8203641",
            "1776143349.278 stopping_early: wallclock_cap train_time:598686ms",
            "1776143349.300 quantized_ttt val_loss:2.79 val_bpb:1.08 eval_time:366525ms",
        ]
    )
    log = parse_log(text)
    assert log.seed == 7
    assert log.steps == [(500, 3.2523, 48000.0)]
    assert log.train_time_ms == 598686 and log.stopped_early
    assert log.score.val_bpb == 1.08


def test_hparam_block_inline_echo_and_fingerprints():
    text = "\n".join(
        [
            "val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path=./data/tokenizers/fineweb_1024_bpe.model",
            "train_loader:dataset:fineweb10B_sp1024 train_shards:80",
            "val_loader:shards pattern=./data/x/fineweb_val_*.bin tokens:62021632",
            "Hyperparameters:",
            "  seed: 42",
            "  run_id: abc",
            "  num_layers: 11",
            "world_size:8 grad_accum_steps:1",
            "step:1/20000 train_loss:6.9 train_time:24ms step_avg:23.88ms",
            "layer_loop:enabled step:2018 frac:0.350",
        ]
    )
    log = parse_log(text)
    assert log.seed == 42
    assert log.hparams["num_layers"] == "11"
    assert log.echo["world_size"] == "8" and "layer_loop" not in log.echo
    assert "seed" not in log.config and "run_id" not in log.config and log.config["num_layers"] == "11"
    assert (log.train_shards, log.val_tokens) == (80, 62021632)
    assert log.tokenizer_path.endswith("fineweb_1024_bpe.model")


def test_embedded_source_is_split_off_and_not_parsed():
    source = (
        'import os\nlog0(f"final_int8_zlib_roundtrip_exact val_loss:{a} val_bpb:{b}")\nprint("Code size: 1 bytes")\n'
    )
    text = source + "=" * 100 + "\nRunning Python 3.12.3\nCode size: 5000 bytes\n"
    log = parse_log(text)
    assert log.embedded_source == source.rstrip("\n")
    assert log.code_bytes_raw == 5000 and log.python_version == "3.12.3"
    assert log.scores == []


def test_result_json_fills_missing_figures_and_bad_json_is_ignored():
    log = parse_log('result_json {"seed": 3, "bytes_total": 123, "train_time_ms": 5}\nresult_json {broken\n')
    assert (log.seed, log.bytes_total, log.train_time_ms) == (3, 123, 5.0)


def test_truncated_log_keeps_what_it_has():
    full = "seed:1\nstep:1/10 train_loss:5.0 train_time:10ms step_avg:10ms\nCode size: 100 bytes\nTotal submissi"
    log = parse_log(full)
    assert log.seed == 1 and log.bytes_code == 100 and log.bytes_total is None and not log.complete

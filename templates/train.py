"""Training and scoring, top to bottom: set up ranks and logging, read the data, build the model from its
declaration, train under the wall-clock cap, write the artifact, read it back and score it.

  torchrun --standalone --nproc_per_node=8 train_gpt.py     CUDA; the rank count must divide 8
  python train_gpt.py                                       one process (CPU works, with tiny settings)
  EVAL_ONLY=1 ARTIFACT=final_model.int8.ptz python train_gpt.py     score an artifact, no training
  TOKEN_LOSSES=losses.npz                                   also save the scored tokens and each one's loss
"""

import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from templates.bpb import build_byte_tables
from templates.config import model_config_from_env
from templates.data import BatchLoader, ShardError, find_shards, load_validation_tokens
from templates.evaluate import evaluate, gather_token_losses
from templates.export import (
    ArtifactError,
    choose_quantisers,
    encode_state,
    payload_bytes,
    read_artifact,
    write_artifact,
)
from templates.hparams import Hyperparameters
from templates.model import LanguageModel
from templates.optim import Muon, WeightAverage, lr_scale, momentum_at, past_cap, split_parameters
from templates.registry import STAGES


def main() -> None:
    hp = Hyperparameters()
    started_at = time.perf_counter()  # start-up, compilation and export times are logged against this
    cfg = model_config_from_env()
    code = Path(__file__).read_bytes()

    # ----- ranks, device, logging -----
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    distributed = "RANK" in os.environ and world_size > 1
    if 8 % world_size:
        raise SystemExit(f"WORLD_SIZE={world_size}: the rank count must divide 8")
    accum_steps = hp.grad_accum_steps or 8 // world_size
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    master = rank == 0
    amp_dtype = torch.bfloat16 if cuda else None
    compiled = hp.compile and cuda

    log_file = Path("logs") / f"{hp.run_id}.txt"
    if master:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(code.decode("utf-8", errors="replace") + "\n" + "=" * 100 + "\n", encoding="utf-8")

    def log(line: str, console: bool = True) -> None:
        if master:
            if console:
                print(line, flush=True)
            with log_file.open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    wait_for_device = torch.cuda.synchronize if cuda else lambda: None

    log(f"Running Python {sys.version} PyTorch {torch.__version__}", console=False)
    if cuda:
        log(f"device:{torch.cuda.get_device_name(device)} count:{torch.cuda.device_count()}", console=False)
    log("Hyperparameters:")
    for name, value in sorted(vars(hp).items()):
        log(f"  {name}: {value}")
    log(f"model: {cfg}")
    log(f"seed:{hp.seed}")
    log(f"world_size:{world_size} grad_accum_steps:{accum_steps}")
    torch.manual_seed(hp.seed)  # the only generator the run draws from

    # ----- data: every shard checked before anything else -----
    try:
        train_files = [] if hp.eval_only else find_shards(hp.data_path, "train")
        val_files = find_shards(hp.data_path, "val")
    except ShardError as exc:
        raise SystemExit(f"error: {exc}") from None
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    if sp.get_piece_size() != cfg.vocab_size:
        raise SystemExit(f"{hp.tokenizer_path}: {sp.get_piece_size()} pieces, but VOCAB_SIZE={cfg.vocab_size}")
    tables = build_byte_tables(sp, cfg.vocab_size, device)
    eval_seq_len = hp.eval_seq_len or hp.train_seq_len
    if hp.eval_mode not in ("windows", "stateful") + (("ttt",) if "ttt" in STAGES else ()):
        raise SystemExit(f"EVAL_MODE={hp.eval_mode!r}: choose windows or stateful (ttt: a variant with the TTT module)")
    eval_batch_seqs = hp.eval_batch_seqs or max(1, hp.val_batch_size // (world_size * eval_seq_len))
    val_tokens = load_validation_tokens(val_files, eval_seq_len, hp.val_tokens)
    log(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log(f"val_loader:shards pattern={hp.data_path}/fineweb_val_*.bin tokens:{val_tokens.numel() - 1}")

    def validate(net: torch.nn.Module, keep: bool = False, score=evaluate) -> tuple[float, float, torch.Tensor | None]:
        return score(
            net, val_tokens, tables, eval_seq_len, eval_batch_seqs, rank, world_size, device, amp_dtype,
            stateful=hp.eval_mode == "stateful", keep_losses=keep,
        )  # fmt: skip

    # ----- model -----
    base = LanguageModel(cfg).to(device)
    log(f"model_params:{sum(p.numel() for p in base.parameters())}")
    if compiled and hp.compile_scope == "blocks":  # one block graph reused by every block: deep stacks compile fast
        for block in base.blocks:
            block.compile(dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode)
    whole = compiled and hp.compile_scope == "model"
    model = torch.compile(base, dynamic=False, fullgraph=hp.compile_fullgraph, mode=hp.compile_mode) if whole else base

    steps, train_ms, pre_quant_bpb = 0, 0.0, None
    artifact = Path(hp.artifact if hp.eval_only else hp.artifact_name)
    if hp.eval_only:
        if not artifact.is_file():
            raise SystemExit(f"EVAL_ONLY=1 needs ARTIFACT=<file> of an existing artifact, got {str(artifact)!r}")
        log(f"eval_only: scoring {artifact.name} without training")
    else:
        # ----- optimisers: who goes where is the declaration's control patterns -----
        groups = split_parameters(base, hp.control_patterns)
        adam = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=cuda)
        embed_lr = hp.tied_embed_lr if cfg.tie_embeddings else hp.embed_lr
        muon = Muon(
            groups["muon"], hp.matrix_lr, hp.muon_momentum, hp.muon_backend_steps, hp.muon_weight_decay,
            hp.muon_row_norm,
        )  # fmt: skip
        optimizers: list[torch.optim.Optimizer] = [muon]
        for key, lr in (("embed", embed_lr), ("scalar", hp.scalar_lr), ("head", hp.head_lr)):
            if groups[key]:
                optimizers.append(torch.optim.Adam([{"params": groups[key], "lr": lr}], **adam))
        for opt in optimizers:
            for group in opt.param_groups:
                group["initial_lr"] = group["lr"]
        muon.orthogonalize = torch.compile(muon.orthogonalize) if compiled else muon.orthogonalize
        ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None) if distributed else model
        graph_grads = compiled and accum_steps > 1 and hp.compile_mode in ("reduce-overhead", "max-autotune")

        def step_once(loader: BatchLoader, scale: float, momentum: float) -> torch.Tensor:
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum_steps):
                if distributed:
                    ddp.require_backward_grad_sync = micro == accum_steps - 1
                x, y = loader.next(hp.train_batch_tokens, hp.train_seq_len, accum_steps)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    loss = ddp(x, y)
                (loss / accum_steps).backward()
                if micro == 0 and graph_grads:  # .grad is the backward graph's output, which the next replay overwrites
                    for param in base.parameters():
                        param.grad = None if param.grad is None else param.grad.clone()
                loss_sum += loss.detach()
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * scale
            for group in muon.param_groups:
                group["momentum"] = momentum
            if hp.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(base.parameters(), hp.grad_clip_norm)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            return loss_sum / accum_steps

        # ----- compile warm-up on real batches, then back to the initial weights and optimiser state -----
        log(f"train_loader:dataset:{Path(hp.data_path).name} train_shards:{len(train_files)}")
        if hp.warmup_steps > 0:
            saved = copy.deepcopy((base.state_dict(), [opt.state_dict() for opt in optimizers]))
            warm_loader = BatchLoader(train_files, rank, world_size, device)
            for i in range(1, hp.warmup_steps + 1):
                step_once(warm_loader, 1.0, hp.muon_momentum_warmup_start)
                if i % 10 == 0 or i == hp.warmup_steps:
                    log(f"warmup_step:{i}/{hp.warmup_steps} since_start:{time.perf_counter() - started_at:.0f}s")
            base.load_state_dict(saved[0])
            for opt, state in zip(optimizers, saved[1]):
                opt.load_state_dict(state)
            del saved, warm_loader

        # ----- training under the wall-clock cap -----
        loader = BatchLoader(train_files, rank, world_size, device)
        average = WeightAverage(base, hp.ema_decay, hp.ema_start_step) if hp.ema_decay > 0 else None
        reserve_s = STAGES.get("reserve_s", lambda: 0.0)()  # time kept for GPTQ at export
        cap_ms = 1000.0 * (hp.max_wallclock_seconds - reserve_s) if hp.max_wallclock_seconds > 0 else None
        stop_at = hp.iterations
        log("phase:train begin")
        wait_for_device()
        started = time.perf_counter()
        while True:
            final = steps >= stop_at
            if final or (hp.val_loss_every > 0 and steps > 0 and steps % hp.val_loss_every == 0):
                wait_for_device()
                train_ms += 1000.0 * (time.perf_counter() - started)
                if final and average is not None:  # the final score (before quantisation) is the averaged model's
                    log(average.copy_into_model())
                log("phase:val begin")  # validation is not training time; the sandbox's clock pauses too
                val_loss, pre_quant_bpb, _ = validate(model)
                log(
                    f"step:{steps}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{pre_quant_bpb:.4f} "
                    f"train_time:{train_ms:.0f}ms step_avg:{train_ms / max(steps, 1):.2f}ms"
                )
                log("phase:val end")
                wait_for_device()
                started = time.perf_counter()
            if final:
                if stop_at < hp.iterations:
                    log(f"stopping_early: wallclock_cap train_time:{train_ms:.0f}ms step:{steps}/{hp.iterations}")
                break
            elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            scale = lr_scale(steps, elapsed, hp.iterations, hp.lr_warmup_steps, hp.warmdown_iters, cap_ms)
            for name, stage in STAGES.items():  # per-step stages of the variant's parts (ternary ramp, late QAT)
                if name.startswith("step:"):
                    stage(base, hp, scale, elapsed, cap_ms, log)
            momentum = momentum_at(
                steps, hp.muon_momentum_warmup_start, hp.muon_momentum, hp.muon_momentum_warmup_steps
            )
            train_loss = step_once(loader, scale, momentum)
            steps += 1
            if average is not None:
                average.update(steps)
            elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            if hp.train_log_every > 0 and (steps <= 10 or steps % hp.train_log_every == 0):
                log(
                    f"step:{steps}/{hp.iterations} train_loss:{train_loss.item():.4f} "
                    f"train_time:{elapsed:.0f}ms step_avg:{elapsed / steps:.2f}ms"
                )
            if past_cap(elapsed, steps, cap_ms, ahead=2):  # within two steps of the cap: the device's clock
                wait_for_device()
                elapsed = train_ms + 1000.0 * (time.perf_counter() - started)
            out_of_time = past_cap(elapsed, steps, cap_ms)
            if distributed and cap_ms is not None:
                flag = torch.tensor(float(out_of_time), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = flag.item() > 0
            if out_of_time and stop_at == hp.iterations:
                stop_at = steps
        log("phase:train end")
        if cuda:
            log(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
            )

        # ----- the artifact: quantise, compress, write -----
        log("phase:serialize begin")
        if master:
            plan = choose_quantisers(
                base, hp.quant, hp.quant_ternary, hp.quant_overrides, hp.control_patterns, hp.keep_float_max_numel,
                hp.ternary_lstsq,
            )  # fmt: skip
            state = base.state_dict()
            raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
            export = STAGES.get("export", lambda net, p, *_: encode_state(state, p))  # GPTQ, pruning
            container = export(base, plan, len(code), hp, amp_dtype, log)
            file_bytes, torch_bytes = write_artifact(str(artifact), container, hp.compressor)
            payload = payload_bytes(container)
            used = {q for q, _ in plan.values()} - {"float16", "float32"}
            label = "+".join(sorted(used | {hp.quant}) + [hp.compressor])
            log(f"Serialized model: {raw_bytes} bytes")
            log(f"Code size: {len(code)} bytes")
            log(f"Total submission size: {raw_bytes + len(code)} bytes")
            log(
                f"Serialized model {label}: {file_bytes} bytes "
                f"(payload:{payload} raw_torch:{torch_bytes} payload_ratio:{raw_bytes / max(payload, 1):.2f}x "
                f"since_start:{time.perf_counter() - started_at:.0f}s)"
            )
            log(f"Total submission size {label}: {file_bytes + len(code)} bytes")
        if distributed:
            dist.barrier()
        log("phase:serialize end")

    # ----- score the model read back from the artifact -----
    model_bytes = artifact.stat().st_size
    if hp.eval_only:
        label = f"{hp.quant}+{hp.compressor}"
        log(f"Serialized model {label}: {model_bytes} bytes")
        log(f"Code size: {len(code)} bytes")
        log(f"Total submission size {label}: {model_bytes + len(code)} bytes")
    log("phase:eval begin")
    wait_for_device()
    eval_started = time.perf_counter()
    try:
        base.load_state_dict(read_artifact(str(artifact)), strict=True)
    except (ArtifactError, RuntimeError) as exc:
        raise SystemExit(f"error: {str(exc).splitlines()[0]}") from None
    final_score = STAGES["ttt"] if hp.eval_mode == "ttt" else evaluate
    val_loss, val_bpb, token_losses = validate(model, keep=bool(hp.token_losses), score=final_score)
    wait_for_device()
    eval_ms = 1000.0 * (time.perf_counter() - eval_started)
    log(f"{hp.score_tag} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_ms:.0f}ms")
    log(f"{hp.score_tag}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    log("phase:eval end")
    if hp.token_losses:
        losses = gather_token_losses(token_losses, world_size, device)
        if master:
            target = Path(hp.token_losses)
            tmp = target.with_name(target.name + ".tmp.npz")
            scored = val_tokens[: losses.numel() + 1].numpy().astype(np.int32)
            np.savez(tmp, tokens=scored, losses=losses.numpy().astype(np.float32))
            os.replace(tmp, target)
            log(f"token_losses: {losses.numel()} written to {target.name}")

    summary = dict(
        seed=hp.seed, world_size=world_size, steps=steps, train_time_ms=round(train_ms, 1),
        eval_time_ms=round(eval_ms, 1), val_loss=val_loss, val_bpb=val_bpb, pre_quant_val_bpb=pre_quant_bpb,
        bytes_model=model_bytes, bytes_code=len(code), bytes_total=model_bytes + len(code), artifact=artifact.name,
        artifact_sha256=hashlib.sha256(artifact.read_bytes()).hexdigest(), score_tag=f"{hp.score_tag}_exact",
        eval_only=hp.eval_only, torch=torch.__version__,
    )  # fmt: skip
    log("result_json " + json.dumps(summary, sort_keys=True))
    if distributed:
        dist.barrier()  # leave together: a rank torn down early once aborted its peer's teardown (gloo, in a rerun)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

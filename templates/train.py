"""main(): setup, training under the wall-clock cap, serialisation, round-trip evaluation of the artifact, logs.

Runs as `torchrun --standalone --nproc_per_node=N train_gpt.py` on CUDA (N divides 8), or `python train_gpt.py` on a
CPU-only machine. EVAL_ONLY=1 ARTIFACT=<file> skips training and scores an existing artifact; TOKEN_LOSSES=<file.npz>
also writes the scored tokens and their per-token losses.
"""

import copy
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from templates.bpb import build_byte_tables
from templates.data import DistributedTokenLoader, load_validation_tokens, shard_files
from templates.evaluate import evaluate, gather_token_losses
from templates.export import (
    payload_bytes,
    quantize_state_dict_int8,
    read_artifact,
    serialize_artifact,
)
from templates.hparams import Hyperparameters, env_int
from templates.layers import CastedLinear, keep_control_params_fp32
from templates.model import GPT
from templates.optim import Muon, lr_multiplier, muon_momentum_at, newton_schulz_orthogonalize

ARTIFACT_NAME = "final_model.int8.ptz"
SCORE_TAG = "final_int8_zlib_roundtrip"


def main() -> None:
    hp = Hyperparameters()
    code = Path(__file__).read_bytes()

    # ----------------------------------------------------------------------------- distributed and device
    distributed = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if 8 % world_size != 0:
        raise SystemExit(f"WORLD_SIZE={world_size} must divide 8 (the batch is split into 8 micro-batches)")
    grad_accum_steps = env_int("GRAD_ACCUM_STEPS", 0) or 8 // world_size
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    master = rank == 0
    autocast_dtype = torch.bfloat16 if use_cuda else None
    compile_model = hp.compile and use_cuda

    def sync() -> None:
        if use_cuda:
            torch.cuda.synchronize()

    # ----------------------------------------------------------------------------- logging
    log_path = Path("logs") / f"{hp.run_id}.txt"
    if master:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w", encoding="utf-8") as f:
            f.write(code.decode("utf-8", errors="replace"))
            f.write("\n" + "=" * 100 + "\n")

    def log0(msg: str, console: bool = True) -> None:
        if not master:
            return
        if console:
            print(msg, flush=True)
        with log_path.open("a", encoding="utf-8") as f:
            f.write(msg + "\n")

    log0(f"Running Python {sys.version}", console=False)
    log0(f"Running PyTorch {torch.__version__}", console=False)
    if use_cuda:
        log0(f"device:{torch.cuda.get_device_name(device)} count:{torch.cuda.device_count()}", console=False)
    log0("Hyperparameters:")
    for name, value in hp.items():
        log0(f"  {name}: {value}")
    log0(f"seed:{hp.seed}")
    log0(f"world_size:{world_size} grad_accum_steps:{grad_accum_steps}")

    random.seed(hp.seed)
    np.random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    if use_cuda:
        torch.cuda.manual_seed_all(hp.seed)

    # ----------------------------------------------------------------------------- tokenizer and validation data
    sp = spm.SentencePieceProcessor(model_file=hp.tokenizer_path)
    if sp.get_piece_size() != hp.vocab_size:
        raise SystemExit(f"{hp.tokenizer_path}: {sp.get_piece_size()} pieces but VOCAB_SIZE={hp.vocab_size}")
    byte_tables = build_byte_tables(sp, hp.vocab_size, device)
    train_pattern = os.path.join(hp.data_path, "fineweb_train_*.bin")
    val_pattern = os.path.join(hp.data_path, "fineweb_val_*.bin")
    val_tokens = load_validation_tokens(val_pattern, hp.train_seq_len, hp.val_tokens)
    log0(f"val_bpb:enabled tokenizer_kind=sentencepiece tokenizer_path={hp.tokenizer_path}")
    log0(f"val_loader:shards pattern={val_pattern} tokens:{val_tokens.numel() - 1}")

    # ----------------------------------------------------------------------------- model
    base_model = GPT(hp).to(device)
    if use_cuda:
        base_model = base_model.bfloat16()
        for module in base_model.modules():
            if isinstance(module, CastedLinear):
                module.float()
    keep_control_params_fp32(base_model, hp.control_patterns)
    log0(f"model_params:{sum(p.numel() for p in base_model.parameters())}")
    model = torch.compile(base_model, dynamic=False, fullgraph=True) if compile_model else base_model

    steps_done = 0
    train_time_ms = 0.0
    pre_quant_bpb = None
    if hp.eval_only:
        if not hp.artifact or not os.path.isfile(hp.artifact):
            raise SystemExit(f"EVAL_ONLY=1 needs ARTIFACT=<file> of an existing artifact (got {hp.artifact!r})")
        artifact_path = Path(hp.artifact)
        log0(f"eval_only: scoring {artifact_path.name} without training")
        bytes_model = artifact_path.stat().st_size
    else:
        # ------------------------------------------------------------------------- optimisers
        named = list(base_model.named_parameters())
        is_control = [p.ndim < 2 or any(c in n for c in hp.control_patterns) for n, p in named]
        matrix_params = [p for (n, p), c in zip(named, is_control) if n.startswith("blocks.") and not c]
        scalar_params = [p for (n, p), c in zip(named, is_control) if n.startswith("blocks.") and c]
        scalar_params.append(base_model.skip_weights)
        fused = use_cuda
        embed_lr = hp.tied_embed_lr if hp.tie_embeddings else hp.embed_lr
        adam_kw = dict(betas=(hp.beta1, hp.beta2), eps=hp.adam_eps, fused=fused)
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.Adam([{"params": [base_model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr}], **adam_kw),
            Muon(matrix_params, lr=hp.matrix_lr, momentum=hp.muon_momentum, backend_steps=hp.muon_backend_steps),
            torch.optim.Adam([{"params": scalar_params, "lr": hp.scalar_lr, "base_lr": hp.scalar_lr}], **adam_kw),
        ]
        for group in optimizers[1].param_groups:
            group["base_lr"] = hp.matrix_lr
        if base_model.lm_head is not None:
            head = [{"params": [base_model.lm_head.weight], "lr": hp.head_lr, "base_lr": hp.head_lr}]
            optimizers.append(torch.optim.Adam(head, **adam_kw))
        if compile_model:
            optimizers[1].orthogonalize = torch.compile(newton_schulz_orthogonalize)
        train_model = (
            DistributedDataParallel(model, device_ids=[local_rank] if use_cuda else None, broadcast_buffers=False)
            if distributed
            else model
        )

        def train_step(loader: DistributedTokenLoader, lr_scale: float, momentum: float) -> torch.Tensor:
            total = torch.zeros((), device=device)
            for micro in range(grad_accum_steps):
                if distributed:
                    train_model.require_backward_grad_sync = micro == grad_accum_steps - 1
                x, y = loader.next_batch(hp.train_batch_tokens, hp.train_seq_len, grad_accum_steps)
                with torch.autocast(device_type=device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = train_model(x, y)
                (loss / grad_accum_steps).backward()
                total += loss.detach() / grad_accum_steps
            for group in optimizers[1].param_groups:
                group["momentum"] = momentum
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * lr_scale
            if hp.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(base_model.parameters(), hp.grad_clip_norm)
            for opt in optimizers:
                opt.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            return total

        # ------------------------------------------------------------------------- compile warm-up, then restore
        log0(f"train_loader:dataset:{os.path.basename(hp.data_path)} train_shards:{len(shard_files(train_pattern))}")
        if hp.warmup_steps > 0:
            model_state = copy.deepcopy(base_model.state_dict())
            opt_states = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
            warm_loader = DistributedTokenLoader(train_pattern, rank, world_size, device)
            for i in range(hp.warmup_steps):
                train_step(warm_loader, 1.0, hp.muon_momentum_warmup_start)
                if i + 1 == hp.warmup_steps or (i + 1) % 10 == 0:
                    log0(f"warmup_step:{i + 1}/{hp.warmup_steps}")
            base_model.load_state_dict(model_state)
            for opt, state in zip(optimizers, opt_states):
                opt.load_state_dict(state)
            del model_state, opt_states, warm_loader

        # ------------------------------------------------------------------------- training under the cap
        loader = DistributedTokenLoader(train_pattern, rank, world_size, device)
        max_wallclock_ms = 1000.0 * hp.max_wallclock_seconds if hp.max_wallclock_seconds > 0 else None
        stop_after_step = None
        log0("phase:train begin")
        sync()
        t0 = time.perf_counter()
        step = 0
        while True:
            last_step = step == hp.iterations or (stop_after_step is not None and step >= stop_after_step)
            if last_step or (hp.val_loss_every > 0 and step > 0 and step % hp.val_loss_every == 0):
                sync()
                train_time_ms += 1000.0 * (time.perf_counter() - t0)
                val_loss, val_bpb, _ = evaluate(
                    model, val_tokens, byte_tables, hp.train_seq_len, hp.val_batch_size, rank, world_size, device,
                    autocast_dtype,
                )  # fmt: skip
                pre_quant_bpb = val_bpb
                log0(
                    f"step:{step}/{hp.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
                    f"train_time:{train_time_ms:.0f}ms step_avg:{train_time_ms / max(step, 1):.2f}ms"
                )
                sync()
                t0 = time.perf_counter()
            if last_step:
                if stop_after_step is not None and step < hp.iterations:
                    log0(f"stopping_early: wallclock_cap train_time:{train_time_ms:.0f}ms step:{step}/{hp.iterations}")
                break
            elapsed_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
            lr_scale = lr_multiplier(step, elapsed_ms, hp.iterations, hp.warmdown_iters, max_wallclock_ms)
            momentum = muon_momentum_at(
                step, hp.muon_momentum_warmup_start, hp.muon_momentum, hp.muon_momentum_warmup_steps
            )
            train_loss = train_step(loader, lr_scale, momentum)
            step += 1
            approx_ms = train_time_ms + 1000.0 * (time.perf_counter() - t0)
            if hp.train_log_every > 0 and (step <= 10 or step % hp.train_log_every == 0):
                log0(
                    f"step:{step}/{hp.iterations} train_loss:{train_loss.item():.4f} "
                    f"train_time:{approx_ms:.0f}ms step_avg:{approx_ms / step:.2f}ms"
                )
            reached_cap = max_wallclock_ms is not None and approx_ms >= max_wallclock_ms
            if distributed and max_wallclock_ms is not None:
                flag = torch.tensor(int(reached_cap), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                reached_cap = bool(flag.item())
            if stop_after_step is None and reached_cap:
                stop_after_step = step
        steps_done = step
        log0("phase:train end")
        if use_cuda:
            log0(
                f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
                f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB"
            )

        # ------------------------------------------------------------------------- serialisation
        log0("phase:serialize begin")
        artifact_path = Path(ARTIFACT_NAME)
        if master:
            state = base_model.state_dict()
            raw_bytes = sum(t.numel() * t.element_size() for t in state.values())
            quant = quantize_state_dict_int8(state, hp.control_patterns)
            blob, raw_torch = serialize_artifact(quant)
            tmp = artifact_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, artifact_path)
            payload = payload_bytes(quant)
            log0(f"Serialized model: {raw_bytes} bytes")
            log0(f"Code size: {len(code)} bytes")
            log0(f"Total submission size: {raw_bytes + len(code)} bytes")
            log0(
                f"Serialized model int8+zlib: {len(blob)} bytes "
                f"(payload:{payload} raw_torch:{raw_torch} payload_ratio:{raw_bytes / max(payload, 1):.2f}x)"
            )
            log0(f"Total submission size int8+zlib: {len(blob) + len(code)} bytes")
        if distributed:
            dist.barrier()
        bytes_model = artifact_path.stat().st_size
        log0("phase:serialize end")

    # ----------------------------------------------------------------------------- round-trip evaluation
    if hp.eval_only:
        log0(f"Serialized model int8+zlib: {bytes_model} bytes")
        log0(f"Code size: {len(code)} bytes")
        log0(f"Total submission size int8+zlib: {bytes_model + len(code)} bytes")
    log0("phase:eval begin")
    sync()
    t_eval = time.perf_counter()
    base_model.load_state_dict(read_artifact(str(artifact_path)), strict=True)
    val_loss, val_bpb, token_losses = evaluate(
        model, val_tokens, byte_tables, hp.train_seq_len, hp.val_batch_size, rank, world_size, device, autocast_dtype,
        keep_token_losses=bool(hp.token_losses),
    )  # fmt: skip
    sync()
    eval_time_ms = 1000.0 * (time.perf_counter() - t_eval)
    log0(f"{SCORE_TAG} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} eval_time:{eval_time_ms:.0f}ms")
    log0(f"{SCORE_TAG}_exact val_loss:{val_loss:.8f} val_bpb:{val_bpb:.8f}")
    log0("phase:eval end")
    if hp.token_losses:
        all_losses = gather_token_losses(token_losses, world_size, device)
        if master:
            out = Path(hp.token_losses)
            tmp = out.with_name(out.name + ".tmp.npz")
            tokens = val_tokens[: all_losses.numel() + 1].numpy().astype(np.int32)
            np.savez(tmp, tokens=tokens, losses=all_losses.numpy().astype(np.float32))
            os.replace(tmp, out)
            log0(f"token_losses: {all_losses.numel()} written to {out.name}")

    result = {
        "seed": hp.seed,
        "world_size": world_size,
        "steps": steps_done,
        "train_time_ms": round(train_time_ms, 1),
        "eval_time_ms": round(eval_time_ms, 1),
        "val_loss": val_loss,
        "val_bpb": val_bpb,
        "pre_quant_val_bpb": pre_quant_bpb,
        "bytes_model": bytes_model,
        "bytes_code": len(code),
        "bytes_total": bytes_model + len(code),
        "artifact": artifact_path.name,
        "artifact_sha256": hashlib.sha256(artifact_path.read_bytes()).hexdigest(),
        "score_tag": f"{SCORE_TAG}_exact",
        "eval_only": hp.eval_only,
        "torch": torch.__version__,
    }
    log0("result_json " + json.dumps(result, sort_keys=True))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

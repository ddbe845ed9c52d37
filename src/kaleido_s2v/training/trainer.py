"""The training loop: components (`components.py`), parallelise, train, checkpoint and export (`checkpointing.py`).

Outputs under `run.output`:
  metrics.jsonl             one JSON object per optimizer step (step, loss, lr, grad_norm, samples_per_s, ...)
  checkpoint-<step>/        torch.distributed.checkpoint shards (model + optimizer [+ EMA]), config.yaml, trainer_state.json
  final/                    full: final/transformer/ (diffusers) [+ transformer_ema/]; LoRA: pytorch_lora_weights.safetensors
  tensorboard/              when the tensorboard package is installed
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import Runtime, init_runtime
from ..errors import UserInputError
from .checkpointing import export_final, load_checkpoint, resume_checkpoint, save_checkpoint
from .components import (
    build_model,
    check_model,
    load_frozen_components,
    materialize_from_rank0,
    owned_folder,
    rms_norm_in_fp32,
)
from .config import TrainConfig
from .data import CachedDataset, VideoDataset, discover_samples, slot_generator
from .ema import ParameterEMA
from .objective import flow_matching_loss, resolution_shift, sample_noise_and_sigma
from .parallelize import (
    apply_activation_checkpointing,
    apply_compile,
    apply_context_parallel,
    apply_fsdp,
    check_compile_toolchain,
)

logger = logging.getLogger(__name__)

MADE_BY = "kaleido-s2v train"  # the marker of a run folder (--output)


# ---------------------------------------------------------------------------------------------- a step


@torch.no_grad()
def encode_batch(items: list[dict], frozen: dict, cfg: TrainConfig, device) -> list[dict]:
    """Pixels/captions/reference images -> latents, text states and one latent frame per reference (Kaleido),
    or the canvas conditioning `condition` and `image_embeds` (MAGREF: a folder with an image encoder)."""
    from ..latents import encode_references, encode_video
    from ..text import encode_text

    if "latents" in items[0]:  # from the latent cache
        return [dict(latents=it["latents"].to(device).float(), text=it["text"].to(device).float(),
                     ref_latents=[r.to(device).float() for r in it["ref_latents"]], slot=it["slot"]) for it in items]
    d = cfg.data
    text = encode_text(frozen["tokenizer"], frozen["text_encoder"], [it["caption"] for it in items],
                       max_sequence_length=d.max_sequence_length, device=device, dtype=torch.float32)
    canvas = "image_encoder" in frozen
    if canvas:
        from .canvas import encode_canvases

        conditions = encode_canvases(items, frozen, d.height, d.width, d.num_frames, device)
    out = []
    for i, it in enumerate(items):
        latents = encode_video(frozen["vae"], it["pixels"][None].to(device))[0].float()
        if canvas:
            out.append(dict(latents=latents, text=text[i], ref_latents=[], slot=it["slot"], **conditions[i]))
            continue
        refs = [r[0].float() for r in encode_references(frozen["vae"], it["references"], d.height, d.width)]
        out.append(dict(latents=latents, text=text[i], ref_latents=refs, slot=it["slot"]))
    return out


def forward_groups(encoded: list[dict], distributed: bool, device) -> list[list[dict]]:
    """The micro-batch split into forwards: samples with the same reference shapes run as one.

    Under FSDP every rank must run the same number of forwards (each one all-gathers the weights). Bucketed
    batches (`bucket_by_references`) give every rank one group; otherwise, when the ranks' group counts differ,
    each sample runs alone (every rank has `batch_size` samples).
    """
    groups: dict[tuple, list[dict]] = {}
    for e in encoded:
        groups.setdefault(tuple(tuple(r.shape) for r in e["ref_latents"]), []).append(e)
    if distributed:
        counts = torch.tensor([len(groups), -len(groups)], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)  # (max, −min) of the ranks' counts in one all-reduce
        if counts[0] != -counts[1]:
            return [[e] for e in encoded]
    return list(groups.values())


def batch_loss(transformer, groups: list[list[dict]], shift: float, device) -> torch.Tensor:
    """Mean flow-matching loss of a micro-batch, one forward per group (`forward_groups`)."""
    total, count = 0.0, 0
    for members in groups:
        noises, sigmas = [], []
        for e in members:  # noise and σ from the sample's slot, so any process layout draws the same
            noise, sigma = sample_noise_and_sigma(e["latents"], shift, slot_generator(e["slot"].seed, e["slot"].step,
                                                                                      e["slot"].slot))
            noises.append(noise)
            sigmas.append(sigma)
        x0 = torch.stack([e["latents"] for e in members])
        text = torch.stack([e["text"] for e in members])
        if "condition" in members[0]:  # MAGREF: the canvas, channel-concatenated, and its CLIP features
            extra = dict(condition=torch.stack([e["condition"] for e in members]),
                         image_embeds=torch.stack([e["image_embeds"] for e in members]))
        else:
            extra = dict(references=[torch.stack([e["ref_latents"][j] for e in members])
                                     for j in range(len(members[0]["ref_latents"]))])
        loss = flow_matching_loss(transformer, x0, torch.stack(noises).to(device), torch.stack(sigmas).to(device),
                                  text, **extra)
        total, count = total + loss * len(members), count + len(members)
    return total / count


# ---------------------------------------------------------------------------------------------- helpers
def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps` optimizer steps, then constant (the release's constant schedule), then,
    with `decay_steps`, a linear decay to 0 over the run's last steps (warmup-stable-decay, as torchtitan's)."""
    o = cfg.optim
    warmup = min(o.warmup_steps, cfg.run.max_steps)  # a run shorter than the warmup warms up over the whole run
    scale = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    left = cfg.run.max_steps - step  # steps left, this one included
    if o.decay_steps > 0 and left <= o.decay_steps:
        scale = min(scale, left / (o.decay_steps + 1))
    return o.lr * scale


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


class _Metrics:
    """metrics.jsonl (+ TensorBoard when installed) on the main process."""

    def __init__(self, output: Path, rt: Runtime, resume_step: int, tensorboard: bool):
        self.path = output / "metrics.jsonl"
        self.enabled = rt.is_main
        self.tb = None
        if not self.enabled:
            return
        if self.path.exists():  # keep the history up to the resumed step, drop what came after it
            keep = [ln for ln in self.path.read_text().splitlines() if _step_of(ln) is not None and _step_of(ln) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------- training
def build_dataset(cfg: TrainConfig):
    """The dataset of `data.path` (from `data.cache_dir` when set), checked to hold at least one readable sample."""
    samples = discover_samples(cfg.data.path, cfg.data.max_references)
    if cfg.data.cache_dir:
        dataset = CachedDataset(samples, cfg.data, cfg.data.cache_dir, cfg.model.path)
        dataset.check_readable(f"--cache-dir '{cfg.data.cache_dir}'")
    else:
        dataset = VideoDataset(samples, cfg.data)
        dataset.check_readable(f"--data '{cfg.data.path}'")
    return dataset


def train(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run training as configured; returns a summary (steps, last loss, output paths).

    Everything that can be checked is checked before `run.output` is made; an error before the first write
    leaves no run folder behind. `overwrite`: also write into an --output folder train did not make.
    """
    from ..fileio import claim_folder

    cfg.validate()
    if not cfg.run.output:
        raise UserInputError("--output is required: give a folder for checkpoints, metrics and the final weights")
    output = Path(cfg.run.output)
    claim_folder(output, "--output", MADE_BY, overwrite=overwrite)
    check_model(cfg)
    if cfg.parallel.compile:
        check_compile_toolchain()
    dataset = build_dataset(cfg)
    resume = resume_checkpoint(cfg, output)
    rt = init_runtime(cp_degree=cfg.parallel.cp_degree)
    with owned_folder(output, MADE_BY, rt):
        return _train(cfg, rt, output, dataset, resume, progress)


def _train(cfg: TrainConfig, rt: Runtime, output: Path, dataset, resume: Path | None, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from .data import StepBatchSampler

    torch.manual_seed(cfg.run.seed)
    bf16 = cfg.parallel.mixed_precision == "bf16"
    frozen = None if cfg.data.cache_dir else load_frozen_components(
        cfg.model.path, rt.device, torch.bfloat16 if bf16 and rt.device.type == "cuda" else torch.float32
    )

    # model: LoRA first (peft wraps Linear layers), then checkpointing, context parallel, compile, FSDP
    model, peft_config, full_state = build_model(cfg, rt)
    model.train()
    if not rt.dims.distributed:
        model.to(rt.device)
        if bf16 and rt.device.type == "cpu":  # under autocast (below)
            rms_norm_in_fp32(model)
    if cfg.parallel.gradient_checkpointing:
        apply_activation_checkpointing(model)
    if rt.cp_mesh is not None:
        apply_context_parallel(model, rt)
    if cfg.parallel.compile:
        apply_compile(model)
    if rt.dims.distributed:
        apply_fsdp(model, rt.world_mesh, cfg.parallel.mixed_precision)
        materialize_from_rank0(model, full_state, rt.device)
        del full_state
        # the velocity is a reshaped view; nothing modifies it in place, so FSDP's warning does not apply
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    ema = ParameterEMA(model, o.ema_decay) if o.ema_decay > 0 else None

    start_step = 0
    if resume is not None:
        start_step = load_checkpoint(resume, model, optimizer, cfg, ema)
        if rt.is_main:
            logger.info("resumed from %s at step %d", resume, start_step)
    elif cfg.run.resume and rt.is_main:
        logger.info("--resume latest: no checkpoint in %s, starting from step 0", output)
    if o.warmup_steps > cfg.run.max_steps and rt.is_main:  # `lr_at` clips it
        logger.info("warmup_steps %d > max_steps %d: warming up over %d steps", o.warmup_steps, cfg.run.max_steps,
                    cfg.run.max_steps)

    sampler = StepBatchSampler(
        len(dataset), batch_size=cfg.run.batch_size, grad_accum=cfg.run.grad_accum, dp_rank=rt.dp_rank,
        dp_size=rt.dims.dp, seed=cfg.run.seed, start_step=start_step, max_steps=cfg.run.max_steps,
        buckets=[len(s.references) for s in dataset.samples] if cfg.data.bucket_by_references else None,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=list, num_workers=cfg.data.num_workers,
        persistent_workers=False, prefetch_factor=2 if cfg.data.num_workers else None,
    )
    from ..model_folder import vae_stride

    stride = vae_stride(cfg.model.path)
    lat_h, lat_w = cfg.data.height // stride, cfg.data.width // stride
    shift = resolution_shift(lat_h, lat_w, model.config.patch_size[1])
    autocast = torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=bf16 and not rt.dims.distributed)
    metrics = _Metrics(output, rt, start_step, cfg.run.tensorboard)
    bar = tqdm(total=cfg.run.max_steps, initial=start_step, desc="train", disable=not (progress and rt.is_main),
               dynamic_ncols=True)

    step, micro, accum_loss, t0 = start_step, 0, 0.0, time.perf_counter()
    skipped = forwards = 0
    last = {}
    for items in loader:
        is_last_micro = micro == cfg.run.grad_accum - 1
        if rt.dims.distributed and cfg.run.grad_accum > 1:
            model.set_requires_gradient_sync(is_last_micro)
        groups = forward_groups(encode_batch(items, frozen, cfg, rt.device), rt.dims.distributed, rt.device)
        forwards += len(groups)
        with autocast:
            loss = batch_loss(model, groups, shift, rt.device) / cfg.run.grad_accum
        loss.backward()
        accum_loss += loss.detach()
        micro += 1
        if not is_last_micro:
            continue

        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        loss_value = accum_loss.clone()
        if rt.dims.distributed:
            dist.all_reduce(loss_value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
            if dist.get_backend() != "nccl":
                loss_value /= rt.dims.world_size
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_value))
        if finite:  # never let a NaN/Inf gradient into the weights
            optimizer.step()
        else:
            skipped += 1
            if rt.is_main:
                logger.warning("step %d: non-finite loss or gradient norm, update skipped", step + 1)
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step()
        step += 1
        dt = time.perf_counter() - t0
        t0 = time.perf_counter()
        last = dict(step=step, loss=float(loss_value), lr=lr, grad_norm=float(grad_norm),
                    samples_per_s=sampler.global_batch / dt if dt > 0 else 0.0, skipped=not finite, forwards=forwards)
        micro, accum_loss, forwards = 0, 0.0, 0
        metrics.log(last)
        bar.update(1)
        bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
        if step % cfg.run.save_every == 0 or step == cfg.run.max_steps:
            save_checkpoint(output / f"checkpoint-{step}", model, optimizer, cfg, step, rt, ema)
            t0 = time.perf_counter()  # samples/s measures training, not saving
    bar.close()
    metrics.close()
    final = export_final(output, model, cfg, rt, peft_config, ema)
    summary = dict(steps=step, last=last, skipped_steps=skipped, output=str(output), final=str(final),
                   world_size=rt.dims.world_size, lora=cfg.lora.rank > 0)
    return summary



"""The training loop: load the pipeline folder's components, parallelise, train, checkpoint, resume, export.

Outputs under `run.output`:
  metrics.jsonl             one JSON object per optimizer step (step, loss, lr, grad_norm, samples_per_s, ...)
  checkpoint-<step>/        torch.distributed.checkpoint shards (model + optimizer [+ EMA]), config.yaml, trainer_state.json
  final/                    full: final/transformer/ (diffusers) [+ transformer_ema/]; LoRA: pytorch_lora_weights.safetensors
  tensorboard/              when the tensorboard package is installed
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import Runtime, init_runtime
from ..errors import UserInputError
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
    check_cp_divides,
)

logger = logging.getLogger(__name__)

MADE_BY = "kaleido-s2v train"  # the marker of a run folder (--output)
CACHE_MADE_BY = "kaleido-s2v train --build-cache"  # the marker of a latent cache (--cache-dir)
FROZEN = ("vae", "text_encoder", "tokenizer")


# ---------------------------------------------------------------------------------------------- components
def check_model(cfg: TrainConfig, need_transformer: bool = True) -> None:
    """The --model folder whole (configs parse, weights complete) and the frame size (and CP split) it allows."""
    from ..model_folder import check_model_folder, size_multiple, vae_stride

    components = (("transformer",) if need_transformer else ()) + FROZEN
    check_model_folder(cfg.model.path, "--model", components=components, index=False)
    check_frame_size(cfg)
    if cfg.parallel.cp_degree > 1:
        stride = vae_stride(cfg.model.path)
        check_cp_divides(cfg.parallel.cp_degree, cfg.data.height, cfg.data.width,
                         size_multiple(cfg.model.path) // stride, stride)


def check_frame_size(cfg: TrainConfig) -> None:
    """Height and width must be multiples of the model's VAE stride × patch size (16 for the release)."""
    from ..model_folder import size_multiple

    d, multiple = cfg.data, size_multiple(cfg.model.path)
    if d.height % multiple or d.width % multiple:
        raise UserInputError(
            f"--height/--width {d.height}x{d.width} must be multiples of {multiple} for this model (VAE stride x patch)"
        )


def load_frozen_components(model_dir, device, dtype=torch.float32) -> dict:
    """Tokenizer, text encoder and VAE (frozen, eval). The VAE stays fp32."""
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, UMT5EncoderModel
    from transformers.utils import logging as hf_logging

    from ..model_folder import loading

    root = Path(model_dir)
    with loading(root / "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar: a run shows the training bar only
    try:
        with loading(root / "text_encoder"):
            text_encoder = UMT5EncoderModel.from_pretrained(root / "text_encoder", dtype=dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    with loading(root / "vae"):
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", dtype=torch.float32)
    text_encoder, vae = text_encoder.to(device).eval(), vae.to(device).eval()
    text_encoder.requires_grad_(False)
    vae.requires_grad_(False)
    return dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)


def load_transformer(model_dir, ref_rope: str | None = None, ref_rope_offset: int | None = None):
    """KaleidoTransformer3DModel (fp32 master weights) from `model_dir/transformer`; Wan2.1 folders load too."""
    from ..model_folder import loading
    from ..transformer import KaleidoTransformer3DModel

    overrides = {}
    if ref_rope is not None:
        overrides["ref_rope"] = ref_rope
    if ref_rope_offset is not None:
        overrides["ref_rope_offset"] = ref_rope_offset
    root = Path(model_dir)
    with loading(root / "transformer"):
        return KaleidoTransformer3DModel.from_pretrained(root, subfolder="transformer", dtype=torch.float32,
                                                         **overrides)


def build_model(cfg: TrainConfig, rt: Runtime):
    """(transformer, peft LoraConfig or None, full state dict on rank 0 under torchrun else None).

    One process: the loaded model. Under torchrun only rank 0 reads the weights (and initialises LoRA); every
    rank builds the model on the meta device, and `materialize_from_rank0` fills each rank's shards after
    `fully_shard` — so host memory holds one full copy per node's rank 0, not one per process.
    """
    from ..transformer import KaleidoTransformer3DModel
    from .lora import add_lora

    def with_lora(model):
        if cfg.lora.rank > 0:
            return add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
        return None

    if not rt.dims.distributed:
        model = load_transformer(cfg.model.path, cfg.model.ref_rope, cfg.model.ref_rope_offset)
        return model, with_lora(model), None
    full_state = None
    if rt.is_main:
        loaded = load_transformer(cfg.model.path, cfg.model.ref_rope, cfg.model.ref_rope_offset)
        with_lora(loaded)
        full_state = loaded.state_dict()
        config = dict(loaded.config)
        del loaded
    else:
        config = dict(KaleidoTransformer3DModel.load_config(cfg.model.path, subfolder="transformer"))
        if cfg.model.ref_rope is not None:
            config["ref_rope"] = cfg.model.ref_rope
        if cfg.model.ref_rope_offset is not None:
            config["ref_rope_offset"] = cfg.model.ref_rope_offset
    with torch.device("meta"):
        model = KaleidoTransformer3DModel.from_config(config)
    return model, with_lora(model), full_state


def rms_norm_in_fp32(model) -> None:
    """Run the attention's q/k `RMSNorm`s in fp32, as CUDA's autocast does (rms_norm is on its fp32 list).

    CPU autocast leaves rms_norm alone: it gets bf16 activations with the fp32 weights, which torch's fused kernel
    refuses (a UserWarning, then a composite fallback). The input is cast up and the output back to its dtype.
    """
    def forward(norm, x):
        return torch.nn.functional.rms_norm(x.float(), norm.normalized_shape, norm.weight, norm.eps).to(x.dtype)

    for m in model.modules():
        if isinstance(m, torch.nn.RMSNorm):
            m.forward = functools.partial(forward, m)


def materialize_from_rank0(model, full_state: dict | None, device) -> None:
    """Allocate the (sharded, meta) parameters on `device` and broadcast rank 0's weights into them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    set_model_state_dict(
        model, full_state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


@torch.no_grad()
def encode_batch(items: list[dict], frozen: dict, cfg: TrainConfig, device) -> list[dict]:
    """Pixels/captions/reference images -> latents, text states and one latent frame per reference."""
    from ..latents import encode_references, encode_video
    from ..text import encode_text

    if "latents" in items[0]:  # from the latent cache
        return [dict(latents=it["latents"].to(device).float(), text=it["text"].to(device).float(),
                     ref_latents=[r.to(device).float() for r in it["ref_latents"]], slot=it["slot"]) for it in items]
    d = cfg.data
    text = encode_text(frozen["tokenizer"], frozen["text_encoder"], [it["caption"] for it in items],
                       max_sequence_length=d.max_sequence_length, device=device, dtype=torch.float32)
    out = []
    for i, it in enumerate(items):
        latents = encode_video(frozen["vae"], it["pixels"][None].to(device))[0].float()
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
        refs = [torch.stack([e["ref_latents"][j] for e in members]) for j in range(len(members[0]["ref_latents"]))]
        loss = flow_matching_loss(transformer, x0, torch.stack(noises).to(device), torch.stack(sigmas).to(device),
                                  text, refs)
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


def find_latest_checkpoint(output: Path) -> Path | None:
    ckpts = [p for p in output.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1]), default=None)


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json of a checkpoint folder, checked: a `UserInputError` naming --resume otherwise."""
    where = f"--resume '{path}'"
    if path.is_dir() and not (path / "trainer_state.json").exists() and find_latest_checkpoint(path) is not None:
        raise UserInputError(f"{where} is a run folder, not a checkpoint: give {find_latest_checkpoint(path)}, "
                             f"or --resume latest with --output {path}")
    if not (path / "trainer_state.json").is_file() or not (path / ".metadata").is_file():
        raise UserInputError(f"{where} is not a checkpoint folder (trainer_state.json and .metadata): give "
                             "OUTPUT/checkpoint-<step>, or 'latest'")
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["step"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserInputError(f"{where}: its trainer_state.json is damaged (no step): resume from another "
                             "checkpoint") from None
    return state


def resume_checkpoint(cfg: TrainConfig, output: Path) -> Path | None:
    """The checked checkpoint folder `run.resume` names (`latest`: the newest in `output`, None if there is none)."""
    if not cfg.run.resume:
        return None
    ckpt = find_latest_checkpoint(output) if cfg.run.resume == "latest" else Path(cfg.run.resume)
    if ckpt is not None:
        read_trainer_state(ckpt)
    return ckpt


def _state_dicts(model, optimizer, lora: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=lora))


def save_checkpoint(path: Path, model, optimizer, cfg: TrainConfig, step: int, rt: Runtime, ema=None) -> None:
    """Sharded model + optimizer (+ EMA) state (torch.distributed.checkpoint), config and step; renamed into place."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(f".{path.name}.tmp")
    if rt.is_main and tmp.exists():
        shutil.rmtree(tmp)
    rt.barrier()
    model_sd, optim_sd = _state_dicts(model, optimizer, cfg.lora.rank > 0)
    state = {"model": model_sd, "optim": optim_sd} | ({"ema": ema.state_dict()} if ema is not None else {})
    with warnings.catch_warnings():  # one process: dcp says it assumes a single process, which is right
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(tmp))
    rt.barrier()
    if rt.is_main:
        (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
        (tmp / "trainer_state.json").write_text(json.dumps(dict(step=step, world_size=rt.dims.world_size, ema=ema is not None)))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    rt.barrier()


def load_checkpoint(path: Path, model, optimizer, cfg: TrainConfig, ema=None) -> int:
    """Restore model and optimizer (and the EMA: from the checkpoint when it has one, else the loaded weights)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    trainer_state = read_trainer_state(path)
    model_sd, optim_sd = _state_dicts(model, optimizer, cfg.lora.rank > 0)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None and trainer_state.get("ema"):
        state["ema"] = ema.state_dict()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # dcp wraps per-rank errors in CheckpointException (a BaseException)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise UserInputError(
            f"--resume '{path}' does not match this model/optimizer ({lines[-1][:200] if lines else type(e).__name__}): "
            "resume with the settings it was saved with (its config.yaml)"
        ) from e
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    step = int(trainer_state["step"])
    if ema is not None:
        if "ema" in state:
            ema.resumed_at(step)
        else:  # a checkpoint saved without EMA: average from its weights on
            logger.info("%s has no EMA weights: the EMA starts from its model weights", path)
            ema.restart_from_weights(step)
    return step


def _transformer_config(model) -> dict:
    import diffusers

    cfg = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    return {"_class_name": "KaleidoTransformer3DModel", "_diffusers_version": diffusers.__version__, **cfg}


def export_final(output: Path, model, cfg: TrainConfig, rt: Runtime, peft_config=None, ema=None) -> Path:
    """final/transformer/ (full fine-tune, diffusers format; with EMA also final/transformer_ema/) or
    final/pytorch_lora_weights.safetensors (LoRA)."""
    from huggingface_hub import save_torch_state_dict
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..fileio import atomic_path
    from .lora import lora_state_dict, save_lora

    lora = cfg.lora.rank > 0
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)

    def gathered() -> dict[str, torch.Tensor]:
        """The full state dict in its own storage: FSDP gathers into padded buffers, and on one process the
        tensors alias the parameters (which the EMA swap restores afterwards)."""
        return {k: v.detach().clone() for k, v in get_model_state_dict(model, options=options).items()}  # collective

    full = gathered()
    full_ema = None
    if ema is not None:
        with ema.swapped_in():
            full_ema = gathered()
    final = output / "final"

    def save_transformer(folder: Path, state: dict) -> None:
        folder.mkdir()
        save_torch_state_dict(
            state, folder, filename_pattern="diffusion_pytorch_model{suffix}.safetensors", max_shard_size="10GB"
        )
        (folder / "config.json").write_text(json.dumps(_transformer_config(model), indent=2))

    if rt.is_main:
        with atomic_path(final, is_dir=True) as tmp:
            if lora:
                save_lora(tmp, lora_state_dict(model, full), peft_config)
            else:
                save_transformer(tmp / "transformer", full)
                if full_ema is not None:
                    save_transformer(tmp / "transformer_ema", full_ema)
            (tmp / "config.yaml").write_text(cfg.to_yaml(), encoding="utf-8")
    rt.barrier()
    return final


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


def _owned(folder: Path, made_by: str, rt: Runtime):
    """The main process writes `folder` (see `fileio.output_folder`); the others write into it once it exists."""
    from ..fileio import output_folder

    return output_folder(folder, made_by) if rt.is_main else contextlib.nullcontext(folder)


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
    with _owned(output, MADE_BY, rt):
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


def build_cache(cfg: TrainConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Encode every sample once (first window, no dropout) into `data.cache_dir`; ranks split the samples.

    Checked before the cache folder is made, as `train`; `overwrite`: also write into a folder it did not make.
    """
    from ..fileio import claim_folder

    cfg.validate()
    if not cfg.data.cache_dir:
        raise UserInputError("--build-cache needs --cache-dir: the folder to write the latents to")
    cache = Path(cfg.data.cache_dir)
    claim_folder(cache, "--cache-dir", CACHE_MADE_BY, overwrite=overwrite)
    check_model(cfg, need_transformer=False)
    samples = discover_samples(cfg.data.path, cfg.data.max_references)
    VideoDataset(samples, cfg.data).check_readable(f"--data '{cfg.data.path}'")
    rt = init_runtime()
    with _owned(cache, CACHE_MADE_BY, rt):
        rt.barrier()
        return _build_cache(cfg, rt, cache, samples, progress)


def _build_cache(cfg: TrainConfig, rt: Runtime, cache: Path, samples: list, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from ..fileio import atomic_path
    from ..latents import encode_references, encode_video
    from ..text import encode_text
    from .data import cache_meta

    d = cfg.data
    frozen = load_frozen_components(cfg.model.path, rt.device)

    def text_states(caption: str) -> torch.Tensor:
        states = encode_text(frozen["tokenizer"], frozen["text_encoder"], [caption],
                             max_sequence_length=d.max_sequence_length, device="cpu", dtype=torch.float32)[0]
        n = int((states.abs().sum(-1) > 0).nonzero().max()) + 1 if states.abs().sum() > 0 else 0
        return states[:n].clone()  # trimmed: the rows after the prompt are zeros

    if rt.is_main:
        with atomic_path(cache / "empty_text.pt") as tmp:
            torch.save(text_states(""), tmp)
    written, skipped, bad = 0, 0, []
    mine = VideoDataset(samples[rt.rank :: rt.dims.world_size], d)
    for i, s in enumerate(tqdm(mine.samples, desc="cache", disable=not (progress and rt.is_main))):
        dst = cache / f"{s.clip_id}.pt"
        if dst.is_file():
            skipped += 1
            continue
        try:
            item = mine.load(i, rng=None)  # the first window, no dropout
            entry = dict(
                latents=encode_video(frozen["vae"], item["pixels"][None].to(rt.device))[0].cpu(),
                text=text_states(item["caption"]),
                ref_latents=[
                    r[0].cpu() for r in encode_references(frozen["vae"], item["references"], d.height, d.width)
                ],
            )
        except Exception as e:  # bad sample: log and go on
            logger.warning("cache: skipping sample %s: %s", s.clip_id, e)
            bad.append(s.clip_id)
            continue
        with atomic_path(dst) as tmp:
            torch.save(entry, tmp)
        written += 1
    rt.barrier()
    if rt.is_main:
        (cache / "cache.json").write_text(json.dumps(cache_meta(d, cfg.model.path), indent=2))
    return dict(cache_dir=str(cache), written=written, already_cached=skipped, bad=bad, samples=len(samples))


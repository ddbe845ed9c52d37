"""What training runs on: the --model folder checked whole, its frozen components and the transformer loaded, the
model built on every rank (rank 0 reads the weights under torchrun), and the run folder's ownership."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from ..distributed import Runtime
from ..errors import UserInputError
from .config import TrainConfig
from .parallelize import check_cp_divides

FROZEN = ("vae", "text_encoder", "tokenizer")


def family(cfg: TrainConfig):
    """The --model folder's `model_folder.Family` (a folder without model_index.json is Kaleido's)."""
    from ..model_folder import facts

    return facts(cfg.model.path).family


def check_model(cfg: TrainConfig, need_transformer: bool = True) -> None:
    """The --model folder whole (configs parse, weights complete), the frame size (and CP split) it allows, and the
    settings its family takes (MAGREF: no R-RoPE variant, no latent cache)."""
    from ..model_folder import MAGREF, check_model_folder, size_multiple, vae_stride

    components = (("transformer",) if need_transformer else ()) + FROZEN
    check_model_folder(cfg.model.path, "--model", components=components, index=False)
    if family(cfg) is MAGREF:
        check_model_folder(cfg.model.path, "--model", components=("image_encoder",), index=False)
        if cfg.model.ref_rope is not None or cfg.model.ref_rope_offset is not None:
            raise UserInputError("--ref-rope/--ref-rope-offset choose Kaleido's reference RoPE: a MAGREF model has "
                                 "no reference tokens, drop them")
        if cfg.data.cache_dir:
            raise UserInputError("--cache-dir: the latent cache holds Kaleido's per-reference latents, and MAGREF "
                                 "composes a new canvas every step: train a MAGREF model without it")
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
    """Tokenizer, text encoder and VAE (frozen, eval; the VAE stays fp32), and a MAGREF folder's CLIP
    `image_encoder` (in `dtype`)."""
    from diffusers import AutoencoderKLWan
    from transformers.utils import logging as hf_logging

    from ..model_folder import load_text_encoder, loading

    root = Path(model_dir)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar: a run shows the training bar only
    try:
        tokenizer, text_encoder = load_text_encoder(root, "--model", device, dtype)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    with loading(root / "vae"):
        vae = AutoencoderKLWan.from_pretrained(root, subfolder="vae", dtype=torch.float32)
    vae = vae.to(device).eval().requires_grad_(False)
    frozen = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae)
    if (root / "image_encoder").is_dir():
        from transformers import CLIPVisionModel

        with loading(root / "image_encoder"):
            image_encoder = CLIPVisionModel.from_pretrained(root / "image_encoder", dtype=dtype)
        frozen["image_encoder"] = image_encoder.to(device).eval().requires_grad_(False)
    return frozen


def load_transformer(model_dir, ref_rope: str | None = None, ref_rope_offset: int | None = None):
    """The family's transformer (fp32 master weights) from `model_dir/transformer`: KaleidoTransformer3DModel
    (Wan2.1 folders load too), or MAGREF's diffusers WanTransformer3DModel."""
    from ..model_folder import facts, loading

    overrides = {}
    if ref_rope is not None:
        overrides["ref_rope"] = ref_rope
    if ref_rope_offset is not None:
        overrides["ref_rope_offset"] = ref_rope_offset
    root = Path(model_dir)
    cls = facts(root).family.transformer_class()
    with loading(root / "transformer"):
        return cls.from_pretrained(root, subfolder="transformer", dtype=torch.float32, **overrides)


def build_model(cfg: TrainConfig, rt: Runtime):
    """(transformer, peft LoraConfig or None, full state dict on rank 0 under torchrun else None).

    One process: the loaded model. Under torchrun only rank 0 reads the weights (and initialises LoRA); every
    rank builds the model on the meta device, and `materialize_from_rank0` fills each rank's shards after
    `fully_shard` — so host memory holds one full copy per node's rank 0, not one per process.
    """
    from .lora import add_lora

    def with_lora(model):
        if cfg.lora.rank > 0:
            return add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules)
        return None

    if not rt.dims.distributed:
        model = load_transformer(cfg.model.path, cfg.model.ref_rope, cfg.model.ref_rope_offset)
        return model, with_lora(model), None
    full_state = None
    cls = family(cfg).transformer_class()
    if rt.is_main:
        loaded = load_transformer(cfg.model.path, cfg.model.ref_rope, cfg.model.ref_rope_offset)
        with_lora(loaded)
        full_state = loaded.state_dict()
        config = dict(loaded.config)
        del loaded
    else:
        config = dict(cls.load_config(cfg.model.path, subfolder="transformer"))
        if cfg.model.ref_rope is not None:
            config["ref_rope"] = cfg.model.ref_rope
        if cfg.model.ref_rope_offset is not None:
            config["ref_rope_offset"] = cfg.model.ref_rope_offset
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers real (see materialize_from_rank0)
        model = cls.from_config(config)
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
    """Allocate the (sharded, meta) parameters on `device` and broadcast rank 0's weights into them.

    Buffers are kept as the constructor computed them: non-persistent ones (diffusers Wan's RoPE tables) are in no
    state dict, and `to_empty` would leave them uninitialised."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, b in buffers.items():
            model.get_buffer(name).copy_(b)
    set_model_state_dict(
        model, full_state or {}, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )


def owned_folder(folder: Path, made_by: str, rt: Runtime):
    """The main process writes `folder` (see `fileio.output_folder`); the others write into it once it exists."""
    from ..fileio import output_folder

    return output_folder(folder, made_by) if rt.is_main else contextlib.nullcontext(folder)

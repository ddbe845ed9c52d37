"""Making the built-in small model: recipe, random init of the real classes, VAE training, trainer config, assembly.

The transformer is trained by the project's own `kaleido-s2v train`; everything else it needs is here:
`init_model` writes a diffusers `KaleidoPipeline` folder at the recipe's sizes (ByT5 tokenizer, UMT5 text
encoder, AutoencoderKLWan, KaleidoTransformer3DModel, flow-matching scheduler), `train_vae` teaches the VAE
the toy world (clips and reference images rendered on the fly) and stores the measured latent statistics in
its config, `train_text` teaches the text encoder the captions' words, `train_config` writes the trainer's
YAML, `assemble` puts the trained transformer into the folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserInputError
from ..fileio import atomic_path, claim_folder, folder_owner, output_folder, record_files, write_text_atomic
from ..release import SHIFT

logger = logging.getLogger(__name__)

RECIPE_PATH = Path(__file__).resolve().parent / "recipe.yaml"
# What the toy's commands write: each signs its folder (marker) or file, so a rerun may replace it.
MADE_BY = {c: f"kaleido_s2v.toy {c}" for c in
           ("make-data", "make-eval", "init-model", "assemble", "generate", "evaluate", "train-config", "reproduce")}
# Keys the code reads with [] (so a recipe must have them), and the type each must have; the rest have defaults.
RECIPE_KEYS = {
    "data": dict, "data.num": int, "data.seed": int, "data.size": int, "data.frames": int, "data.fps": (int, float),
    "data.mix": (str, list), "eval": dict, "eval.num": int, "eval.seed": int,
    "text_encoder": dict, "text_encoder.d_model": int, "vae": dict, "vae.dim_mult": list,
    "vae.temperal_downsample": list, "transformer": dict, "transformer.text_dim": int, "transformer.patch_size": list,
    "vae_training": dict, "vae_training.steps": int, "vae_training.lr": (int, float),
    "vae_training.image_fraction": (int, float), "vae_training.batch_size": int, "vae_training.kl_weight": (int, float),
    "vae_training.stats_clips": int, "text_training": dict, "text_training.steps": int,
    "text_training.lr": (int, float), "text_training.batch_size": int, "text_training.mask_prob": (int, float),
    "train": dict, "train.run": dict, "train.run.max_steps": int, "generation": dict,
}


def load_recipe(path=None) -> dict[str, Any]:
    """The recipe YAML (default: the shipped one), checked for every key the stages need (`RECIPE_KEYS`)."""
    from ..fileio import read_mapping

    path = Path(path) if path else RECIPE_PATH
    recipe = read_mapping(path, "recipe", f"the sections of {RECIPE_PATH.name}")
    for key, kind in RECIPE_KEYS.items():
        value = recipe
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            raise UserInputError(f"recipe '{path}' has no '{key}': add it (see {RECIPE_PATH})")
        if not isinstance(value, kind) or isinstance(value, bool):
            names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise UserInputError(f"recipe '{path}': '{key}' must be {names}, got {value!r}")
    return recipe


def build_components(recipe: dict, seed: int | None = None) -> dict:
    """Random-init components at the recipe's sizes (`KaleidoPipeline(**components)`)."""
    if recipe["text_encoder"]["d_model"] != recipe["transformer"]["text_dim"]:
        raise UserInputError("recipe: text_encoder.d_model must equal transformer.text_dim")
    v = recipe["vae"]
    if len(v["temperal_downsample"]) != len(v["dim_mult"]) - 1:
        raise UserInputError("recipe: vae.temperal_downsample needs one entry per downsampling (len(dim_mult) - 1)")
    if v.get("scale_factor_spatial", 8) != 2 ** len(v["temperal_downsample"]):  # diffusers does not derive it
        raise UserInputError(f"recipe: vae.scale_factor_spatial must be {2 ** len(v['temperal_downsample'])}, "
                             "the VAE's spatial stride (2 per downsampling)")
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel

    from ..transformer import KaleidoTransformer3DModel

    seed = recipe.get("seed", 0) if seed is None else seed
    try:
        torch.manual_seed(seed)
        text_encoder = UMT5EncoderModel(UMT5Config(**recipe["text_encoder"])).eval()
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**recipe["vae"])
        torch.manual_seed(seed + 2)
        t = dict(recipe["transformer"])
        t["patch_size"] = tuple(t["patch_size"])
        transformer = KaleidoTransformer3DModel(**t)
    except (TypeError, ValueError) as e:  # an unknown or ill-typed key of a component's section
        raise UserInputError(f"recipe: a component cannot be built from its section ({e})") from None
    return dict(tokenizer=ByT5Tokenizer(), text_encoder=text_encoder, vae=vae, transformer=transformer,
                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT))


def init_model(out, recipe: dict, seed: int | None = None, *, overwrite: bool = False) -> Path:
    """Write a randomly initialised pipeline folder (plus generation_defaults.json and the recipe used)."""
    out = Path(out)
    claim_folder(out, "--out", MADE_BY["init-model"], overwrite=overwrite, replace=True)
    components = build_components(recipe, seed)
    from ..model_folder import GENERATION_DEFAULTS_FILE
    from ..pipeline import KaleidoPipeline

    pipe = KaleidoPipeline(**components)
    with atomic_path(out, is_dir=True, made_by=MADE_BY["init-model"], overwrite=overwrite) as tmp:
        pipe.save_pretrained(tmp)
        (tmp / GENERATION_DEFAULTS_FILE).write_text(json.dumps(recipe["generation"], indent=1) + "\n")
        (tmp / "toy_recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return out


def default_device() -> str:
    """Where the toy's own loops run: the GPU when torch sees one (`CUDA_VISIBLE_DEVICES=` keeps the CPU)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def world_config(recipe: dict, caption_style: str = "full"):
    """The `WorldConfig` of the recipe's `data` block (what make-data is given)."""
    from .world import WorldConfig

    d = recipe["data"]
    return WorldConfig(height=d["size"], width=d.get("width") or d["size"], frames=d["frames"], fps=d["fps"],
                       ref_size=d.get("ref_size", 64), caption_style=caption_style)


def _to_pixels(frames: np.ndarray):
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1]."""
    import torch

    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def _render_pool(recipe: dict, first: int, num: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """`num` clips (F, H, W, 3) and one reference image each (fitted into the frame, as the pipeline does)."""
    from PIL import Image

    from ..references import fit_reference
    from .world import REF_KINDS, training_clip

    cfg = replace(world_config(recipe), ref_size=recipe["data"]["size"])
    seed = recipe.get("seed", 0) + 7919  # not the training set's clips
    clips, refs = [], []
    for i in range(first, first + num):
        _, _, frames, images, _ = training_clip(seed, i, cfg, REF_KINDS[i % len(REF_KINDS)])
        ref = images[i % len(images)]
        if ref.shape[:2] != frames.shape[1:3]:
            ref = np.asarray(fit_reference(Image.fromarray(ref), *frames.shape[1:3]))
        clips.append(frames)
        refs.append(ref)
    return clips, refs


def _crop_batch(pool: np.ndarray, rng: np.random.Generator, batch: int, frames: int, crop: int):
    """Random clips of a (N, F, H, W, 3) pool: a `frames` window, a `crop`-pixel square, random flips."""
    import torch

    n, f, h, w, _ = pool.shape
    out = []
    for _ in range(batch):
        t0, y0, x0 = rng.integers(0, f - frames + 1), rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        x = pool[rng.integers(n), t0 : t0 + frames, y0 : y0 + crop, x0 : x0 + crop]
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
        out.append(_to_pixels(np.ascontiguousarray(x)))
    return torch.stack(out)


def _reconstruction_loss(rec, x, subject_weight: float = 1.0):
    """L1 + MSE, with saturated (subject) pixels weighted `subject_weight` times.

    Subjects are a small share of the pixels and the only saturated ones (catalogue: chroma >= 75 against
    <= 40 for backgrounds); without the weight the loss is dominated by backgrounds and subject colours are
    learned last.
    """
    err = (rec - x).abs()
    err = err + err**2
    if subject_weight != 1.0:
        chroma = x.amax(1, keepdim=True) - x.amin(1, keepdim=True)  # in [0, 2] for pixels in [-1, 1]
        w = 1.0 + (subject_weight - 1.0) * (chroma > 2 * 57 / 255).float()  # halfway between 40 and 75
        return (err * w).sum() / (w.sum() * x.shape[1])
    return err.mean()


def _toy_model(model_dir, components) -> Path:
    """A folder `init-model` wrote (its parts are replaced in place), checked whole; else one line naming it."""
    from ..model_folder import check_model_folder

    model_dir = check_model_folder(model_dir, "--model", components=components, index=False)
    if folder_owner(model_dir) not in (MADE_BY["init-model"], MADE_BY["assemble"]):
        raise UserInputError(f"--model '{model_dir}' was not made by {MADE_BY['init-model']}: this command rewrites "
                             f"its {'/, '.join(components)}/ in place, so give a folder init-model wrote")
    return model_dir


def train_vae(model_dir, recipe: dict, *, steps: int | None = None, progress: bool = True,
              device: str | None = None) -> dict:
    """Train the folder's VAE on the toy world (L1 + MSE reconstruction + small KL), then store latent stats.

    Training samples are random crops (`crop` px, `frames` frames: 1 + a multiple of the temporal stride) of
    a pool of rendered clips and reference images: a convolutional VAE learns the same thing from 32x32 crops
    of 9-frame windows as from whole 64x64 clips, at about a third of the cost (docs/toy.md).
    The folder's `vae/` is rewritten every `save_every` steps, so a long run can be stopped and still used.
    """
    import math

    import torch
    from diffusers import AutoencoderKLWan
    from tqdm import tqdm

    model_dir = _toy_model(model_dir, ("vae",))
    vt = recipe["vae_training"]
    steps = vt["steps"] if steps is None else steps
    device = device or default_device()
    crop, frames, warmup = vt.get("crop", recipe["data"]["size"]), vt.get("frames", recipe["data"]["frames"]), vt.get("warmup_steps", 0)
    torch.set_flush_denormal(True)  # CPU: denormal floats are slow (suspected in a late-run slowdown of 1.6x)
    vae = AutoencoderKLWan.from_pretrained(model_dir, subfolder="vae").to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=vt["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps)))))
    t0 = time.time()
    clips, refs = _render_pool(recipe, 0, vt.get("pool_clips", 1024))
    clip_pool, image_pool = np.stack(clips), np.stack(refs)[:, None]
    del clips, refs
    rng = np.random.default_rng(recipe.get("seed", 0))
    history = []

    def save():
        vae.eval()
        with atomic_path(model_dir / "vae", is_dir=True) as tmp:
            vae.save_pretrained(tmp)
        vae.train()

    bar = tqdm(range(steps), desc="train-vae", disable=not progress)
    for step in bar:
        images = (step % 10) < round(10 * vt["image_fraction"])
        b = vt["batch_size"]
        x = (_crop_batch(image_pool, rng, b * frames, 1, crop) if images
             else _crop_batch(clip_pool, rng, b, frames, crop)).to(device)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        recon = _reconstruction_loss(rec, x, vt.get("subject_weight", 1.0))
        kl = posterior.kl().mean() / x[0].numel()
        loss = recon + vt["kl_weight"] * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        history.append({"step": step, "loss": loss.item(), "recon": recon.item(), "images": bool(images)})
        if (step + 1) % 50 == 0:
            bar.set_postfix(recon=f"{np.mean([h['recon'] for h in history[-50:]]):.4f}", refresh=False)
        if vt.get("save_every") and (step + 1) % vt["save_every"] == 0 and step + 1 < steps:
            save()
    vae.eval()
    mean, std = latent_stats(vae, recipe, vt["stats_clips"], device)
    vae.register_to_config(latents_mean=mean, latents_std=std)
    save()
    summary = {"steps": steps, "seconds": time.time() - t0, "last": history[-1] if history else None,
               "latents_mean": mean, "latents_std": std}
    write_text_atomic(model_dir / "vae_training.json", json.dumps({"summary": summary, "history": history}) + "\n")
    record_files(model_dir)
    return summary


def train_text(model_dir, data_dir, recipe: dict, *, steps: int | None = None, progress: bool = True,
               device: str | None = None) -> dict:
    """Teach the folder's UMT5 encoder the world's words: byte-level masked language modelling on the captions.

    A random encoder gives every caption nearly the same states, and the transformer (which, like the
    release's, trains with the encoder frozen) then barely uses its captions; a real T5 knows the words. Here a
    share of the caption bytes is replaced by a sentinel id and a linear head (discarded) predicts them from
    the encoder's last states. docs/toy.md has the measurements.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers import AutoTokenizer, UMT5EncoderModel

    from ..training.data import discover_samples

    model_dir = _toy_model(model_dir, ("text_encoder", "tokenizer"))
    captions = [s.caption for s in discover_samples(data_dir) if s.caption]  # what the trainer will read
    if not captions:
        raise UserInputError(f"--data '{data_dir}' has no captions: give the transformer's training data")
    tt = recipe["text_training"]
    steps = tt["steps"] if steps is None else steps
    device = device or default_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(model_dir / "text_encoder").to(device).train()
    torch.manual_seed(recipe.get("seed", 0) + 3)
    head = torch.nn.Linear(encoder.config.d_model, encoder.config.vocab_size).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=tt["lr"], weight_decay=tt.get("weight_decay", 0.0))
    mask_id = encoder.config.vocab_size - 1  # ByT5's last sentinel, never produced by the captions' bytes
    specials = torch.tensor(tokenizer.all_special_ids)
    rng = np.random.default_rng(recipe.get("seed", 0) + 3)
    gen = torch.Generator().manual_seed(recipe.get("seed", 0) + 3)
    t0, history = time.time(), []
    bar = tqdm(range(steps), desc="train-text", disable=not progress)
    for step in bar:
        batch = [captions[i] for i in rng.integers(0, len(captions), tt["batch_size"])]
        tokens = tokenizer(batch, padding="longest", return_tensors="pt")
        ids, attention = tokens.input_ids, tokens.attention_mask
        masked = (torch.rand(ids.shape, generator=gen) < tt["mask_prob"]) & (attention > 0) & ~torch.isin(ids, specials)
        states = encoder(ids.masked_fill(masked, mask_id).to(device), attention.to(device)).last_hidden_state
        logits = head(states)[masked.to(device)]
        loss = F.cross_entropy(logits, ids[masked].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1).cpu() == ids[masked]).float().mean().item()
        history.append({"step": step, "loss": loss.item(), "accuracy": acc})
        if (step + 1) % 50 == 0:
            recent = history[-50:]
            bar.set_postfix(loss=f"{np.mean([h['loss'] for h in recent]):.3f}",
                            acc=f"{np.mean([h['accuracy'] for h in recent]):.3f}", refresh=False)
    encoder.eval()
    with atomic_path(model_dir / "text_encoder", is_dir=True) as tmp:
        encoder.save_pretrained(tmp)
    recent = history[-50:]
    summary = {"steps": steps, "seconds": time.time() - t0, "captions": len(captions),
               "loss": float(np.mean([h["loss"] for h in recent])) if recent else None,
               "accuracy": float(np.mean([h["accuracy"] for h in recent])) if recent else None}
    write_text_atomic(model_dir / "text_training.json", json.dumps({"summary": summary, "history": history}) + "\n")
    record_files(model_dir)
    return summary


def latent_stats(vae, recipe: dict, clips: int, device: str = "cpu") -> tuple[list[float], list[float]]:
    """Per-channel mean / std of posterior means over rendered clips (what normalisation should undo)."""
    import torch

    zs = []
    with torch.no_grad():
        for k in range(max(1, clips // 8)):
            x = torch.stack([_to_pixels(c) for c in _render_pool(recipe, 8 * (100_000 + k), 8)[0]]).to(device)
            zs.append(vae.encode(x).latent_dist.mode().transpose(0, 1).reshape(vae.config.z_dim, -1))
    z = torch.cat(zs, dim=1)
    return [float(v) for v in z.mean(1)], [float(v) for v in z.std(1).clamp_min(1e-3)]


def train_config(recipe: dict, *, model: str, data: str, output: str) -> str:
    """The `kaleido-s2v train --config` YAML for the transformer."""
    import yaml

    cfg = json.loads(json.dumps(recipe["train"]))
    cfg.setdefault("model", {})["path"] = str(Path(model).resolve())
    cfg.setdefault("data", {})["path"] = str(Path(data).resolve())
    cfg.setdefault("run", {})["output"] = str(Path(output).resolve())
    return f"# made_by: {MADE_BY['train-config']}\n" + yaml.safe_dump(cfg, sort_keys=False)


def assemble(model_dir, transformer_dir, out, *, transformer_dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Copy the model folder with the trained transformer (a trainer's `final/transformer`) into `out`, without
    the training logs (`vae_training.json`, `text_training.json`).

    `transformer_dtype="fp16"` stores the transformer's weights in half precision (half the bytes, to fit the
    package's size budget); diffusers loads them back into the fp32 model.
    """
    from safetensors.torch import load_file, save_file

    from ..model_folder import check_component, check_model_folder

    model_dir, transformer_dir, out = Path(model_dir), Path(transformer_dir), Path(out)
    check_model_folder(model_dir, "--model", components=("vae", "text_encoder", "tokenizer", "scheduler"))
    if not transformer_dir.is_dir():
        raise UserInputError(f"--transformer '{transformer_dir}' is not a folder: give the run's final/transformer")
    check_component(transformer_dir.parent, transformer_dir.name, "--transformer")
    if transformer_dtype not in ("fp32", "fp16"):
        raise UserInputError(f"--transformer-dtype {transformer_dtype!r}: choose fp32 or fp16")
    claim_folder(out, "--out", MADE_BY["assemble"], overwrite=overwrite, replace=True)
    with atomic_path(out, is_dir=True, made_by=MADE_BY["assemble"], overwrite=overwrite) as tmp:
        shutil.copytree(model_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*_training.json"))
        shutil.rmtree(tmp / "transformer")
        shutil.copytree(transformer_dir, tmp / "transformer")
        if transformer_dtype == "fp16":
            for path in (tmp / "transformer").glob("*.safetensors"):
                weights = load_file(path)
                save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path,
                          metadata={"format": "pt"})
    return out


def generate_cases(model_dir, cases_dir, out_dir, *, steps: int | None = None, guidance: float | None = None,
                   seed: int = 0, limit: int | None = None, shuffle_refs: int | None = None,
                   progress: bool = True, device: str | None = None, overwrite: bool = False) -> dict:
    """Generate `<clip_id>.mp4` for every evaluation case (its caption and reference images) with a model folder.

    With `shuffle_refs` (a seed), case k gets the references of another case (a seeded derangement): the
    generation-side control. Scored against case k, it shows how much of the recall the caption alone gives.
    """
    from tqdm import tqdm

    from ..model_folder import generation_defaults, load_pipeline, resolve_model_folder
    from .evaluator import shuffled
    from .world import read_scenes

    model_dir = resolve_model_folder(model_dir, "--model")
    records = read_scenes(cases_dir)[:limit]
    out_dir = Path(out_dir)
    claim_folder(out_dir, "--out", MADE_BY["generate"], overwrite=overwrite)
    ref_from = shuffled(len(records), shuffle_refs) if shuffle_refs is not None else list(range(len(records)))
    defaults = generation_defaults(model_dir)
    pipe = load_pipeline(model_dir, "--model").to(device or default_device())
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    with output_folder(out_dir, MADE_BY["generate"]):
        for k, r in enumerate(tqdm(records, desc="generating", disable=not progress)):
            _generate_case(pipe, r, records[ref_from[k]], cases_dir, out_dir, defaults, steps, guidance, seed + k)
    return {"videos": str(out_dir), "cases": len(records), "seconds": time.time() - t0,
            "references_from": [records[j]["clip_id"] for j in ref_from]}


def _generate_case(pipe, r: dict, ref_record: dict, cases_dir, out_dir: Path, defaults: dict, steps, guidance,
                   seed: int) -> None:
    """`<clip_id>.mp4` for one case, with the references of `ref_record` (the case itself, or the control's)."""
    import torch

    from ..video_io import write_video

    scene = r["scene"]
    refs = [Path(cases_dir) / info["path"] for info in ref_record["references"]]
    video = pipe(
        prompt=r["caption"], reference_images=refs, height=scene["height"], width=scene["width"],
        num_frames=scene["frames"], num_inference_steps=steps if steps is not None else defaults.get("num_inference_steps", 20),
        guidance_scale=guidance if guidance is not None else defaults.get("guidance_scale", 4.0),
        max_sequence_length=defaults.get("max_sequence_length", 512), negative_prompt=defaults.get("negative_prompt"),
        generator=torch.Generator().manual_seed(seed), output_type="np",
    ).frames[0]
    write_video(out_dir / f"{r['clip_id']}.mp4", video, fps=scene["fps"])

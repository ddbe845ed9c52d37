"""LoRA files for `kaleido-s2v generate --lora FILE[:SCALE]`, on `KaleidoPipeline` and `MagrefPipeline`.

Formats (`detect_format`), all read from `.safetensors` only (no pickled `.pt`/`.pth`/`.ckpt`: convert them
with `safetensors.torch.save_file` first):

- "diffusers": PEFT names of `WanTransformer3DModel`, `[transformer.]blocks.0.attn1.to_q.lora_A.weight`.
  Loaded as is by diffusers' `WanLoraLoaderMixin.load_lora_weights`.
- "wan": original Wan names, `diffusion_model.blocks.0.self_attn.q.lora_down.weight` / `.lora_up.weight` /
  `.alpha`, also the `lora_A` / `lora_B`, `.diff_b` and `head.head.diff` keys LightX2V and CausVid ship.
  Converted by diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` (via `WanLoraLoaderMixin.lora_state_dict`),
  which folds `alpha / rank` into the weights.
- "kohya": kohya / musubi-tuner names, `lora_unet_blocks_0_self_attn_q.lora_down.weight`, `.alpha`. Renamed here
  to Wan names by matching against this transformer's modules, then converted as "wan".

Strict: every key must land on a module of the transformer with matching shapes, or the file is refused
(diffusers and peft only warn about unexpected keys). Keys diffusers would drop silently (norm `.diff`s, weight
`.diff`s, bias-only modules) are accepted only when all zero, since dropping them then changes nothing.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .errors import UserInputError

# The module table of diffusers' `_convert_non_diffusers_wan_lora_to_diffusers` (Wan name -> diffusers name).
# Used only to check keys against the transformer and to parse kohya names; diffusers converts the weights.
_WAN_BLOCK = {
    **{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
    **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ["to_q", "to_k", "to_v", "to_out.0"])},
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_WAN_TOP = {
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
}
_WAN_NAMES = re.compile(
    r"(blocks\.\d+\.(self_attn|cross_attn|ffn\.\d|norm3)|head\.head|time_projection|img_emb"
    r"|text_embedding|time_embedding)\."
)
_DIFFUSERS_NAMES = re.compile(r"(blocks\.\d+\.(attn1|attn2|ffn\.net)|condition_embedder|proj_out)\.")
_WAN_SUFFIXES = ("lora_down.weight", "lora_up.weight", "lora_A.weight", "lora_B.weight", "alpha", "diff_b", "diff")
_DIFFUSERS_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector")
_PEFT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def parse_lora_spec(spec: str) -> tuple[Path, float]:
    """Parse `--lora` "FILE" (scale 1.0) or "FILE:SCALE" (split on the last colon only if what follows is a number)."""
    path, scale = Path(spec), 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and not path.is_file():
        try:
            path, scale = Path(head), float(tail)
        except ValueError:
            if Path(head).is_file():
                raise UserInputError(
                    f"--lora {spec}: scale {tail!r} is not a number; give FILE or FILE:SCALE"
                ) from None
    if not path.is_file():
        raise UserInputError(f"--lora {spec}: no file {str(path)!r}; give an existing .safetensors file, FILE[:SCALE]")
    if path.suffix.lower() != ".safetensors":
        raise UserInputError(
            f"--lora {spec}: only .safetensors LoRA files are read; convert {path.name} with "
            "safetensors.torch.save_file"
        )
    if not math.isfinite(scale):
        raise UserInputError(f"--lora {spec}: scale {scale} is not finite; give a number such as 0.8")
    return path, scale


def detect_format(state_dict: dict[str, torch.Tensor], file: str | Path = "LoRA file") -> str:
    """Format of the keys: "diffusers", "wan" or "kohya" (module docstring); anything else is a UserInputError."""
    keys = list(state_dict)
    if not keys:
        raise UserInputError(f"LoRA file {file}: holds no tensors")
    if all(k.startswith("lora_unet_") for k in keys):
        return "kohya"
    bare = [_strip(k, "diffusion_model.", "transformer.", "base_model.model.") for k in keys]
    if any(k.startswith("diffusion_model.") for k in keys) or any(_WAN_NAMES.match(k) for k in bare):
        return "wan"
    if any(_DIFFUSERS_NAMES.match(k) for k in bare) and any(".lora_A." in k for k in bare):
        return "diffusers"
    raise UserInputError(
        f"LoRA file {file}: unknown key format (e.g. {keys[0]!r}); expected diffusers "
        "(blocks.0.attn1.to_q.lora_A.weight), Wan (diffusion_model.blocks.0.self_attn.q.lora_down"
        ".weight) or kohya (lora_unet_blocks_0_self_attn_q.lora_down.weight) names"
    )


def load_loras(pipe, specs: list[str]) -> list[dict]:
    """Load each `--lora FILE[:SCALE]` as its own adapter; activate exactly these, with their scales.

    Every file is read, converted and checked before any is loaded, so a bad file leaves the pipeline as it was.
    Returns one record per file: {"file", "scale", "format", "adapter", "modules"}.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    transformer = pipe.transformer
    taken = set(getattr(transformer, "peft_config", None) or {})
    prepared = []
    for spec in specs:
        path, scale = parse_lora_spec(spec)
        try:
            state_dict = load_file(path)
        except (SafetensorError, OSError) as e:
            raise UserInputError(f"--lora {spec}: cannot read {path}: {str(e).split(chr(10))[0]}") from None
        fmt = detect_format(state_dict, path)
        converted = _to_diffusers(pipe, state_dict, fmt, path)
        name = base = re.sub(r"\W", "_", path.stem) or "lora"
        for i in range(2, len(taken) + 3):
            if name not in taken:
                break
            name = f"{base}_{i}"
        taken.add(name)
        modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
        prepared.append(
            (converted, {"file": str(path), "scale": scale, "format": fmt, "adapter": name, "modules": len(modules)})
        )
    if not prepared:
        return []
    loaded = []
    try:
        for converted, record in prepared:
            pipe.load_lora_weights(converted, adapter_name=record["adapter"])
            loaded.append(record["adapter"])
        pipe.set_adapters(loaded, adapter_weights=[r["scale"] for _, r in prepared])
    except BaseException:
        if loaded:
            pipe.delete_adapters(loaded)
        raise
    return [record for _, record in prepared]


def unload_loras(pipe) -> None:
    """Remove every LoRA (diffusers' `unload_lora_weights`): the base modules come back as they were."""
    pipe.unload_lora_weights()


# ------------------------------------------------------------------------------------------------ conversion
def _strip(key: str, *prefixes: str) -> str:
    for p in prefixes:
        key = key.removeprefix(p)
    return key


def _split(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    for s in suffixes:
        if key.endswith("." + s):
            return key[: -len(s) - 1], s
    return None


def _wan_modules(transformer) -> dict[str, nn.Module]:
    """Wan name -> module, for every module of `_WAN_BLOCK` / `_WAN_TOP` this transformer has."""
    named = dict(transformer.named_modules())
    table = dict(_WAN_TOP)
    for i in range(len(transformer.blocks)):
        table.update({f"blocks.{i}.{w}": f"blocks.{i}.{d}" for w, d in _WAN_BLOCK.items()})
    return {w: named[d] for w, d in table.items() if d in named}


def _to_diffusers(pipe, state_dict, fmt: str, file: Path) -> dict[str, torch.Tensor]:
    transformer = pipe.transformer
    if fmt == "diffusers":
        sd = {_strip(k, "transformer.", "base_model.model."): v for k, v in state_dict.items()}
    else:
        wan_modules = _wan_modules(transformer)
        if fmt == "kohya":
            # Our own code: diffusers' `_convert_musubi_wan_lora_to_diffusers` needs every block's attention and
            # FFN layers (KeyError otherwise) and nothing outside the blocks. Names are matched against the
            # transformer's modules, since they contain underscores themselves (self_attn, k_img, ffn_0).
            flat = {w.replace(".", "_"): w for w in wan_modules}
            sd, names = {}, {}
            for key, value in state_dict.items():
                module, _, suffix = key.removeprefix("lora_unet_").partition(".")
                if module not in flat:
                    raise UserInputError(f"LoRA file {file}: key {key!r} matches no module of the transformer")
                sd[f"{flat[module]}.{suffix}"] = value
                names[f"{flat[module]}.{suffix}"] = key
            original = names.get
        else:
            prefixed = any(k.startswith("diffusion_model.") for k in state_dict)
            sd = {k.removeprefix("diffusion_model."): v for k, v in state_dict.items()}

            def original(key):
                return f"diffusion_model.{key}" if prefixed else key

        sd = _check_wan(sd, wan_modules, file, original)
        try:  # diffusers' `_convert_non_diffusers_wan_lora_to_diffusers`, as `load_lora_weights` would call it
            sd = pipe.lora_state_dict({f"diffusion_model.{k}": v for k, v in sd.items()})
        except (ValueError, KeyError) as e:
            raise UserInputError(
                f"LoRA file {file}: diffusers' Wan LoRA converter refused it: {str(e).split(chr(10))[0][:200]}"
            ) from None
        sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    modules = {n: m for n, m in transformer.named_modules() if isinstance(m, _PEFT_LAYERS)}
    groups = _groups(sd, _DIFFUSERS_SUFFIXES, modules, file, str)
    if any("lora_B.bias" in g for g in groups.values()):
        # Our own code: diffusers turns on peft's lora_bias for every layer of the adapter if any has one, and
        # leaves the others' biases unloaded (on the meta device); a zero bias is the same as none.
        for module, group in groups.items():
            if "lora_B.bias" not in group and "lora_B.weight" in group:
                sd[f"{module}.lora_B.bias"] = group["lora_B.weight"].new_zeros(group["lora_B.weight"].shape[0])
    for module, group in groups.items():
        _check_shapes(
            file,
            module,
            modules[module],
            group.get("lora_A.weight"),
            group.get("lora_B.weight"),
            group.get("lora_B.bias"),
        )
    return {f"transformer.{k}": v for k, v in sd.items()}


def _groups(sd, suffixes, modules, file, original) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {suffix: tensor}}; a key with another suffix or on no module is a UserInputError."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        parts = _split(key, suffixes)
        if parts is None:
            raise UserInputError(
                f"LoRA file {file}: key {original(key)!r} is not a LoRA weight this loader reads "
                f"(.{', .'.join(suffixes)})"
            )
        if parts[0] not in modules:
            raise UserInputError(f"LoRA file {file}: key {original(key)!r} matches no module of the transformer")
        groups.setdefault(parts[0], {})[parts[1]] = value
    return groups


def _refuse_nonzero(file, key, value) -> None:
    if value.count_nonzero():
        raise UserInputError(
            f"LoRA file {file}: key {key!r} is not zero and diffusers cannot apply it (it loads "
            "lora_down/lora_up pairs with their alpha and diff_b; all-zero extras are skipped)"
        )


def _check_wan(sd, modules, file, original) -> dict[str, torch.Tensor]:
    """Check Wan-named keys; fold `alpha` outside the blocks; drop the all-zero keys diffusers would drop."""
    for key in [k for k in sd if "norm" in k and k.endswith((".diff", ".diff_b"))]:
        _refuse_nonzero(file, original(key), sd.pop(key))  # diffusers drops norm diffs
    out = {}
    for module, group in _groups(sd, _WAN_SUFFIXES, modules, file, original).items():
        down = group.get("lora_down.weight", group.get("lora_A.weight"))
        up = group.get("lora_up.weight", group.get("lora_B.weight"))
        # diffusers maps head.head.diff (+ diff_b) to a LoRA (LightX2V) and drops every other weight diff
        head_diff = module == "head.head" and down is None and {"diff", "diff_b"} <= set(group)
        if (down is None or up is None) and not head_diff:
            keep = {}  # diffusers cannot load a module without both LoRA matrices
        else:
            keep = {s: v for s, v in group.items() if s != "diff" or head_diff}
        for suffix, value in group.items():
            if suffix not in keep:
                _refuse_nonzero(file, original(f"{module}.{suffix}"), value)
        if not keep:
            continue
        _check_shapes(file, original(module), modules[module], down, up, group.get("diff_b"))
        if "alpha" in keep and not module.startswith("blocks."):
            # Our own code: diffusers' converter folds alpha / rank only for block layers (an alpha elsewhere
            # makes it raise), so fold it into lora_down here, the same way.
            down_key = "lora_down.weight" if "lora_down.weight" in keep else "lora_A.weight"
            keep[down_key] = keep[down_key] * (keep.pop("alpha").item() / down.shape[0])
        out.update({f"{module}.{s}": v for s, v in keep.items()})
    return out


def _check_shapes(file, name, module, down, up, bias=None) -> None:
    if not isinstance(module, nn.Linear):
        return
    out_f, in_f = module.out_features, module.in_features
    bad = bias is not None and tuple(bias.shape) != (out_f,)
    if down is not None and up is not None:
        bad = bad or down.ndim != 2 or down.shape[1] != in_f or tuple(up.shape) != (out_f, down.shape[0])
    if bad:
        shapes = ", ".join(str(tuple(t.shape)) for t in (up, down, bias) if t is not None)
        raise UserInputError(
            f"LoRA file {file}: {name} has LoRA shapes {shapes} but the transformer's layer is "
            f"{out_f} x {in_f} (a LoRA for another model size?)"
        )

"""The one adapter owning the DiT weight names: SAT (official Kaleido) ↔ Wan2.1 original (T2V, I2V) ↔ diffusers.

Every name is an explicit table entry (reference/kaleido-official.md §5.2); nothing is matched by substring.
A source key maps to one diffusers key, or — for SAT's fused projections — to several, split evenly along
dim 0 in the listed order (q, k, v for self-attention; k, v for cross-attention). The inverse direction
(`diffusers_to_sat`, `diffusers_to_wan`) concatenates in the same order; the converter, the trainer's export and
the tests all use these tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SAT_PREFIX = "model.diffusion_model."
WAN_OPTIONAL_PREFIX = "model.diffusion_model."

# ---- global (non-layer) keys: source -> diffusers
SAT_GLOBAL: dict[str, tuple[str, ...]] = {
    "mixins.patch_embed.proj.weight": ("patch_embedding.weight",),
    "mixins.patch_embed.proj.bias": ("patch_embedding.bias",),
    "text_embedding.0.weight": ("condition_embedder.text_embedder.linear_1.weight",),
    "text_embedding.0.bias": ("condition_embedder.text_embedder.linear_1.bias",),
    "text_embedding.2.weight": ("condition_embedder.text_embedder.linear_2.weight",),
    "text_embedding.2.bias": ("condition_embedder.text_embedder.linear_2.bias",),
    "time_embed.0.weight": ("condition_embedder.time_embedder.linear_1.weight",),
    "time_embed.0.bias": ("condition_embedder.time_embedder.linear_1.bias",),
    "time_embed.2.weight": ("condition_embedder.time_embedder.linear_2.weight",),
    "time_embed.2.bias": ("condition_embedder.time_embedder.linear_2.bias",),
    "adaln_projection.1.weight": ("condition_embedder.time_proj.weight",),
    "adaln_projection.1.bias": ("condition_embedder.time_proj.bias",),
    "mixins.final_layer.adaLN_modulation": ("scale_shift_table",),
    "mixins.final_layer.linear.weight": ("proj_out.weight",),
    "mixins.final_layer.linear.bias": ("proj_out.bias",),
}

# ---- per-layer keys ({i} = layer index): source -> diffusers
_ATTN1 = "blocks.{i}.attn1"
_ATTN2 = "blocks.{i}.attn2"
SAT_LAYER: dict[str, tuple[str, ...]] = {
    "mixins.adaln_layer.adaLN_modulations.{i}": ("blocks.{i}.scale_shift_table",),
    "transformer.layers.{i}.attention.query_key_value.weight": tuple(
        f"{_ATTN1}.to_{p}.weight" for p in ("q", "k", "v")
    ),
    "transformer.layers.{i}.attention.query_key_value.bias": tuple(f"{_ATTN1}.to_{p}.bias" for p in ("q", "k", "v")),
    "transformer.layers.{i}.attention.dense.weight": (f"{_ATTN1}.to_out.0.weight",),
    "transformer.layers.{i}.attention.dense.bias": (f"{_ATTN1}.to_out.0.bias",),
    "mixins.adaln_layer.query_layernorm_list.{i}.weight": (f"{_ATTN1}.norm_q.weight",),
    "mixins.adaln_layer.key_layernorm_list.{i}.weight": (f"{_ATTN1}.norm_k.weight",),
    "transformer.layers.{i}.cross_attention.query.weight": (f"{_ATTN2}.to_q.weight",),
    "transformer.layers.{i}.cross_attention.query.bias": (f"{_ATTN2}.to_q.bias",),
    "transformer.layers.{i}.cross_attention.key_value.weight": (f"{_ATTN2}.to_k.weight", f"{_ATTN2}.to_v.weight"),
    "transformer.layers.{i}.cross_attention.key_value.bias": (f"{_ATTN2}.to_k.bias", f"{_ATTN2}.to_v.bias"),
    "transformer.layers.{i}.cross_attention.dense.weight": (f"{_ATTN2}.to_out.0.weight",),
    "transformer.layers.{i}.cross_attention.dense.bias": (f"{_ATTN2}.to_out.0.bias",),
    "mixins.adaln_layer.cross_query_layernorm_list.{i}.weight": (f"{_ATTN2}.norm_q.weight",),
    "mixins.adaln_layer.cross_key_layernorm_list.{i}.weight": (f"{_ATTN2}.norm_k.weight",),
    # SAT post_cross_attention_layernorm = Wan norm3 = diffusers norm2 (diffusers swaps the names)
    "transformer.layers.{i}.post_cross_attention_layernorm.weight": ("blocks.{i}.norm2.weight",),
    "transformer.layers.{i}.post_cross_attention_layernorm.bias": ("blocks.{i}.norm2.bias",),
    "transformer.layers.{i}.mlp.dense_h_to_4h.weight": ("blocks.{i}.ffn.net.0.proj.weight",),
    "transformer.layers.{i}.mlp.dense_h_to_4h.bias": ("blocks.{i}.ffn.net.0.proj.bias",),
    "transformer.layers.{i}.mlp.dense_4h_to_h.weight": ("blocks.{i}.ffn.net.2.weight",),
    "transformer.layers.{i}.mlp.dense_4h_to_h.bias": ("blocks.{i}.ffn.net.2.bias",),
}

WAN_GLOBAL: dict[str, tuple[str, ...]] = {
    "patch_embedding.weight": ("patch_embedding.weight",),
    "patch_embedding.bias": ("patch_embedding.bias",),
    "text_embedding.0.weight": ("condition_embedder.text_embedder.linear_1.weight",),
    "text_embedding.0.bias": ("condition_embedder.text_embedder.linear_1.bias",),
    "text_embedding.2.weight": ("condition_embedder.text_embedder.linear_2.weight",),
    "text_embedding.2.bias": ("condition_embedder.text_embedder.linear_2.bias",),
    "time_embedding.0.weight": ("condition_embedder.time_embedder.linear_1.weight",),
    "time_embedding.0.bias": ("condition_embedder.time_embedder.linear_1.bias",),
    "time_embedding.2.weight": ("condition_embedder.time_embedder.linear_2.weight",),
    "time_embedding.2.bias": ("condition_embedder.time_embedder.linear_2.bias",),
    "time_projection.1.weight": ("condition_embedder.time_proj.weight",),
    "time_projection.1.bias": ("condition_embedder.time_proj.bias",),
    "head.modulation": ("scale_shift_table",),
    "head.head.weight": ("proj_out.weight",),
    "head.head.bias": ("proj_out.bias",),
}

WAN_LAYER: dict[str, tuple[str, ...]] = {
    "blocks.{i}.modulation": ("blocks.{i}.scale_shift_table",),
    **{
        f"blocks.{{i}}.{wan_attn}.{wan}.{wb}": (f"blocks.{{i}}.{attn}.{dif}.{wb}",)
        for wan_attn, attn in (("self_attn", "attn1"), ("cross_attn", "attn2"))
        for wan, dif in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))
        for wb in ("weight", "bias")
    },
    "blocks.{i}.self_attn.norm_q.weight": (f"{_ATTN1}.norm_q.weight",),
    "blocks.{i}.self_attn.norm_k.weight": (f"{_ATTN1}.norm_k.weight",),
    "blocks.{i}.cross_attn.norm_q.weight": (f"{_ATTN2}.norm_q.weight",),
    "blocks.{i}.cross_attn.norm_k.weight": (f"{_ATTN2}.norm_k.weight",),
    "blocks.{i}.norm3.weight": ("blocks.{i}.norm2.weight",),  # Wan norm3 (affine, cross-attn) = diffusers norm2
    "blocks.{i}.norm3.bias": ("blocks.{i}.norm2.bias",),
    "blocks.{i}.ffn.0.weight": ("blocks.{i}.ffn.net.0.proj.weight",),
    "blocks.{i}.ffn.0.bias": ("blocks.{i}.ffn.net.0.proj.bias",),
    "blocks.{i}.ffn.2.weight": ("blocks.{i}.ffn.net.2.weight",),
    "blocks.{i}.ffn.2.bias": ("blocks.{i}.ffn.net.2.bias",),
}

# ---- Wan2.1 image-to-video (e.g. Wan2.1-I2V-14B, MAGREF): the T2V keys plus the CLIP-feature branch
# (`img_emb` = MLPProj: LayerNorm, Linear, GELU, Linear, LayerNorm; per block `k_img`/`v_img`/`norm_k_img` in the
# cross-attention), named as in diffusers' `WanTransformer3DModel` (scripts/convert_wan_to_diffusers.py).
WAN_I2V_GLOBAL: dict[str, tuple[str, ...]] = {
    **WAN_GLOBAL,
    **{
        f"img_emb.proj.{wan}.{wb}": (f"condition_embedder.image_embedder.{dif}.{wb}",)
        for wan, dif in (("0", "norm1"), ("1", "ff.net.0.proj"), ("3", "ff.net.2"), ("4", "norm2"))
        for wb in ("weight", "bias")
    },
}
WAN_I2V_LAYER: dict[str, tuple[str, ...]] = {
    **WAN_LAYER,
    **{
        f"blocks.{{i}}.cross_attn.{wan}.{wb}": (f"{_ATTN2}.{dif}.{wb}",)
        for wan, dif in (("k_img", "add_k_proj"), ("v_img", "add_v_proj"))
        for wb in ("weight", "bias")
    },
    "blocks.{i}.cross_attn.norm_k_img.weight": (f"{_ATTN2}.norm_added_k.weight",),
}

# format -> (global table, per-layer table). "magref" is the layout format of the MAGREF release: a Wan2.1 I2V DiT.
TABLES = {
    "official": (SAT_GLOBAL, SAT_LAYER),
    "wan": (WAN_GLOBAL, WAN_LAYER),
    "wan_i2v": (WAN_I2V_GLOBAL, WAN_I2V_LAYER),
    "magref": (WAN_I2V_GLOBAL, WAN_I2V_LAYER),
}


def _layer_regex(layer_table: Mapping[str, tuple[str, ...]]) -> dict[str, re.Pattern]:
    return {t: re.compile("^" + re.escape(t).replace(re.escape("{i}"), r"(\d+)") + "$") for t in layer_table}


_REGEX = {fmt: _layer_regex(layer) for fmt, (_, layer) in TABLES.items()}


def count_layers(keys: Iterable[str], fmt: str) -> int:
    """Number of layers = 1 + the largest layer index found in any per-layer key (0 if none)."""
    n = 0
    for key in keys:
        for rx in _REGEX[fmt].values():
            m = rx.match(key)
            if m:
                n = max(n, int(m.group(1)) + 1)
                break
    return n


def source_to_diffusers_table(fmt: str, num_layers: int) -> dict[str, tuple[str, ...]]:
    """The full explicit table for a model with `num_layers` layers: source key -> diffusers key(s)."""
    global_table, layer_table = TABLES[fmt]
    table = dict(global_table)
    for i in range(num_layers):
        for src, dsts in layer_table.items():
            table[src.format(i=i)] = tuple(d.format(i=i) for d in dsts)
    return table


def diffusers_to_source_table(fmt: str, num_layers: int) -> dict[str, tuple[str, int, int]]:
    """Inverse table: diffusers key -> (source key, part index, number of parts along dim 0)."""
    inverse: dict[str, tuple[str, int, int]] = {}
    for src, dsts in source_to_diffusers_table(fmt, num_layers).items():
        for part, dst in enumerate(dsts):
            if dst in inverse:
                raise AssertionError(f"diffusers key {dst} is produced twice")  # a table bug, not user input
            inverse[dst] = (src, part, len(dsts))
    return inverse


def split_part(tensor, part: int, parts: int):
    """Rows [part·n/parts, (part+1)·n/parts) of a fused projection (a view: no copy of mmap'd data)."""
    if parts == 1:
        return tensor
    rows = tensor.shape[0] // parts
    return tensor[part * rows : (part + 1) * rows]


def source_to_diffusers(state_dict: Mapping[str, object], fmt: str) -> dict[str, object]:
    """Map a DiT state dict without prefix (all keys must be known; see `converter.plan_transformer` for checks)."""
    table = source_to_diffusers_table(fmt, count_layers(state_dict, fmt))
    out = {}
    for src, dsts in table.items():
        for part, dst in enumerate(dsts):
            out[dst] = split_part(state_dict[src], part, len(dsts))
    return out


def diffusers_to_source(state_dict: Mapping[str, object], fmt: str, prefix: str = "") -> dict[str, object]:
    """diffusers DiT state dict -> SAT (`fmt='official'`) or Wan (`fmt='wan'`) names; fused tensors concatenated."""
    import torch

    num_layers = 1 + max((int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")), default=-1)
    out = {}
    for src, dsts in source_to_diffusers_table(fmt, num_layers).items():
        parts = [state_dict[d] for d in dsts]
        out[prefix + src] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return out


def diffusers_to_sat(state_dict: Mapping[str, object], prefix: str = SAT_PREFIX) -> dict[str, object]:
    return diffusers_to_source(state_dict, "official", prefix)


def diffusers_to_wan(state_dict: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    return diffusers_to_source(state_dict, "wan", prefix)


def diffusers_to_wan_i2v(state_dict: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    """diffusers `WanTransformer3DModel` (image-to-video) state dict -> Wan2.1 I2V names (e.g. the MAGREF shards)."""
    return diffusers_to_source(state_dict, "wan_i2v", prefix)


# ---- umT5 encoder: Wan's own T5 (`wan/modules/t5.py`, T5Encoder with shared_pos=False) -> transformers UMT5
T5_GLOBAL: dict[str, str] = {
    "token_embedding.weight": "shared.weight",  # tied to encoder.embed_tokens.weight in UMT5EncoderModel
    "norm.weight": "encoder.final_layer_norm.weight",
}
_T5_ATTN = "encoder.block.{i}.layer.0.SelfAttention"
T5_LAYER: dict[str, str] = {
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    "blocks.{i}.attn.q.weight": "encoder.block.{i}.layer.0.SelfAttention.q.weight",
    "blocks.{i}.attn.k.weight": "encoder.block.{i}.layer.0.SelfAttention.k.weight",
    "blocks.{i}.attn.v.weight": "encoder.block.{i}.layer.0.SelfAttention.v.weight",
    "blocks.{i}.attn.o.weight": "encoder.block.{i}.layer.0.SelfAttention.o.weight",
    # umT5: every layer has its own relative position bias
    "blocks.{i}.pos_embedding.embedding.weight": f"{_T5_ATTN}.relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * GELU_tanh(gate(x)));  HF gated-gelu: wo(gelu_new(wi_0(x)) * wi_1(x))
    "blocks.{i}.ffn.gate.0.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight",
    "blocks.{i}.ffn.fc1.weight": "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight",
    "blocks.{i}.ffn.fc2.weight": "encoder.block.{i}.layer.1.DenseReluDense.wo.weight",
}
_T5_REGEX = _layer_regex(T5_LAYER)


def t5_num_layers(keys: Iterable[str]) -> int:
    n = 0
    for key in keys:
        for rx in _T5_REGEX.values():
            m = rx.match(key)
            if m:
                n = max(n, int(m.group(1)) + 1)
    return n


def t5_wan_to_hf_table(num_layers: int) -> dict[str, str]:
    table = dict(T5_GLOBAL)
    for i in range(num_layers):
        table.update({src.format(i=i): dst.format(i=i) for src, dst in T5_LAYER.items()})
    return table


def t5_hf_to_wan(state_dict: Mapping[str, object]) -> dict[str, object]:
    """UMT5EncoderModel state dict -> Wan T5Encoder names (the inverse table; used by tests and exports)."""
    num_layers = 1 + max((int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.block.")), default=-1)
    return {src: state_dict[dst] for src, dst in t5_wan_to_hf_table(num_layers).items()}

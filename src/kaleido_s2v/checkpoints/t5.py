"""umT5-xxl encoder from Wan's `.pth` (Wan's own T5 names) -> transformers `UMT5EncoderModel`; tokenizer copy.

The key table lives in `keymap` (T5_GLOBAL / T5_LAYER). The config is read from the tensor shapes; only
`relative_attention_max_distance` is not stored in the weights (Wan's T5 uses 128).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import UserInputError
from . import keymap
from .plan import check_against_model
from .shards import LazyTensor


def infer_t5_config(shapes: Mapping[str, tuple[int, ...]], num_layers: int, max_distance: int = 128):
    from transformers import UMT5Config

    vocab, d_model = shapes["token_embedding.weight"]
    num_buckets, num_heads = shapes["blocks.0.pos_embedding.embedding.weight"]
    d_attn = shapes["blocks.0.attn.q.weight"][0]
    if d_attn % num_heads:
        raise UserInputError(f"T5 attention width {d_attn} is not divisible by {num_heads} heads")
    return UMT5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=d_attn // num_heads,
        d_ff=shapes["blocks.0.ffn.fc1.weight"][0],
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=num_buckets,
        relative_attention_max_distance=max_distance,
        feed_forward_proj="gated-gelu",  # Wan: fc1(x) * GELU_tanh(gate(x)); HF gelu_new is the tanh GELU
        layer_norm_epsilon=1e-6,
        architectures=["UMT5EncoderModel"],
    )


def plan_text_encoder(
    path: Path, dtype: torch.dtype | None = None, trust_pickle: bool = False, max_distance: int = 128
):
    """Returns (LazyTensors in transformers names, UMT5Config)."""
    from transformers import UMT5EncoderModel

    from .safe_load import load_torch_file

    sd = load_torch_file(path, trust_pickle=trust_pickle)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserInputError(f"{path}: expected a state dict of tensors (Wan's umT5 encoder)")
    num_layers = keymap.t5_num_layers(sd)
    table = keymap.t5_wan_to_hf_table(num_layers)
    missing = sorted(set(table) - set(sd))
    unexpected = sorted(set(sd) - set(table))
    if unexpected or missing or not num_layers:
        which = f"unexpected keys {unexpected[:6]}" if unexpected else f"missing keys {(missing or ['blocks'])[:6]}"
        raise UserInputError(f"{path}: not Wan's umT5 encoder: {which}")
    config = infer_t5_config({k: tuple(v.shape) for k, v in sd.items()}, num_layers, max_distance)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())  # encoder.embed_tokens.weight = shared.weight
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    inverse = {dst: src for src, dst in table.items()}
    check_against_model(
        {dst: tuple(sd[src].shape) for src, dst in table.items()},
        expected,
        f"{path} (umT5)",
        source_name=lambda k: inverse.get(k, k),
    )
    tensors = [
        LazyTensor(
            dst, tuple(sd[src].shape), dtype or sd[src].dtype, lambda v=sd[src], d=dtype or sd[src].dtype: v.to(d)
        )
        for src, dst in table.items()
    ]
    return tensors, config


def load_tokenizer(src_dir: Path):
    """The release's tokenizer folder, loaded with AutoTokenizer (a bare `spiece.model` as T5TokenizerFast)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src_dir))
    except Exception as first:  # e.g. a bare sentencepiece model without tokenizer_config.json
        spm = src_dir / "spiece.model"
        if not spm.is_file():
            raise UserInputError(f"{src_dir}: tokenizer files not loadable by AutoTokenizer ({first})") from None
        from transformers import T5TokenizerFast

        try:
            return T5TokenizerFast(vocab_file=str(spm))
        except Exception as e:
            raise UserInputError(f"{spm}: not a loadable sentencepiece tokenizer ({e})") from None

"""Tiny random-weight folders of the real vision classes, for tests and CPU benchmarks.

Each `save_tiny_*` writes a folder that the matching loader in `kaleido_s2v.vision` (and plain
`transformers.AutoModel...from_pretrained`) reads exactly like a real checkpoint: CLIP, DINO (ViT),
Grounding DINO (Swin + BERT text backbone) and SAM. Tokenizers are built offline from tiny vocabularies.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import torch


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    # GPT-2 / CLIP byte-to-unicode table: printable bytes map to themselves, the rest to 256 + n.
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + n) for n in range(len(extra))]
    tokens = chars + [c + "</w>" for c in chars]
    merges = [(a, f"{b}</w>") for a in "aeiost" for b in "nrst"]  # a few real merges
    tokens += [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def save_tiny_clip(path: str | os.PathLike, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """A tiny `CLIPModel` + `CLIPProcessor` (CLIPImageProcessor + CLIPTokenizer) folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = Path(path)
    vocab, merges = _clip_vocab()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).eval().save_pretrained(path)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_dino(path: str | os.PathLike, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                   add_pooling_layer: bool = False) -> Path:
    """A tiny `ViTModel` (no pooling layer by default) + `ViTImageProcessor` folder shaped like facebook/dino-vitb16."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=image_size, patch_size=patch_size)
    ViTModel(config, add_pooling_layer=add_pooling_layer).eval().save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_tiny_grounding_dino(path: str | os.PathLike, seed: int = 0, num_queries: int = 20) -> Path:
    """A tiny `GroundingDinoForObjectDetection` (Swin + BERT, random) + `GroundingDinoProcessor` folder."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    words = ["person", "man", "woman", "girl", "dog", "cat", "car", "toy", "shirt", "object", "face"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "?", ","] + list(string.ascii_lowercase)
    vocab += ["##" + c for c in string.ascii_lowercase] + words
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64),
        d_model=64, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=num_queries, max_text_len=32,
        num_feature_levels=4, encoder_n_points=2, decoder_n_points=2,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(path)
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_sam(path: str | os.PathLike, seed: int = 0, image_size: int = 64) -> Path:
    """A tiny `SamModel` + `SamProcessor` folder (box prompts -> masks)."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    path = Path(path)
    torch.manual_seed(seed)
    config = SamConfig(
        vision_config=dict(hidden_size=16, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=16, window_size=2, global_attn_indexes=[1],
                           num_pos_feats=8, mlp_dim=32),
        prompt_encoder_config=dict(hidden_size=16, image_size=image_size, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=16),
    )
    SamModel(config).eval().save_pretrained(path)
    image_processor = SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size,
                                                                                     "width": image_size},
                                        mask_size={"longest_edge": image_size // 4},
                                        mask_pad_size={"height": image_size // 4, "width": image_size // 4})
    SamProcessor(image_processor=image_processor).save_pretrained(path)
    return path

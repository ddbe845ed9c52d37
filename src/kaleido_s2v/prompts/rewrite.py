"""Rewriting prompts: one (`enhance_prompt`), or every case of a run before the video model loads (`enhance_cases`).

The release's first step, done here: the user's short prompt -> the long caption style the model was trained on,
written by a chat model that sees the references. The caption is cleaned (`cleaning.clean_answer`), must not be
empty, and is kept within the video model's text encoder (`cleaning.fit_length`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..errors import UserInputError, check_at_least, check_seed
from .base import Enhancer, enhancer_images, system_prompt, user_message
from .cache import CACHE_FILE, PromptCache, cache_key
from .cleaning import clean_answer, drop_unfinished, estimate_tokens, fit_length

DEFAULT_LIMIT = 512  # umT5 tokens the releases encode (max_sequence_length)


def make_enhancer(folder=None, url=None, model=None, *, device=None, seed=None, max_tokens=None, timeout=None,
                  retries=None, text_only: bool = False) -> Enhancer:
    """The enhancer the flags name (`--enhancer DIR`, or `--enhancer-url URL --enhancer-model NAME`), checked
    but not loaded; `device` (a local model's, default CUDA when available) is a `torch.device` or its name.
    `text_only`: show the model the prompt only (a text-only server model refuses images). Errors name the flags."""
    check_seed(seed, "--enhancer-seed")
    check_at_least(max_tokens, "--enhancer-max-tokens", 1)
    if folder is not None and url is not None:
        raise UserInputError("--enhancer DIR and --enhancer-url URL exclude each other: give a local model folder "
                             "or a server")
    if model is not None and url is None:
        raise UserInputError("--enhancer-model names the model a server serves: add --enhancer-url URL (a local "
                             "--enhancer DIR is its own model)")
    if folder is None and url is None:
        raise UserInputError("prompt optimisation needs an enhancer: --enhancer DIR (a local chat model folder, e.g. "
                             "Qwen2.5-VL-7B-Instruct) or --enhancer-url URL --enhancer-model NAME")
    if url is not None:
        from .endpoint import DEFAULT_RETRIES, DEFAULT_TIMEOUT, EndpointEnhancer

        if device is not None:
            raise UserInputError("--enhancer-device places a local --enhancer model: drop it for --enhancer-url")
        if not model or not model.strip():
            raise UserInputError("--enhancer-url needs --enhancer-model NAME: the model the server serves (e.g. "
                                 "Qwen/Qwen2.5-VL-7B-Instruct for vLLM, qwen2.5vl:7b for Ollama)")
        check_at_least(timeout, "--enhancer-timeout", 1)
        check_at_least(retries, "--enhancer-retries", 0)
        return EndpointEnhancer(url, model.strip(), seed=seed, max_tokens=max_tokens, text_only=text_only,
                                timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
                                retries=DEFAULT_RETRIES if retries is None else retries)
    if timeout is not None or retries is not None:
        raise UserInputError("--enhancer-timeout/--enhancer-retries bound requests to a server: drop them for a "
                             "local --enhancer DIR")
    from .local import LocalEnhancer

    return LocalEnhancer(folder, device=device, seed=seed, text_only=text_only,
                         **({} if max_tokens is None else {"max_new_tokens": max_tokens}))


def tokenizer_counter(folder: str | Path | None) -> Callable[[str], int]:
    """Counts text-encoder tokens as the video model will (Wan's prompt cleaning, then the folder's tokenizer,
    with its end token); without a folder, the word estimate of `cleaning.estimate_tokens`."""
    if folder is None or not (Path(folder) / "tokenizer").is_dir():
        return estimate_tokens
    from transformers import AutoTokenizer

    from ..model_folder import loading
    from ..text import prompt_clean

    with loading(Path(folder) / "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(Path(folder) / "tokenizer")
    return lambda text: len(tokenizer(prompt_clean(text), add_special_tokens=True)["input_ids"])


def enhance_prompt(prompt: str, reference_images, enhancer: Enhancer | str | Path, *, system: str | None = None,
                   count_tokens: Callable[[str], int] = estimate_tokens, limit: int = DEFAULT_LIMIT,
                   where: str = "--prompt", images: list | None = None) -> str:
    """`prompt` rewritten in the training-caption style by `enhancer`, which sees `reference_images` (paths, PIL
    images or arrays) if it can.

    `enhancer`: an `Enhancer` (it stays loaded: close it, or use `with`), or a local chat model folder (loaded for
    this call and freed). `system`: the system prompt (default: the shipped one). The caption must fit `limit`
    tokens as `count_tokens` counts them. `images`: the references already prepared (`base.enhancer_images`).
    Raises `UserInputError` (one line) for an empty or unusable answer."""
    if not isinstance(enhancer, Enhancer):
        with make_enhancer(folder=enhancer) as local:
            return enhance_prompt(prompt, reference_images, local, system=system, count_tokens=count_tokens,
                                  limit=limit, where=where, images=images)
    if not prompt or not prompt.strip():
        raise UserInputError(f"{where}: the prompt is empty: describe the video to generate")
    references = list(reference_images or [])
    if images is None:
        images = enhancer_images(references) if enhancer.sees_images else []
    system = system_prompt() if system is None else system
    answer = enhancer.answer(system, user_message(prompt, len(references), enhancer.sees_images), images)
    text = clean_answer(answer.text)
    if answer.truncated:
        text = drop_unfinished(text)
    if not text:
        shown = answer.text.strip().replace("\n", " ")[:60]
        raise UserInputError(f"{where}: {enhancer.flag} gave no caption (its answer: {shown!r}): use an instruct "
                             "model, or check --enhancer-system")
    return fit_length(text, count_tokens, limit, where)


def enhance_cases(cases, enhancer: Enhancer, *, cache_dir: str | Path | None = None, made_by: str = "",
                  overwrite: bool = False, system: str | None = None,
                  count_tokens: Callable[[str], int] = estimate_tokens, limit: int = DEFAULT_LIMIT,
                  progress: bool = True, runtime=None) -> dict:
    """Rewrite every case's prompt (`batch.Case`, references already checked) before the video model loads, then
    free the enhancer. Each case keeps its `original_prompt` and the `enhancer` record; its `prompt` becomes the
    caption. `cache_dir`: a batch's output folder, where `prompt_cache.json` (signed `made_by`) remembers captions
    across runs: a rerun asks the model only for new (prompt, references, enhancer, system prompt) combinations.
    Nothing is written unless every case was enhanced. `runtime` (`distributed.Runtime`) under torchrun: rank 0
    asks the model and sends every rank the same captions (or its error). Returns {"enhanced", "cached", "seconds"}.
    """
    if runtime is None or not runtime.distributed:
        return _enhance_cases(cases, enhancer, cache_dir, made_by, overwrite, system, count_tokens, limit, progress)
    import torch.distributed as dist

    box = [None]
    if runtime.is_main:
        try:
            stats = _enhance_cases(cases, enhancer, cache_dir, made_by, overwrite, system, count_tokens, limit,
                                   progress)
            box = [(stats, [c.prompt for c in cases])]
        except UserInputError as e:
            box = [str(e)]
    dist.broadcast_object_list(box, src=0, device=runtime.device)
    if isinstance(box[0], str):
        raise UserInputError(box[0])
    stats, prompts = box[0]
    if not runtime.is_main:
        record = enhancer.record()
        for case, prompt in zip(cases, prompts):
            case.original_prompt, case.prompt, case.enhancer = case.prompt, prompt, record
    return stats


def _enhance_cases(cases, enhancer, cache_dir, made_by, overwrite, system, count_tokens, limit, progress) -> dict:
    from tqdm.auto import tqdm

    system = system_prompt() if system is None else system
    cache = PromptCache(Path(cache_dir) / CACHE_FILE, made_by).claim(overwrite) if cache_dir is not None else None
    identity = enhancer.identity()
    keys = [cache_key(c.prompt, c.references, identity, system) for c in cases]
    done = {k: cache.get(k) for k in keys if cache is not None and cache.get(k) is not None}
    cached = len(done)
    todo = {k: c for k, c in zip(keys, cases) if k not in done}  # a (prompt, references) pair asked once
    start = time.perf_counter()
    try:
        for key, case in tqdm(todo.items(), desc="prompts", unit="prompt", disable=not progress or len(todo) < 2):
            done[key] = enhance_prompt(case.prompt, case.references, enhancer, system=system,
                                       count_tokens=count_tokens, limit=limit, where=case.source)
            if cache is not None:
                cache.put(key, case.prompt, done[key])
    finally:
        enhancer.close()
    record = enhancer.record()
    for key, case in zip(keys, cases):
        case.original_prompt, case.prompt, case.enhancer = case.prompt, done[key], record
    if cache is not None:
        cache.save()
    return {"enhanced": len(todo), "cached": cached, "seconds": round(time.perf_counter() - start, 3)}

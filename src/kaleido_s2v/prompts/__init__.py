"""Prompt optimisation, the release's first step: a short prompt -> the long, detailed caption style the model
was trained on, written by a chat model that sees the references (docs/prompts.md).

    from kaleido_s2v.prompts import enhance_prompt, make_enhancer

    caption = enhance_prompt("a fox pushes a toy car", ["fox.png", "car.png"], "Qwen2.5-VL-7B-Instruct/")
    with make_enhancer(url="http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-VL-7B-Instruct") as enhancer:
        caption = enhance_prompt("a fox pushes a toy car", ["fox.png", "car.png"], enhancer)

Two enhancers behind one interface (`Enhancer`): a local transformers chat model folder (`local.LocalEnhancer`)
and an OpenAI-compatible chat endpoint (`endpoint.EndpointEnhancer`). `enhance_cases` rewrites a run's cases
before the video model loads, with a cache beside a batch's outputs (`cache.PromptCache`).
"""

from .base import Answer, Enhancer, system_prompt
from .cleaning import clean_answer
from .rewrite import enhance_cases, enhance_prompt, make_enhancer, tokenizer_counter

__all__ = ["Answer", "Enhancer", "clean_answer", "enhance_cases", "enhance_prompt", "make_enhancer", "system_prompt",
           "tokenizer_counter"]

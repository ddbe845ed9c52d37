"""Prompt optimisation (kaleido_s2v.prompts): a tiny random Qwen2-VL and a text-only Qwen2 built here with a
tokenizer trained here, an OpenAI-compatible server on 127.0.0.1, the answer cleaning, the length check, the cache.

Random weights answer gibberish: the local tests check that the path runs end to end, is deterministic, that the
images reached the model and that the model is freed afterwards, not what it writes.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import socket
import threading
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kaleido_s2v.errors import UserInputError
from kaleido_s2v.prompts import clean_answer, enhance_cases, enhance_prompt, make_enhancer, system_prompt
from kaleido_s2v.prompts import endpoint as endpoint_module
from kaleido_s2v.prompts.cleaning import drop_unfinished, estimate_tokens, fit_length

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# Qwen2-VL's chat template, trimmed to what the tests need (images, text parts, string contents)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ------------------------------------------------------------------------------------------------ tiny models
def write_tokenizer(folder: Path):
    """A byte-level BPE trained on a few strings, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["a fox pushes a toy car", "Reference images: User prompt:", system_prompt()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHAT_TEMPLATE)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _ids(tokenizer) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    return dict(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None), ids


def write_tiny_vlm(folder: Path) -> Path:
    """A random Qwen2-VL folder (hidden 32, one layer, one vision block, 28-pixel merged patches)."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    tokenizer = write_tokenizer(folder)
    special, ids = _ids(tokenizer)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         **special),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], **special)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.update(**{k: v for k, v in special.items() if v is not None})
    model.save_pretrained(folder)
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16).save_pretrained(folder)
    return folder


def write_tiny_lm(folder: Path) -> Path:
    """A random text-only Qwen2 folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = write_tokenizer(folder)
    special, _ = _ids(tokenizer)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, **special)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.update(**{k: v for k, v in special.items() if v is not None})
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return write_tiny_vlm(tmp_path_factory.mktemp("enhancers") / "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("enhancers") / "tiny-qwen2")


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("fox.png", (70, 50, 3)), ("car.png", (40, 90, 4))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name)
        paths.append(str(root / name))
    return paths


# ------------------------------------------------------------------------------------------------ a server
class ChatServer:
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 that records each request and answers `reply`
    (a dict: JSON; bytes: the raw body), with `status` and an optional `delay` (seconds)."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.reply: dict | bytes = self.answer("A fox pushes a toy car.")
        self.status, self.delay, self.fail_first = 200, 0.0, 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append(json.loads(body))
                server.headers.append(dict(self.headers))
                status = server.status
                if server.fail_first:
                    server.fail_first -= 1
                    status = 503
                if server.delay:
                    threading.Event().wait(server.delay)
                data = server.reply if isinstance(server.reply, bytes) else json.dumps(server.reply).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @staticmethod
    def answer(text: str, finish_reason: str = "stop") -> dict:
        return {"id": "x", "object": "chat.completion", "model": "test",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason}]}

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(endpoint_module, "BACKOFF_SECONDS", (0.0,))
    s = ChatServer()
    yield s
    s.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ cleaning
CLEANING = [
    ("A fox pushes a toy car.", "A fox pushes a toy car."),
    ("  A fox\npushes a toy car.  \n", "A fox pushes a toy car."),
    ("<think>The user wants a fox.\nLet me write.</think>\n\nA fox pushes a toy car.", "A fox pushes a toy car."),
    ("The user wants a fox. I will describe it.</think>A fox pushes a toy car.", "A fox pushes a toy car."),
    ("<think>I should describe the fox and then", ""),
    ('"A fox pushes a toy car."', "A fox pushes a toy car."),
    ("“A fox pushes a toy car.”", "A fox pushes a toy car."),
    ('"Run," she says, "now."', '"Run," she says, "now."'),
    ("Caption: A fox pushes a toy car.", "A fox pushes a toy car."),
    ("**Enhanced prompt:** \"A fox pushes a toy car.\"", "A fox pushes a toy car."),
    ("Prompt: A fox pushes a toy car.", "A fox pushes a toy car."),
    ("Here is the rewritten prompt:\n\nA fox pushes a toy car.", "A fox pushes a toy car."),
    ("## Caption\nA fox pushes a toy car.", "A fox pushes a toy car."),
    ("- A fox in a green coat.\n- It pushes a toy car.", "A fox in a green coat. It pushes a toy car."),
    ("1. A fox in a green coat.\n2) It pushes a toy car.", "A fox in a green coat. It pushes a toy car."),
    ("A **bright orange** fox pushes a toy car.", "A bright orange fox pushes a toy car."),
    ("A fox pushes a toy car.\n\n(Word count: 6)", "A fox pushes a toy car."),
    ("```\nA fox pushes a toy car.\n```", "A fox pushes a toy car."),
    ("A fox\x00 pushes\x07 a toy car.", "A fox pushes a toy car."),
    ("A fox's coat is green.", "A fox's coat is green."),
    ("", ""),
    ("   \n ", ""),
]


@pytest.mark.parametrize("raw, clean", CLEANING)
def test_answers_are_cleaned_to_one_paragraph(raw, clean):
    assert clean_answer(raw) == clean


def test_a_caption_cut_at_the_token_limit_loses_its_unfinished_sentence():
    assert drop_unfinished("A fox runs. It pushes a toy car across the") == "A fox runs."
    assert drop_unfinished("A fox runs across the") == "A fox runs across the"
    assert drop_unfinished("A fox runs. It stops.") == "A fox runs. It stops."


def test_too_long_captions_are_shortened_at_a_sentence_end_or_refused(caplog):
    text = "One two three. Four five six. Seven eight nine ten."
    words = lambda t: len(t.split())  # noqa: E731
    assert fit_length(text, words, 100, "--prompt") == text
    assert fit_length(text, words, 7, "--prompt") == "One two three. Four five six."
    assert "kept its first 2 sentences" in caplog.text
    with pytest.raises(UserInputError, match="--prompt: .* first sentence alone does not fit"):
        fit_length(text, words, 2, "--prompt")
    assert estimate_tokens("one two three four") == 6


def test_the_system_prompt_asks_for_the_training_caption_style_and_the_docs_show_it():
    text = system_prompt()
    for phrase in ("80 to 150 words", "in reference order", "backgrounds of the reference images",
                   "Do not add people"):
        assert phrase in text
    docs = (Path(__file__).resolve().parents[1] / "docs" / "prompts.md").read_text(encoding="utf-8")
    assert text in docs, "docs/prompts.md must show src/kaleido_s2v/data/prompt_system.txt verbatim"


# ------------------------------------------------------------------------------------------------ local
def test_local_vlm_sees_every_reference_is_deterministic_and_is_freed(vlm, refs, monkeypatch):
    from transformers import Qwen2VLForConditionalGeneration

    seen, models = [], []
    original = Qwen2VLForConditionalGeneration.generate

    def spy(self, **kwargs):
        seen.append(kwargs)
        models.append(weakref.ref(self))
        return original(self, **kwargs)

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "generate", spy)
    enhancer = make_enhancer(folder=vlm, max_tokens=24)
    assert enhancer.sees_images and not enhancer.loaded
    with enhancer:
        first = enhance_prompt("a fox pushes a toy car", refs, enhancer)
        second = enhance_prompt("a fox pushes a toy car", refs, enhancer)
        assert enhancer.loaded
    assert first == second and first.strip()
    assert not enhancer.loaded
    gc.collect()
    assert models[0]() is None  # the weights are gone, not just unreferenced by the enhancer
    grid = seen[0]["image_grid_thw"]
    assert grid.shape[0] == len(refs)  # one image per reference, in order
    assert seen[0]["do_sample"] is False and seen[0]["max_new_tokens"] == 24
    image_tokens = int(seen[0]["mm_token_type_ids"].sum())
    assert image_tokens == int(sum(g.prod() for g in grid) // 4) > 0


def test_local_sampling_follows_the_seed(vlm, refs):
    with make_enhancer(folder=vlm, seed=3, max_tokens=16) as a:
        one = enhance_prompt("a fox", refs[:1], a)
        two = enhance_prompt("a fox", refs[:1], a)
    assert one == two  # the seed is set before each request
    assert a.record()["seed"] == 3 and a.identity() != make_enhancer(folder=vlm, max_tokens=16).identity()


def test_text_only_model_sees_the_prompt_only(lm, refs, monkeypatch):
    from transformers import Qwen2ForCausalLM

    seen = []
    original = Qwen2ForCausalLM.generate
    monkeypatch.setattr(Qwen2ForCausalLM, "generate", lambda self, **kw: seen.append(kw) or original(self, **kw))
    enhancer = make_enhancer(folder=lm, max_tokens=16)
    assert not enhancer.sees_images
    one = enhance_prompt("a fox pushes a toy car", refs, enhancer)
    assert one == enhance_prompt("a fox pushes a toy car", refs, enhancer)
    enhancer.close()
    assert "pixel_values" not in seen[0] and "image_grid_thw" not in seen[0]
    assert enhancer.record() == {"kind": "local", "path": str(lm.resolve()), "model": "tiny-qwen2",
                                 "sees_images": False, "seed": None}


def test_a_folder_given_as_a_path_is_loaded_for_the_call(lm):
    assert enhance_prompt("a fox", [], lm).strip()


@pytest.mark.parametrize("make, expect", [
    (lambda root: root / "nope", "does not exist"),
    (lambda root: (root / "f.txt").write_text("x") and root / "f.txt", "is a file"),
    (lambda root: _folder(root, {"model_index.json": "{}"}), "is a diffusers pipeline folder"),
    (lambda root: _folder(root, {"readme.md": "hi"}), "not a transformers model folder"),
    (lambda root: _folder(root, {"config.json": "{nope"}), "config.json is not valid JSON"),
    (lambda root: _folder(root, {"config.json": '{"model_type": "umt5"}', "model.safetensors": "x"}),
     "holds a umt5, not a chat model"),
    (lambda root: _folder(root, {"config.json": '{"model_type": "qwen2"}'}), "has no weights"),
    (lambda root: _folder(root, {"config.json": '{"model_type": "qwen2"}', "model.safetensors": "x"}),
     "has no chat template"),
])
def test_bad_enhancer_folders_are_one_line(tmp_path, make, expect):
    with pytest.raises(UserInputError, match=expect) as e:
        make_enhancer(folder=make(tmp_path))
    assert str(e.value).startswith("--enhancer ") and "\n" not in str(e.value)


def _folder(root: Path, files: dict) -> Path:
    folder = root / "m"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


# ------------------------------------------------------------------------------------------------ endpoint
def test_endpoint_request_carries_system_prompt_user_prompt_and_one_image_per_reference(server, refs, monkeypatch):
    monkeypatch.setenv("KALEIDO_ENHANCER_API_KEY", "sk-test")
    server.reply = server.answer('**Caption:** "A fox in a green coat pushes a red toy car."')
    enhancer = make_enhancer(url=server.url, model="test")
    assert enhance_prompt("a fox pushes a toy car", refs, enhancer) == "A fox in a green coat pushes a red toy car."
    (body,) = server.requests
    assert body["model"] == "test" and body["temperature"] == 0 and "seed" not in body and "max_tokens" not in body
    system, user = body["messages"]
    assert system == {"role": "system", "content": system_prompt()}
    images = [p for p in user["content"] if p["type"] == "image_url"]
    texts = [p["text"] for p in user["content"] if p["type"] == "text"]
    assert len(images) == len(refs) and texts == ["Reference images: 2, shown above in order (reference 1 first).\n"
                                                  "User prompt: a fox pushes a toy car"]
    decoded = Image.open(io.BytesIO(base64.b64decode(images[1]["image_url"]["url"].split(",", 1)[1])))
    assert decoded.size == (90, 40) and decoded.mode == "RGB"  # the second reference, transparency on white
    assert server.headers[0]["Authorization"] == "Bearer sk-test"


def test_endpoint_url_forms_and_seed(server):
    for url in (server.url, server.url + "/", server.url + "/chat/completions"):
        assert make_enhancer(url=url, model="m").url == server.url + "/chat/completions"
    enhance_prompt("a fox", [], make_enhancer(url=server.url, model="m", seed=5))
    assert server.requests[-1]["seed"] == 5 and server.requests[-1]["temperature"] == 0.7


def test_a_text_only_endpoint_gets_the_prompt_only(server, refs):
    enhancer = make_enhancer(url=server.url, model="glm-4.5", text_only=True)
    enhance_prompt("a fox pushes a toy car", refs, enhancer)
    user = server.requests[0]["messages"][1]
    assert user["content"] == "Reference images: 2 (not shown to you).\nUser prompt: a fox pushes a toy car"
    assert enhancer.record()["sees_images"] is False


def test_endpoint_retries_5xx_then_answers(server):
    server.fail_first = 2
    assert enhance_prompt("a fox", [], make_enhancer(url=server.url, model="m")) == "A fox pushes a toy car."
    assert len(server.requests) == 3


def test_endpoint_drops_a_refused_temperature(server):
    server.status, server.reply = 400, {"error": {"message": "Unsupported value: 'temperature' does not support 0"}}
    enhancer = make_enhancer(url=server.url, model="gpt-5")
    with pytest.raises(UserInputError):  # still 400: the second request is refused too
        enhance_prompt("a fox", [], enhancer)
    assert "temperature" in server.requests[0] and "temperature" not in server.requests[1]


@pytest.mark.parametrize("setup, expect", [
    (lambda s: setattr(s, "status", 401), "HTTP 401 .*set KALEIDO_ENHANCER_API_KEY"),
    (lambda s: setattr(s, "status", 404), "HTTP 404 .*check the URL"),
    (lambda s: setattr(s, "status", 500), r"HTTP 500 .*\(3 tries\)"),
    (lambda s: setattr(s, "reply", b"<html>hello</html>"), "the answer is not JSON"),
    (lambda s: setattr(s, "reply", {"object": "list"}), "no choices"),
    (lambda s: setattr(s, "reply", ChatServer.answer("")), "gave an empty answer"),
    (lambda s: setattr(s, "reply", ChatServer.answer("<think>hmm")), "gave no caption"),
    (lambda s: setattr(s, "delay", 1.5), r"no answer within 1 s \(1 tries\)"),
])
def test_endpoint_failures_are_one_line(server, setup, expect):
    setup(server)
    enhancer = make_enhancer(url=server.url, model="m", timeout=1, retries=0 if server.delay else 2)
    with pytest.raises(UserInputError, match=expect) as e:
        enhance_prompt("a fox", [], enhancer)
    assert "\n" not in str(e.value) and (str(e.value).startswith("--enhancer-url ") or "gave no caption" in str(e.value))


def test_unreachable_endpoint_is_one_line(monkeypatch):
    monkeypatch.setattr(endpoint_module, "BACKOFF_SECONDS", (0.0,))
    with pytest.raises(UserInputError, match=r"cannot connect .*3 tries"):
        enhance_prompt("a fox", [], make_enhancer(url=f"http://127.0.0.1:{closed_port()}/v1", model="m"))


@pytest.mark.parametrize("kwargs, expect", [
    (dict(folder="x", url="http://h/v1"), "exclude each other"),
    (dict(model="m"), "add --enhancer-url"),
    (dict(url="http://h/v1"), "needs --enhancer-model"),
    (dict(url="ftp://h", model="m"), "is not an http"),
    (dict(url="http://h/v1", model="m", device="cpu"), "--enhancer-device places a local"),
    (dict(url="http://h/v1", model="m", timeout=0), "--enhancer-timeout 0"),
    (dict(), "needs an enhancer"),
    (dict(folder="x", seed=-1), "--enhancer-seed -1"),
])
def test_bad_enhancer_options(kwargs, expect):
    with pytest.raises(UserInputError, match=expect):
        make_enhancer(**kwargs)


# ------------------------------------------------------------------------------------------------ cases, cache
def test_enhance_cases_rewrites_caches_and_asks_only_for_new_prompts(server, refs, tmp_path):
    from kaleido_s2v.batch import MADE_BY, Case
    from kaleido_s2v.fileio import file_signed_by

    def cases():
        return [Case(prompt="a fox", references=refs, source="c.txt:1"),
                Case(prompt="a fox", references=refs, source="c.txt:2"),  # the same pair: asked once
                Case(prompt="a car", references=refs[1:], source="c.txt:3")]

    enhancer = make_enhancer(url=server.url, model="m")
    first = cases()
    stats = enhance_cases(first, enhancer, cache_dir=tmp_path, made_by=MADE_BY, progress=False)
    assert stats["enhanced"] == 2 and stats["cached"] == 0 and len(server.requests) == 2
    assert [c.prompt for c in first] == ["A fox pushes a toy car."] * 3
    assert [c.original_prompt for c in first] == ["a fox", "a fox", "a car"]
    assert first[0].enhancer == {"kind": "endpoint", "url": server.url + "/chat/completions", "model": "m",
                                 "sees_images": True, "seed": None}
    cache = tmp_path / "prompt_cache.json"
    assert file_signed_by(cache, MADE_BY)

    again = cases()
    assert enhance_cases(again, enhancer, cache_dir=tmp_path, made_by=MADE_BY)["cached"] == 2
    assert len(server.requests) == 2 and again[2].prompt == "A fox pushes a toy car."

    Image.new("RGB", (8, 8), "red").save(tmp_path / "new.png")  # other reference bytes: a new key
    enhance_cases([Case(prompt="a fox", references=[str(tmp_path / "new.png")])], enhancer, cache_dir=tmp_path,
                  made_by=MADE_BY)
    enhance_cases(cases()[:1], enhancer, cache_dir=tmp_path, made_by=MADE_BY, system="Be brief.")  # other system
    enhance_cases(cases()[:1], make_enhancer(url=server.url, model="other"), cache_dir=tmp_path, made_by=MADE_BY)
    assert len(server.requests) == 5


def test_the_cache_never_replaces_a_users_file_and_a_failed_run_writes_nothing(server, refs, tmp_path):
    from kaleido_s2v.batch import MADE_BY, Case

    cache = tmp_path / "prompt_cache.json"
    cache.write_text('{"mine": true}\n')
    enhancer = make_enhancer(url=server.url, model="m")
    with pytest.raises(UserInputError, match="prompt cache .* already exists"):
        enhance_cases([Case(prompt="a fox", references=refs)], enhancer, cache_dir=tmp_path, made_by=MADE_BY)
    assert cache.read_text() == '{"mine": true}\n' and server.requests == []

    cache.unlink()
    server.reply = ChatServer.answer("")
    with pytest.raises(UserInputError, match="empty answer"):
        enhance_cases([Case(prompt="a fox", references=refs)], enhancer, cache_dir=tmp_path, made_by=MADE_BY)
    assert not cache.exists()

"""An OpenAI-compatible chat endpoint as the enhancer (`--enhancer-url URL --enhancer-model NAME`): how the
release's guide uses GLM-4.5 / GPT-5, and how people serve local models (vLLM, Ollama, llama.cpp, SGLang).

Python's own `urllib.request`, not a client library: one POST to `{url}/chat/completions` needs no new
dependency. The references go as `image_url` parts (PNG data URLs), the key (if any) as `Authorization: Bearer`
from `KALEIDO_ENHANCER_API_KEY` only: a key meant for one provider is never sent to whatever URL is given.
Bounded: a timeout per request, a few retries on connection errors, timeouts, 429 and 5xx with a short backoff;
redirects are refused (the request goes to the URL given and nowhere else), and so is the environment's proxy for a
loopback URL. Every failure is one line naming `--enhancer-url` and what to do.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request

from ..errors import UserInputError
from .base import Answer, Enhancer

logger = logging.getLogger(__name__)

API_KEY_ENV = "KALEIDO_ENHANCER_API_KEY"
DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRIES = 2
BACKOFF_SECONDS = (1.0, 3.0, 5.0)  # before retry 1, 2, 3...
SAMPLING_TEMPERATURE = 0.7  # with --enhancer-seed; otherwise 0 (the same prompt gives the same caption)


def chat_url(url: str, flag: str = "--enhancer-url") -> str:
    """`…/v1`, `…/v1/` or the full `…/chat/completions` -> the chat completions URL."""
    parsed = urllib.parse.urlparse(url.strip())
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UserInputError(f"{flag} {url!r} is not an http(s) URL: give the server's OpenAI-compatible base, "
                             "e.g. http://localhost:8000/v1")
    base = url.strip().rstrip("/")
    return base if base.endswith("/chat/completions") else f"{base}/chat/completions"


def _image_part(image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")}}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


class EndpointEnhancer(Enhancer):
    def __init__(self, url: str, model: str, *, seed: int | None = None, max_tokens: int | None = None,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES, text_only: bool = False,
                 flag: str = "--enhancer-url"):
        self.url, self.model, self.seed, self.flag = chat_url(url, flag), model, seed, flag
        self.sees_images = not text_only  # a text-only model (GLM-4.5, DeepSeek) refuses image parts
        self.max_tokens, self.timeout, self.retries = max_tokens, timeout, retries
        self.send_temperature = True

    def record(self) -> dict:
        return {"kind": "endpoint", "url": self.url, "model": self.model, "sees_images": self.sees_images,
                "seed": self.seed}

    def identity(self) -> dict:
        return {**self.record(), "max_tokens": self.max_tokens}

    def body(self, system: str, user: str, images: list) -> dict:
        body = {"model": self.model,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": [*map(_image_part, images), {"type": "text", "text": user}]
                              if self.sees_images else user}]}
        if self.send_temperature:
            body["temperature"] = 0.0 if self.seed is None else SAMPLING_TEMPERATURE
        if self.seed is not None:
            body["seed"] = self.seed
        if self.max_tokens is not None:  # only when asked: GPT-5 refuses max_tokens (max_completion_tokens)
            body["max_tokens"] = self.max_tokens
        return body

    def answer(self, system: str, user: str, images: list) -> Answer:
        reply = self._post(self.body(system, user, images))
        try:
            choice = reply["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserInputError(f"{self._where}: the answer has no choices[0].message.content: is this an "
                                 "OpenAI-compatible chat endpoint?") from None
        if isinstance(content, list):  # content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not content.strip():
            raise UserInputError(f"{self._where}: the model {self.model!r} gave an empty answer: check that it is "
                                 "a chat model (a reasoning model may have spent its tokens on reasoning)")
        return Answer(content, truncated=choice.get("finish_reason") == "length")

    @property
    def _where(self) -> str:
        return f"{self.flag} {self.url}"

    def _opener(self):
        host = urllib.parse.urlparse(self.url).hostname or ""
        handlers = [_NoRedirect()]
        if host in ("localhost", "::1") or host.startswith("127."):
            handlers.append(urllib.request.ProxyHandler({}))  # a loopback server is reached directly
        return urllib.request.build_opener(*handlers)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(API_KEY_ENV, "").strip()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        opener, tries = self._opener(), self.retries + 1
        for attempt in range(tries):
            if attempt:
                time.sleep(BACKOFF_SECONDS[min(attempt - 1, len(BACKOFF_SECONDS) - 1)])
            request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
            try:
                with opener.open(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code == 400 and "temperature" in detail.lower() and "temperature" in body:
                    logger.warning(f"{self._where}: the server refused a temperature ({detail}); asking again at "
                                   "its default (reasoning models such as GPT-5 take no temperature)")
                    self.send_temperature = False
                    return self._post({k: v for k, v in body.items() if k != "temperature"})
                if (e.code == 429 or e.code >= 500) and attempt + 1 < tries:
                    continue
                raise UserInputError(f"{self._where}: {_http_fix(e.code, detail, self.model, tries)}") from None
            except (urllib.error.URLError, OSError) as e:  # refused, unreachable, timed out (connecting or reading)
                if attempt + 1 < tries:
                    continue
                reason = getattr(e, "reason", e)
                if isinstance(reason, TimeoutError):
                    raise UserInputError(f"{self._where}: no answer within {self.timeout:g} s ({tries} tries): check "
                                         "the server, or allow longer with --enhancer-timeout") from None
                raise UserInputError(f"{self._where}: cannot connect ({reason}; {tries} tries): check that the server "
                                     "is running and the URL (e.g. http://localhost:8000/v1)") from None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            shown = raw[:80].decode("utf-8", "replace").replace("\n", " ")
            raise UserInputError(f"{self._where}: the answer is not JSON ({shown!r}): give the server's "
                                 "OpenAI-compatible base URL (…/v1)") from None


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The server's error message (OpenAI's {"error": {"message"}}, or the body's first line), short."""
    try:
        text = e.read().decode("utf-8", "replace")
    except OSError:
        text = ""
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else data
        text = error.get("message", "") if isinstance(error, dict) else str(error)
    except ValueError:
        pass
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return lines[0][:200] if lines else (e.reason or "")


def _http_fix(code: int, detail: str, model: str, tries: int) -> str:
    said = f" ({detail})" if detail else ""
    if code in (401, 403):
        return f"HTTP {code}{said}: set {API_KEY_ENV} to the server's API key"
    if code == 404:
        return f"HTTP 404{said}: check the URL (the server's base, ending in /v1) and --enhancer-model {model!r}"
    if 300 <= code < 400:
        return f"HTTP {code} (a redirect){said}: give the final URL, redirects are not followed"
    if code == 429 or code >= 500:
        return f"HTTP {code}{said} ({tries} tries): the server is busy or failing; try again later"
    return f"HTTP {code}{said}: check --enhancer-model {model!r} and that the server takes images"

"""OpenAI-compatible recording proxy in front of a vLLM server (aiohttp, already in vLLM's deps).

For ``/v1/completions`` and ``/v1/chat/completions`` (streaming or not) the proxy adds what it
needs to the upstream request when the client did not ask for it (``logprobs``,
``return_token_ids``), records the sample, and strips those fields again so the client gets the
response it would have had. Every other path is passed through byte for byte; weight-version
calls of vLLM's RL API (``/update_weight_version``, ``/finish_weight_update``) are observed to
tag later requests.
"""
# ruff: noqa: BLE001  - capture code must never raise into the job: broad catches are the contract

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import TracekitError
from .recorder import Recorder, _now, parse_version

_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
# Request fields recorded as sampling params (OpenAI name -> SamplingParams name).
_FIELDS = {
    "n": "n", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "seed": "seed", "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "min_tokens": "min_tokens",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "logit_bias": "logit_bias", "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words", "include_stop_str_in_output": "include_stop_str_in_output",
    "skip_special_tokens": "skip_special_tokens",
}
# vLLM's OpenAI defaults when neither the request nor generation_config sets a field.
_OPENAI_DEFAULTS = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                    "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "n": 1}


def _dumps(obj: Any) -> bytes:
    # Same shape as vLLM's pydantic JSON: compact separators, UTF-8.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class _Plan:
    """What the client asked for and what the proxy added upstream."""

    def __init__(self, kind: str, body: dict) -> None:
        self.kind = kind
        self.stream = bool(body.get("stream"))
        n = body.get("n")
        self.n = n if isinstance(n, int) and n > 1 else 1  # choice i is sample i % n of prompt i // n
        # With echo, vLLM's answer changes when return_token_ids/logprobs are added (the echoed
        # text goes, prompt logprobs come): the proxy adds nothing then and records only what
        # the client asked for itself.
        echo = kind == "completion" and bool(body.get("echo"))
        self.add_token_ids = not body.get("return_token_ids") and not echo
        if kind == "chat":
            self.client_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        else:
            self.client_k = int(body["logprobs"]) if body.get("logprobs") is not None else None
        self.add_logprobs = self.client_k is None and not echo
        self.has_token_ids = not echo or bool(body.get("return_token_ids"))
        up = dict(body)
        if self.add_token_ids:
            up["return_token_ids"] = True
        if self.add_logprobs:
            if kind == "chat":
                up["logprobs"] = True
                up.pop("top_logprobs", None)
            else:
                up["logprobs"] = 0
        self.upstream = up
        self.changed = self.add_token_ids or self.add_logprobs
        self.requested = {_FIELDS[k]: v for k, v in body.items() if k in _FIELDS and v is not None}
        if self.client_k is not None:
            self.requested["logprobs"] = self.client_k


class _Choice:
    __slots__ = ("finish", "ids", "lps", "prompt", "stop", "t_first", "top_ids", "top_lps")

    def __init__(self) -> None:
        self.prompt: list[int] | None = None  # completions: each choice carries its own prompt
        self.ids: list[int] = []
        self.lps: list[float | None] = []
        self.top_ids: list[list[int] | None] = []
        self.top_lps: list[list[float] | None] = []
        self.finish: str | None = None
        self.stop: Any = None
        self.t_first: Any = None


class RecordingProxy:
    def __init__(self, upstream: str, recorder: Recorder, *, engine_args: Mapping[str, Any] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.recorder = recorder
        self.engine_args = dict(engine_args or {})
        self.engine_id: str | None = None
        self.defaults: dict[str, Any] = {}
        self.max_model_len: int | None = None
        self.version: int | None = recorder.initial_weight_version
        self.session: Any = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        import aiohttp

        from .fingerprint import fingerprint_http

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        version = await self._get_json("/version")
        models = await self._get_json("/v1/models")
        if version is None and models is None:
            raise TracekitError(f"proxy: upstream {self.upstream} does not answer /version or /v1/models")
        info = await self._get_json("/weight_info")
        if info and info.get("weight_version") is not None:
            self.version = parse_version(info["weight_version"], self.recorder.initial_weight_version)
        row = fingerprint_http(version=version, models=models, engine_args=self.engine_args,
                               upstream=self.upstream, run_id=self.recorder.run_id)
        self.engine_id = row["engine_id"]
        self.defaults = row["default_sampling_params"] or {}
        self.max_model_len = row["max_model_len"]
        self.recorder.write_engine_row(row)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _get_json(self, path: str) -> Any:
        try:
            async with self.session.get(self.upstream + path) as r:
                return await r.json() if r.status == 200 else None
        except Exception:
            return None

    def app(self) -> Any:
        from aiohttp import web

        app = web.Application(client_max_size=1 << 30)
        app.router.add_post("/v1/completions", lambda r: self._handle(r, "completion"))
        app.router.add_post("/v1/chat/completions", lambda r: self._handle(r, "chat"))
        app.router.add_route("*", "/{tail:.*}", self._passthrough)
        return app

    # ------------------------------------------------------------------ handlers
    def _headers(self, request: Any) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in _HOP}

    async def _passthrough(self, request: Any) -> Any:
        from aiohttp import web

        body = await request.read()
        async with self.session.request(request.method, self.upstream + request.rel_url.path_qs,
                                        data=body or None, headers=self._headers(request)) as r:
            data = await r.read()
            if r.status == 200 and request.method == "POST":
                self._observe_version(request.path, body)
            return web.Response(body=data, status=r.status,
                                headers={k: v for k, v in r.headers.items() if k.lower() not in _HOP})

    def _observe_version(self, path: str, body: bytes) -> None:
        try:
            if path.endswith(("/update_weight_version", "/finish_weight_update")):
                d = json.loads(body or b"{}")
                label = d.get("new_version", d.get("weight_version"))
                if label is not None:
                    self.version = parse_version(label, self.recorder.initial_weight_version)
                    self.recorder.write_weight_sync(
                        engine_id=self.engine_id, version=self.version if self.version is not None else -1,
                        step=None, t_start=_now(), method=f"http:{path.rsplit('/', 1)[-1]}", checksums=None,
                        ok=True, error=None, snapshot=False)
        except Exception as e:
            self.recorder.count_error(f"proxy version: {e}")

    async def _handle(self, request: Any, kind: str) -> Any:
        from aiohttp import web

        raw = await request.read()
        try:
            body = json.loads(raw)
            plan = _Plan(kind, body) if isinstance(body, dict) else None
        except Exception:
            plan = None
        if plan is None:
            return await self._passthrough(request)
        t0, v0 = _now(), self.version
        data = _dumps(plan.upstream) if plan.changed else raw
        headers = self._headers(request)
        headers["Content-Type"] = "application/json"
        async with self.session.post(self.upstream + request.rel_url.path_qs, data=data, headers=headers) as r:
            resp_headers = {k: v for k, v in r.headers.items() if k.lower() not in _HOP}
            if r.status != 200 or not plan.stream:
                payload = await r.read()
                if r.status == 200:
                    payload = self._finish_plain(plan, payload, t0, v0)
                return web.Response(body=payload, status=r.status, headers=resp_headers)
            out = web.StreamResponse(status=r.status, headers=resp_headers)
            await out.prepare(request)
            state: dict[str, Any] = {"choices": {}, "prompt": None, "id": None}
            buf = b""
            try:
                async for piece in r.content.iter_any():
                    buf += piece
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        event = self._stream_event(plan, event, state)
                        if event is not None:
                            await out.write(event + b"\n\n")
                if buf:
                    await out.write(buf)
                await out.write_eof()
            except ConnectionResetError:
                # The client went away (aiohttp's ClientConnectionResetError): leaving the
                # upstream context closes the upstream stream, so vLLM aborts the request too.
                # Not an error of the proxy: the partial sample is recorded as 'abort'.
                pass
            finally:  # also on cancellation: what was generated so far is still a sample
                self._emit(plan, state, t0, v0)
            return out

    # ------------------------------------------------------------------ response handling
    def _finish_plain(self, plan: _Plan, payload: bytes, t0: Any, v0: int | None) -> bytes:
        try:
            obj = json.loads(payload)
        except Exception:
            return payload
        try:
            state: dict[str, Any] = {"choices": {}, "prompt": None, "id": obj.get("id")}
            if plan.kind == "chat":
                state["prompt"] = obj.get("prompt_token_ids")
            _cached_tokens(obj, state)
            for ch in obj.get("choices") or []:
                self._take(plan, ch, state["choices"].setdefault(ch.get("index", 0), _Choice()))
            self._emit(plan, state, t0, v0)
        except Exception as e:
            self.recorder.count_error(f"proxy record: {type(e).__name__}: {e}")
        if not plan.changed:
            return payload
        _strip(plan, obj)
        return _dumps(obj)

    def _take(self, plan: _Plan, ch: dict, c: _Choice) -> None:
        if plan.kind == "completion" and ch.get("prompt_token_ids") is not None:
            c.prompt = ch["prompt_token_ids"]
        ids = ch.get("token_ids") or []
        if ids and c.t_first is None:
            c.t_first = _now()
        c.ids.extend(ids)
        lp = ch.get("logprobs") or {}
        if plan.kind == "chat":
            vals = [e.get("logprob") for e in lp.get("content") or []]
        else:
            vals = list(lp.get("token_logprobs") or [])
        c.lps.extend(_tail(vals, len(ids), None))
        if plan.client_k:
            if plan.kind == "chat":
                tops = [[(t.get("token"), t.get("logprob")) for t in e.get("top_logprobs") or []]
                        for e in lp.get("content") or []]
            else:
                tops = [list((d or {}).items()) for d in lp.get("top_logprobs") or []]
            for entries in _tail(tops, len(ids), []):
                i, v = _top_k(entries, plan.client_k)
                c.top_ids.append(i)
                c.top_lps.append(v)
        if ch.get("finish_reason") is not None:
            c.finish, c.stop = ch.get("finish_reason"), ch.get("stop_reason")

    def _stream_event(self, plan: _Plan, event: bytes, state: dict) -> bytes | None:
        if not event.startswith(b"data: ") or event.strip() == b"data: [DONE]":
            return event
        try:
            obj = json.loads(event[6:])
        except Exception:
            return event
        try:
            state["id"] = state["id"] or obj.get("id")
            if plan.kind == "chat" and obj.get("prompt_token_ids") is not None:
                state["prompt"] = obj["prompt_token_ids"]
            _cached_tokens(obj, state)
            for ch in obj.get("choices") or []:
                self._take(plan, ch, state["choices"].setdefault(ch.get("index", 0), _Choice()))
        except Exception as e:
            self.recorder.count_error(f"proxy stream: {type(e).__name__}: {e}")
        if not plan.changed:
            return event
        _strip(plan, obj)
        if plan.kind == "chat" and _empty_chat_chunk(obj):
            return None  # the server sends these only because token ids/logprobs were requested
        return b"data: " + _dumps(obj)

    def _resolved(self, plan: _Plan, prompt_len: int | None) -> dict[str, Any]:
        """Field-by-field merge like vLLM's server: request → generation_config → OpenAI default."""
        res: dict[str, Any] = dict(_OPENAI_DEFAULTS)
        for k, v in self.defaults.items():
            if k != "max_tokens":
                res[k] = v
        res.update(plan.requested)
        if "max_tokens" not in plan.requested:
            if plan.kind == "completion":
                res["max_tokens"] = 16
            elif "max_tokens" in self.defaults:
                res["max_tokens"] = self.defaults["max_tokens"]
            elif self.max_model_len and prompt_len is not None:
                res["max_tokens"] = self.max_model_len - prompt_len
        res["logprobs"] = plan.client_k
        res.setdefault("seed", None)
        return res

    def _emit(self, plan: _Plan, state: dict, t0: Any, v0: int | None) -> None:
        try:
            rec = self.recorder
            if not plan.has_token_ids:
                # echo without the client's return_token_ids: adding it would change the answer
                rec.count_error("proxy: an echo=true completion was not recorded (ask for return_token_ids "
                                 "and logprobs to record it: the proxy cannot add them without changing the answer)")
                return
            v1 = self.version
            t1 = _now()
            step = rec.current_step
            for idx, c in sorted(state["choices"].items()):
                prompt = c.prompt if c.prompt is not None else state.get("prompt")
                if plan.n > 1:  # one group per prompt of the (possibly batched) request
                    gid, sample_idx = f"{rec.run_id[:8]}-{state.get('id')}-{idx // plan.n}", idx % plan.n
                else:
                    # n=1 requests of one step that share prompt and params form a group (a GRPO
                    # job sending the prompt G times); their order within it is not known.
                    key = repr((plan.kind, list(prompt or ()), sorted(
                        (k, repr(v)) for k, v in plan.requested.items() if k != "seed")))
                    gid = f"{rec.run_id[:8]}-s{step}-{hashlib.blake2b(key.encode(), digest_size=6).hexdigest()}"
                    sample_idx = None
                n = len(c.ids)
                tv = [v0] * n if v0 == v1 else [None] * n
                rec.emit_sample(
                    request_id=rec.new_request_id(), engine_id=self.engine_id, surface="http",
                    engine_request_id=state.get("id"), prompt_token_ids=prompt, output_token_ids=c.ids,
                    logprobs=c.lps[:n] + [None] * (n - len(c.lps)), token_versions=tv, version_start=v0,
                    version_end=v1, requested=plan.requested,
                    resolved=self._resolved(plan, len(prompt) if prompt is not None else None),
                    num_logprobs=plan.client_k,
                    finish_reason=c.finish or "abort", stop_reason=c.stop, num_cached_tokens=state.get("cached"),
                    top_token_ids=_pad(c.top_ids, n) if plan.client_k else None,
                    top_logprobs=_pad(c.top_lps, n) if plan.client_k else None, t_submit=t0,
                    t_first_token=c.t_first if plan.stream else None, t_finish=t1, group_id=gid,
                    sample_idx=sample_idx, step=step,
                    extra={"endpoint": plan.kind, "stream": plan.stream},
                )
        except Exception as e:
            self.recorder.count_error(f"proxy emit: {type(e).__name__}: {e}")


def _tail(xs: list, n: int, fill: Any) -> list:
    """The last ``n`` per-position entries (echo prompts carry prompt positions first), padded
    with ``fill`` when there are fewer; all of them when ``n`` is 0 (no token ids seen)."""
    if not n:
        return xs
    return xs[-n:] if len(xs) >= n else xs + [fill] * (n - len(xs))


def _pad(xs: list, n: int) -> list:
    return xs[:n] + [None] * (n - len(xs))


def _top_k(entries: list[tuple[Any, Any]], k: int) -> tuple[list[int] | None, list[float] | None]:
    """The k best (token id, logprob) entries of one position, best first, or (None, None).

    Only when the server renders tokens as ``token_id:N`` (the client's
    ``return_tokens_as_token_ids``): text pieces are not invertible to ids, and the completions
    API keys its top-k dict by text, so two tokens that decode alike silently collapse into one
    entry. The completions dict also carries the sampled token when it is not in the top k;
    sorting by logprob and keeping k drops it again."""
    ids: list[int] = []
    lps: list[float] = []
    for tok, v in sorted((e for e in entries if isinstance(e[1], (int, float))), key=lambda e: -e[1])[:k]:
        if not (isinstance(tok, str) and tok.startswith("token_id:") and tok[9:].lstrip("-").isdigit()):
            return None, None
        ids.append(int(tok[9:]))
        lps.append(float(v))
    return ids, lps


def _cached_tokens(obj: dict, state: dict) -> None:
    """usage.prompt_tokens_details.cached_tokens, when the server reports it
    (``vllm serve --enable-prompt-tokens-details``; streams need include_usage)."""
    d = (obj.get("usage") or {}).get("prompt_tokens_details") or {}
    if isinstance(d, dict) and isinstance(d.get("cached_tokens"), int):
        state["cached"] = d["cached_tokens"]


def _strip(plan: _Plan, obj: dict) -> None:
    """Put back what the server returns when the fields the proxy added were not requested."""
    if plan.add_token_ids and "prompt_token_ids" in obj:
        obj["prompt_token_ids"] = None
    for ch in obj.get("choices") or []:
        if plan.add_token_ids:
            if "token_ids" in ch:
                ch["token_ids"] = None
            if "prompt_token_ids" in ch:
                ch["prompt_token_ids"] = None
        if plan.add_logprobs and "logprobs" in ch:
            ch["logprobs"] = None


def _empty_chat_chunk(obj: dict) -> bool:
    chs = obj.get("choices") or []
    return bool(chs) and not obj.get("usage") and all(
        ch.get("delta") == {} and ch.get("finish_reason") is None and ch.get("logprobs") is None for ch in chs)


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise TracekitError(f"proxy: --listen must be HOST:PORT, not {listen!r}") from None


def load_engine_args(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """--engine-args file: JSON object (or YAML if PyYAML is there) of the server's engine args."""
    if path is None:
        return {}
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise TracekitError(f"proxy: cannot read --engine-args {p}: {e.strerror}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError:
        try:
            import yaml

            d = yaml.safe_load(text)
        except Exception:
            raise TracekitError(f"proxy: --engine-args {p} is not JSON (or YAML)") from None
    if not isinstance(d, dict):
        raise TracekitError(f"proxy: --engine-args {p} must hold an object of engine args")
    return {k.replace("-", "_"): v for k, v in d.items()}


async def _serve(upstream: str, host: str, port: int, recorder: Recorder, engine_args: dict[str, Any],
                 ready: Any = None) -> None:
    from aiohttp import web

    proxy = RecordingProxy(upstream, recorder, engine_args=engine_args)
    await proxy.start()
    runner = web.AppRunner(proxy.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(s, stop.set)
        except (NotImplementedError, RuntimeError):
            pass  # no loop signal handlers here (Windows, or not the main thread): stop via KeyboardInterrupt
    if ready is not None:
        ready(f"http://{host}:{port}")
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await proxy.close()


def run_proxy(upstream: str, listen: str, out: str | os.PathLike[str], *, engine_args_file: str | None = None,
              flush_interval: float = 1.0) -> Any:
    """Serve until SIGINT/SIGTERM; returns the writer stats of the closed recorder."""
    host, port = parse_listen(listen)
    engine_args = load_engine_args(engine_args_file)
    if not upstream.startswith(("http://", "https://")):
        raise TracekitError(f"proxy: --upstream must be an http(s) URL, not {upstream!r}")
    rec = Recorder(out, kind="proxy", flush_interval=flush_interval)
    try:
        asyncio.run(_serve(upstream, host, port, rec, engine_args,
                           ready=lambda url: print(f"tracekit proxy: {url} -> {upstream}, recording to {out}", flush=True)))
    finally:
        st = rec.close()
    return st

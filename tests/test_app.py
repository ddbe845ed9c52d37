"""`kaleido-s2v app` through `gradio_client`: one app per module (the built-in model, in a thread, on a free local
port); generations use small settings. The CLI's bad flags run in-process and stop before anything is served."""

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio")
client_lib = pytest.importorskip("gradio_client")

from kaleido_s2v.app.messages import page_message  # noqa: E402
from kaleido_s2v.app.runner import AppOptions, CancelBoard, Runner  # noqa: E402
from kaleido_s2v.cli import main  # noqa: E402
from kaleido_s2v.errors import UserInputError  # noqa: E402
from kaleido_s2v.video_io import read_video  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "toy"
PROMPT = "The red striped circle moves to the left while the blue square bounces on a sandy floor."
SMALL = dict(steps=2, frames=5)
UPLOAD_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CONNECTIONS = []  # every address a socket of this process connected to while the app was up


def _recording(connect):
    def wrapper(sock, address, *args):
        CONNECTIONS.append(address)
        return connect(sock, address, *args)

    return wrapper


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(runner, url) of a served app with the built-in model; its output folder is `runner.output_dir`."""
    from kaleido_s2v.app.server import build_demo, launch

    with pytest.MonkeyPatch.context() as mp:
        for name in ("connect", "connect_ex"):
            mp.setattr(socket.socket, name, _recording(getattr(socket.socket, name)))
        runner = Runner(AppOptions(output_dir=tmp_path_factory.mktemp("app") / "outputs"))
        runner.output_dir.mkdir()
        runner.load()
        demo = build_demo(runner)
        _, url, _ = launch(demo, runner, port=free_port(), max_upload_mb=UPLOAD_MB, quiet=True)
        yield runner, url
        demo.close()


@pytest.fixture(scope="module")
def client(app):
    return client_lib.Client(app[1], verbose=False)


@pytest.fixture(scope="module")
def refs():
    return [client_lib.handle_file(EXAMPLES / "red_striped_circle.png"), client_lib.handle_file(EXAMPLES / "blue_square.png")]


def generate(client, prompt=PROMPT, references=None, **kw):
    return client.predict(prompt=prompt, references=references, **{**SMALL, **kw}, api_name="/generate")


def test_generate_returns_the_video_and_its_sidecar(app, client, refs):
    runner, _ = app
    video, sidecar = generate(client, references=refs, seed=3)
    assert read_video(video).shape == (5, 64, 64, 3)
    data = json.loads(Path(sidecar).read_text())
    assert (data["prompt"], data["seed"], data["references"]) == (PROMPT, 3, ["red_striped_circle.png", "blue_square.png"])
    assert data["settings"]["num_frames"] == 5 and data["settings"]["num_inference_steps"] == 2
    assert data["settings"]["interface"] == "app" and data["made_by"] == "kaleido-s2v generate"
    written = Path(data["video"])  # in the output folder, the same bytes as served
    assert written.parent == runner.output_dir.resolve() and written.read_bytes() == Path(video).read_bytes()


def test_random_seed_is_reported_and_names_never_repeat(client):
    _, first = generate(client, seed=-1)  # no reference: the built-in model's default one
    _, second = generate(client, seed=-1)
    a, b = json.loads(Path(first).read_text()), json.loads(Path(second).read_text())
    assert isinstance(a["seed"], int) and a["seed"] >= 0 and a["references"] == ["builtin:default-reference"]
    assert a["video"] != b["video"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "not_an_image.png").write_text("hello")
    (root / "huge.png").write_bytes(np.random.default_rng(0).bytes(UPLOAD_MB * 1024 * 1024 + 1))
    return root


BAD = {  # name -> (request, words of the one-line error)
    "empty prompt": (dict(prompt="  "), "prompt is empty"),
    "not an image": (dict(references=["not_an_image.png"]), "Reference image 'not_an_image.png' is not a readable"),
    "too many references": (dict(references=[str(EXAMPLES / "blue_square.png")] * 5), "more than the limit 4"),
    "size not a multiple": (dict(height=60), "Height 60 / Width 64: both must be positive multiples of 8"),
    "frames not 4k+1": (dict(frames=6), "Frames 6: must be of the form 4k+1"),
    "size too large": (dict(height=4096), "greater than maximum"),
    "bad seed": (dict(seed=-7), "Seed -7"),
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_request_is_one_error_line_and_the_next_one_works(app, client, bad_files, name):
    runner, _ = app
    request, words = BAD[name]
    if "references" in request:
        request = {**request, "references": [client_lib.handle_file(bad_files / r if "/" not in r else r)
                                             for r in request["references"]]}
    before = sorted(runner.output_dir.iterdir())
    with pytest.raises(client_lib.exceptions.AppError) as e:
        generate(client, **request)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert sorted(runner.output_dir.iterdir()) == before  # nothing written
    generate(client, steps=1, frames=1)


def test_a_huge_upload_is_refused_and_the_next_request_works(app, client, bad_files):
    import httpx

    _, url = app
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client knows the server's limit
        generate(client, references=[client_lib.handle_file(bad_files / "huge.png")])
    with open(bad_files / "huge.png", "rb") as f:  # the server refuses it too
        r = httpx.post(f"{url}gradio_api/upload", files={"files": ("huge.png", f, "image/png")})
    assert r.status_code == 413
    generate(client, steps=1, frames=1)


def _long_job(client):
    """A 100-step run submitted from `client` (long enough to cancel), and the deadline of the waits on it."""
    job = client.submit(prompt=PROMPT, references=None, steps=100, frames=17, height=128, width=128,
                        api_name="/generate")
    return job, time.time() + 30


def wait_until(condition, job, deadline) -> None:
    while not condition():
        assert time.time() < deadline and not job.done()
        time.sleep(0.05)


def test_cancel_stops_a_run_between_steps_and_the_next_one_works(app, client):
    runner, _ = app
    before = sorted(runner.output_dir.iterdir())
    job, deadline = _long_job(client)
    wait_until(lambda: runner.cancels.cancel(client.session_hash), job, deadline)  # as the page's Cancel button
    with pytest.raises(client_lib.exceptions.AppError, match=r"Cancelled: cancelled (after step \d+ of 100|before)"):
        job.result(timeout=60)
    assert sorted(runner.output_dir.iterdir()) == before
    generate(client, steps=1, frames=1)


def test_a_client_cancel_frees_the_device(app, client):
    runner, _ = app
    before = sorted(runner.output_dir.iterdir())
    job, deadline = _long_job(client)
    wait_until(lambda: runner.busy, job, deadline)
    job.cancel()
    while runner.busy:  # the run stops at its next step, not after 100
        assert time.time() < deadline
        time.sleep(0.05)
    assert sorted(runner.output_dir.iterdir()) == before
    generate(client, steps=1, frames=1)


def test_two_concurrent_requests_are_served_one_after_the_other(app, monkeypatch):
    runner, url = app
    intervals, real = [], runner.generate

    def timed(*args, **kwargs):  # outside the runner's own device lock: this sees what the queue lets through
        start = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            intervals.append((start, time.perf_counter()))

    monkeypatch.setattr(runner, "generate", timed)
    clients = [client_lib.Client(url, verbose=False) for _ in range(2)]
    jobs = [c.submit(prompt=PROMPT, references=None, steps=10, frames=9, api_name="/generate") for c in clients]
    results = [j.result(timeout=120) for j in jobs]
    assert all(Path(video).is_file() for video, _ in results)
    (s1, e1), (s2, e2) = sorted(intervals)
    assert e1 <= s2


def test_only_the_output_folder_is_served(app, client):
    import httpx

    runner, url = app
    generate(client, steps=1, frames=1)
    video = next(runner.output_dir.glob("*.mp4"))
    assert httpx.get(f"{url}gradio_api/file={video.resolve()}").status_code == 200
    for outside in ("/etc/passwd", Path(__file__).resolve(), runner.output_dir.parent / "x"):
        assert httpx.get(f"{url}gradio_api/file={outside}").status_code in (403, 404)
    assert {p.suffix for p in runner.output_dir.iterdir()} <= {".mp4", ".json"}
    assert not list(runner.output_dir.glob(".*tmp*"))  # atomic writes left no temporary file


def test_the_api_is_the_generate_endpoint_only(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/generate"] and not api["unnamed_endpoints"]
    names = [p["parameter_name"] for p in api["named_endpoints"]["/generate"]["parameters"]]
    assert names == ["prompt", "references", "seed", "negative_prompt", "height", "width", "frames", "steps",
                     "guidance", "fps", "enhance_prompt"]


def test_nothing_but_the_local_server_was_contacted(app):  # last of the server tests: all of them ran by now
    import ipaddress
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
    hosts = {a[0] for a in CONNECTIONS if isinstance(a, tuple)}
    assert hosts and all(h == "localhost" or ipaddress.ip_address(h).is_loopback for h in hosts), hosts


# ---------------------------------------------------------------------------------------------------- no server
def test_a_real_model_needs_a_reference(tmp_path):
    from kaleido_s2v.builtin import builtin_model_dir

    runner = Runner(AppOptions(model=str(builtin_model_dir()), output_dir=tmp_path))  # a folder: not "built-in"
    with pytest.raises(UserInputError) as e:
        runner.generate(PROMPT, [])
    assert page_message(str(e.value)) == "No reference image: give at least one (upload it under Reference images)"


def test_previews_are_what_the_model_sees(tmp_path):
    runner = Runner(AppOptions(output_dir=tmp_path))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (200, 100), (255, 0, 0)).save(wide)
    [image] = runner.preview([str(wide)], 64, 48)
    assert image.size == (48, 64)  # fitted into 64x48, padded white
    px = np.asarray(image)
    assert (px[0, 0] == 255).all() and tuple(px[32, 24]) == (255, 0, 0)
    assert runner.preview([]) and runner.preview([])[0].size == (64, 64)  # the default reference


def test_start_up_options_are_checked_before_loading(tmp_path):
    runner = Runner(AppOptions(output_dir=tmp_path, cache="magcache"))  # the built-in model ships 20-step ratios
    assert runner.limits.fixed_steps == 20 and runner.settings(steps=20)[0]["num_inference_steps"] == 20
    with pytest.raises(UserInputError, match="--steps 10: --cache magcache was calibrated for 20 steps"):
        runner.settings(steps=10)
    for options, words in ((dict(max_references=0), "--max-references 0"), (dict(cache="magcache-calibrate"), "--cache"),
                           (dict(cpu_offload=True, group_offload=True), "exclude each other")):
        with pytest.raises(UserInputError, match=words):
            Runner(AppOptions(output_dir=tmp_path, **options))


def test_enhance_prompt_rewrites_with_the_apps_enhancer_and_records_both(tmp_path):
    from kaleido_s2v.prompts import make_enhancer
    from tests.test_prompts import ChatServer

    caption = "The red striped circle slides to the left across a sandy floor."
    server = ChatServer()
    server.reply = server.answer(f"Caption: {caption}")
    try:
        with pytest.raises(UserInputError, match="started without an enhancer"):
            Runner(AppOptions(output_dir=tmp_path)).generate(PROMPT, [], enhance=True)
        runner = Runner(AppOptions(output_dir=tmp_path, enhancer=make_enhancer(url=server.url, model="test")))
        runner.load()
        result = runner.generate("a circle moves left", [str(EXAMPLES / "red_striped_circle.png")], seed=0,
                                 settings=SMALL, enhance=True)
    finally:
        server.close()
    sidecar = json.loads(Path(result["sidecar"]).read_text())
    assert sidecar["prompt"] == caption and sidecar["original_prompt"] == "a circle moves left"
    assert sidecar["enhancer"]["url"] == server.url + "/chat/completions" and len(server.requests) == 1
    [image_part] = [p for p in server.requests[0]["messages"][1]["content"] if p["type"] == "image_url"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")  # the enhancer saw the reference


def test_cancel_board_reaches_waiting_and_running_requests():
    board = CancelBoard()
    board.arm("a")
    assert board.cancel("b") == 0
    with board.running("a") as flag:
        assert board.cancel("a") == 1 and flag.is_set()
    board.arm("a")
    board.cancel("a")
    with board.running("a") as flag:  # cancelled while it waited
        assert flag.is_set()
    with board.running("a") as flag:  # a fresh request
        assert not flag.is_set()


def test_messages_use_the_page_labels():
    assert page_message("--steps 0: must be at least 1", ()) == "Steps 0: must be at least 1"
    assert page_message("--ref image 2 '/tmp/gradio/ab12/cat.png' is not a readable image", ["/tmp/gradio/ab12/cat.png"]) \
        == "Reference image 2 'cat.png' is not a readable image"
    assert page_message("raise --max-references") == "Raise --max-references"


# ---------------------------------------------------------------------------------------------------- the CLI
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kaleido-s2v app: error: "), err
    return err[0]


def test_cli_port_in_use_is_one_line_exit_2(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port), "--output-dir", str(tmp_path / "o")]) == 2
    assert f"--port {port}" in _one_error_line(capsys) and not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, words", [
    (["--auth", "nopassword"], "--auth must be USER:PASS"),
    (["--port", "70000"], "--port 70000"),
    (["--host", "no.such.host.invalid"], "--host 'no.such.host.invalid'"),
    (["--model", "/no/such/model"], "--model"),
    (["--enhancer-model", "x"], "--enhancer-model names the model a server serves"),
    (["--steps", "3"], None),  # argparse: a per-request setting, not a flag of the app
])
def test_cli_bad_flags_are_one_line_exit_2(tmp_path, capsys, flags, words):
    argv = ["app", "--port", str(free_port()), "--output-dir", str(tmp_path / "o"), *flags]
    if words is None:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        return
    assert main(argv) == 2
    assert words in _one_error_line(capsys) and not (tmp_path / "o").exists()


def test_cli_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["app", "--port", str(free_port()), "--output-dir", str(tmp_path)]) == 2
    assert "--output-dir" in _one_error_line(capsys) and (tmp_path / "mine.txt").read_text() == "keep"


def test_cli_warns_on_an_open_host_without_auth(tmp_path, capsys, monkeypatch):
    def stop(self):
        raise UserInputError("stopped by the test")

    monkeypatch.setattr(Runner, "load", stop)
    for flags, warned in ((["--host", "0.0.0.0"], True), (["--host", "0.0.0.0", "--auth", "me:pw"], False),
                          ([], False)):
        assert main(["app", "--port", str(free_port()), "--output-dir", str(tmp_path / "o"), *flags]) == 2
        err = capsys.readouterr().err
        assert ("warning: --host 0.0.0.0" in err) == warned and "stopped by the test" in err
        assert not (tmp_path / "o").exists()  # an early failure leaves no output folder



def test_help_imports_neither_gradio_nor_torch():
    import subprocess
    import sys

    code = ("import contextlib, io, sys\nfrom kaleido_s2v.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "    main(['app', '--help'])\nassert '--auth USER:PASS' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'gradio') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr

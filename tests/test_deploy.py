"""The deployment files agree with the app: Dockerfile, docker-compose.yml, .env.example.

No Docker engine runs here, so the files are parsed and their commands, ports, health checks,
volumes and settings are checked against the real CLI, the real app and the real Settings.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml

from api.app import create_app
from api.cli import get_args_parser
from api.settings import Settings
from captioner.caption.captioner import Captioner
from captioner.vocab import Vocabulary
from tests.conftest import TINY_CAPTIONS, tiny_model
from tests.test_web_page import serving

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"https?://(?P<host>[\w.\-]+):(?P<port>\d+)(?P<path>/[\w/\-.]*)")


# -- parsing ----------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


def dockerfile() -> tuple[list[tuple[str, str]], list[Stage]]:
    """(instructions before the first FROM, stages): continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"

    preamble: list[tuple[str, str]] = []
    stages: list[Stage] = []
    for text in logical:
        keyword, _, args = text.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif stages:
            stages[-1].instructions.append((keyword, args))
        else:
            preamble.append((keyword, args))
    return preamble, stages


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) CMD or HEALTHCHECK command."""
    command = json.loads(args)
    assert isinstance(command, list) and all(isinstance(a, str) for a in command), args
    return command


def healthcheck_command(args: str) -> list[str]:
    """`HEALTHCHECK [--opt=value ...] CMD [...]` -> the command."""
    options, _, command = args.partition("CMD ")
    assert all(o.startswith("--") for o in options.split()), options
    return exec_form(command)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: {line!r} is not KEY=value"
            assert key not in values, f".env.example sets {key} twice"
            values[key] = value
    return values


def stage(name: str) -> Stage:
    _, stages = dockerfile()
    [found] = [s for s in stages if s.name == name]
    return found


def serve_port(command: list[str]) -> int:
    """The command is a valid `captioner serve ...`; its port."""
    assert command[0] == "captioner", command
    args = get_args_parser().parse_args(command[1:])
    assert args.command == "serve" and args.host == "0.0.0.0", args
    return args.port


def health_url(command: list[str]) -> re.Match:
    [url] = [m for part in command for m in URL.finditer(part)]
    return url


# -- the app the files point at ---------------------------------------------------------------------


def save_captioner(path: Path) -> Path:
    vocab = Vocabulary.build(TINY_CAPTIONS)
    return Captioner(tiny_model(len(vocab)), vocab, name="tiny", version="1").save(path)


def app_paths() -> set[str]:
    """The app's HTTP paths, as its OpenAPI schema lists them."""
    return set(create_app(Settings()).openapi()["paths"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_captioner(tmp_path_factory.mktemp("deploy") / "captioner")


def settings_for(caption_model: Path) -> Settings:
    return Settings(caption_model=caption_model, vqa_model=None, api_key=None)


# -- Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_base_is_a_build_argument_defaulting_to_cpu_python():
    preamble, stages = dockerfile()
    assert ("ARG", "BASE=python:3.11-slim") in preamble
    assert stages[0].base == "${BASE}"
    assert {s.name for s in stages} >= {"base", "training", "runtime"}
    assert stages[-1].name == "runtime", "the API must be the default (last) build target"
    assert all(s.base in ("${BASE}", "base") for s in stages)


def test_dockerfile_pins_torch_and_installs_the_project():
    runs = " ".join(stage("base").all("RUN"))
    assert "torch==2.14.1" in runs and "torchvision==0.29.1" in runs
    assert re.search(r"pip install \.(\s|$)", runs)
    copied = " ".join(stage("base").all("COPY"))
    for package in ("captioner", "api", "training", "pyproject.toml"):
        assert package in copied


def test_runtime_command_port_and_healthcheck_agree_with_the_app():
    runtime = stage("runtime")
    port = serve_port(exec_form(runtime.last("CMD")))
    assert runtime.all("EXPOSE") == [str(port)]
    url = health_url(healthcheck_command(runtime.last("HEALTHCHECK")))
    assert url["host"] == "127.0.0.1" and int(url["port"]) == port
    assert url["path"] == "/ready" and "/ready" in app_paths()


def test_images_run_as_a_non_root_user():
    for name in ("runtime", "training"):
        user = stage(name).last("USER")
        assert user.split(":")[0] not in ("root", "0"), f"{name} runs as {user}"
    assert any("useradd" in run for run in stage("base").all("RUN"))


def test_training_image_has_java_for_meteor_and_valid_default_command():
    training = stage("training")
    assert "default-jre-headless" in " ".join(training.all("RUN"))
    command = exec_form(training.last("CMD"))
    assert command[:3] == ["python", "-m", "training.train_captioner"]


def test_dockerfile_model_paths_are_real_settings_under_the_models_mount():
    env = " ".join(stage("base").all("ENV"))
    for key, value in re.findall(r"(CAPTIONER_\w+)=(\S+)", env):
        assert key.removeprefix("CAPTIONER_").lower() in Settings.model_fields, key
        assert value.startswith("/app/models/"), (key, value)


def test_dockerignore_keeps_the_context_small_but_has_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "allow-list: everything is left out unless named"
    included = {p[1:] for p in patterns if p.startswith("!")}
    assert included >= {"pyproject.toml", "README.md", "captioner", "api", "training", "models"}
    assert not included & {".venv", ".git", "runs", "data", "test-artifacts", "tests"}


# -- docker-compose.yml -----------------------------------------------------------------------------


def test_compose_api_command_port_and_healthcheck_agree_with_the_app():
    api = compose()["services"]["api"]
    port = serve_port(api["command"])
    assert api["ports"] == [f"{port}:{port}"]
    test = api["healthcheck"]["test"]
    assert test[0] == "CMD"
    url = health_url(test[1:])
    assert int(url["port"]) == port and url["path"] == "/ready" and "/ready" in app_paths()
    assert test[1:] == healthcheck_command(stage("runtime").last("HEALTHCHECK"))
    assert api["build"]["target"] == "runtime"


def test_compose_mounts_models_read_only_and_reads_the_env_file():
    services = compose()["services"]
    api = services["api"]
    assert "./models:/app/models:ro" in api["volumes"]
    assert {"path": ".env", "required": False} in api["env_file"]
    for name, value in env_example().items():
        if name.endswith("_MODEL") and value:
            assert value.startswith("/app/models/"), (name, value)


def test_compose_training_profile_runs_the_real_scripts():
    train = compose()["services"]["train"]
    assert train["profiles"] == ["training"]
    assert train["build"]["target"] == "training"
    shell, flag, script = train["command"]
    assert (shell, flag) == ("sh", "-c")
    steps = [shlex.split(step) for step in script.split("&&")]
    assert [s[:3] for s in steps] == [
        ["python", "-m", "training.make_shapes"],
        ["python", "-m", "training.train_captioner"],
    ]
    from training import make_shapes, train_captioner

    made = make_shapes.get_args_parser().parse_args(steps[0][3:])
    trained = train_captioner.get_args_parser().parse_args(steps[1][3:])
    assert trained.data == str(made.out)  # trains on what the first step wrote
    for mount in ("./data:/app/data", "./runs:/app/runs"):
        assert mount in train["volumes"]


# -- health check behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("loads", [True, False], ids=["model-loads", "model-missing"])
def test_healthcheck_passes_when_ready_and_fails_when_not(model_dir, tmp_path, loads):
    """/ready answers 200 or 503, and the image's health-check command, run for real against a
    live server (its URL swapped in), exits 0 or 1 accordingly."""
    command = healthcheck_command(stage("runtime").last("HEALTHCHECK"))
    url = health_url(command)
    with serving(settings_for(model_dir if loads else tmp_path / "missing")) as base:
        assert httpx.get(base + url["path"]).status_code == (200 if loads else 503)
        swapped = [part.replace(url[0], base + url["path"]) for part in command]
        assert swapped[0] == "python" and swapped != command
        done = subprocess.run([sys.executable, *swapped[1:]], capture_output=True, timeout=30)
        assert done.returncode == (0 if loads else 1), done.stderr.decode()


# -- .env.example -----------------------------------------------------------------------------------


def test_env_example_lists_every_setting_and_nothing_else():
    keys = {k.removeprefix("CAPTIONER_").lower() for k in env_example()}
    assert all(k.startswith("CAPTIONER_") for k in env_example())
    assert keys == set(Settings.model_fields)


def test_env_example_values_are_valid_and_the_defaults(monkeypatch):
    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    from_file = Settings()
    defaults = Settings.model_construct()  # the declared defaults, no environment
    for name in Settings.model_fields:
        if name in ("caption_model", "vqa_model"):
            continue  # container paths: checked against the models mount above
        assert getattr(from_file, name) == getattr(defaults, name), name
    assert from_file.api_key is None and from_file.cors_origins == []

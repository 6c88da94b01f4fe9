"""The container and Terraform stay consistent with the code they ship and run.

Nothing here builds an image or calls Google Cloud: the files are parsed (Dockerfile by hand,
Terraform with python-hcl2) and the nightly command line they produce is fed to Beam's and
embedpipe's own option parsers, so drift between the pins, the Dockerfile, the infrastructure and
the CLI fails here instead of at 2 a.m. on Dataflow.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import pathlib
import re

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILE = ROOT / "Dockerfile"

# Values for the variables that have no default (the rest come from variables.tf).
REQUIRED_VARS = {"project_id": "my-project", "image_tag": "20260101-abc1234", "input": "gs://corpus/images/"}


# ---------------------------------------------------------------- helpers


def _pins(path: pathlib.Path) -> dict[str, Requirement]:
    """name -> Requirement of a requirements file (comments and blank lines skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            found[req.name.lower()] = req
    return found


def _pinned_version(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} is not pinned with =="
    return specs[0].version


def _stages() -> list[dict]:
    """Dockerfile stages: {'from': image, 'name': alias, 'lines': [instructions]} (continuations joined)."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[dict] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if match:
            stages.append({"from": match.group(1), "name": match.group(2), "lines": []})
        else:
            assert stages, f"instruction before the first FROM: {line}"
            stages[-1]["lines"].append(line)
    return stages


def _beam_sdk_image() -> tuple[str, str]:
    """(python minor, beam version) of the apache/beam_pythonX.Y_sdk:V image the Dockerfile copies boot from."""
    images = [s["from"] for s in _stages() if s["from"].startswith("apache/beam_python")]
    assert len(images) == 1, f"expected one Beam SDK image, found {images}"
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", images[0])
    assert match, images[0]
    return match.group(1), match.group(2)


try:  # the Terraform tests need python-hcl2; the Dockerfile tests do not
    import hcl2
except ImportError:  # pragma: no cover - depends on the environment
    hcl2 = None

needs_hcl2 = pytest.mark.skipif(
    hcl2 is None, reason="python-hcl2 is not installed here (requirements-dev.txt pins python-hcl2==8.1.4)"
)


def _tf() -> dict[str, list]:
    """Every infra/*.tf parsed and merged by top-level block type."""
    merged: dict[str, list] = {}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as handle:
            for block, items in hcl2.load(handle).items():
                merged.setdefault(block, []).extend(items)
    return merged


def _named(tf: dict, block: str) -> dict:
    """{name: body} of `variable`/`output` blocks, or {type.name: body} of `resource`/`data` blocks."""
    out = {}
    for item in tf.get(block, []):
        for key, body in item.items():
            if block in ("resource", "data"):
                for name, inner in body.items():
                    out[f"{_unquote(key)}.{_unquote(name)}"] = inner
            else:
                out[_unquote(key)] = body
    return out


def _unquote(value):
    return value[1:-1] if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"' else value


class _Resolver:
    """Just enough HCL evaluation for the nightly command line: references to variables
    (defaults or REQUIRED_VARS), to locals that are plain string templates, and to the
    worker service account's email; function-call locals must be given in `extra_locals`."""

    def __init__(self, tf: dict, extra_locals: dict[str, str]) -> None:
        self.vars = {name: _unquote(body.get("default")) for name, body in _named(tf, "variable").items()}
        self.vars.update(REQUIRED_VARS)
        self.locals = {k: v for item in tf.get("locals", []) for k, v in item.items()}
        self.extra = extra_locals

    def ref(self, expr: str) -> str:
        expr = expr.strip()
        if expr.startswith("var."):
            value = self.vars[expr[4:]]
            assert value is not None, f"{expr} has no value to test with"
            return str(value)
        if expr.startswith("local."):
            name = expr[6:]
            if name in self.extra:
                return self.extra[name]
            return self.value(self.locals[name])
        if expr == "google_service_account.worker.email":
            return f"embedpipe-worker@{self.vars['project_id']}.iam.gserviceaccount.com"
        raise AssertionError(f"cannot evaluate {expr!r} in this test")

    def value(self, raw) -> str:
        if not isinstance(raw, str):
            return str(raw)
        whole = re.fullmatch(r"\$\{([^{}]+)\}", raw)
        if whole:
            return self.ref(whole.group(1))
        return re.sub(r"\$\{([^{}]+)\}", lambda m: self.ref(m.group(1)), _unquote(raw))


def _beam_option_flags() -> set[str]:
    """Every --flag of every PipelineOptions subclass Beam has registered."""
    import argparse

    from apache_beam.options.pipeline_options import PipelineOptions

    parser = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")
    pending = [PipelineOptions]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        cls._add_argparse_args(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


@pytest.fixture(scope="module")
def tf() -> dict:
    if hcl2 is None:
        pytest.skip("python-hcl2 is not installed here (requirements-dev.txt pins python-hcl2==8.1.4)")
    return _tf()


@pytest.fixture(scope="module")
def resolver(tf) -> _Resolver:
    project = REQUIRED_VARS["project_id"]
    # The two locals that are function calls, computed here the way main.tf computes them.
    hours = _Resolver(tf, {}).vars["driver_timeout_hours"]
    return _Resolver(
        tf,
        {"bucket_name": f"{project}-embedpipe", "dataflow_max_seconds": str(max(1800, int(hours) * 3600 - 1800))},
    )


@pytest.fixture(scope="module")
def nightly_argv(tf, resolver) -> list[str]:
    base = resolver.locals["nightly_base_args"]
    return [resolver.value(item) for item in base]


# ---------------------------------------------------------------- Dockerfile vs pins


def test_dockerfile_beam_version_matches_requirements():
    beam = _pins(ROOT / "requirements.txt")["apache-beam"]
    _, image_version = _beam_sdk_image()
    assert image_version == _pinned_version(beam), (
        f"Dockerfile copies boot from Beam {image_version} but requirements.txt pins apache-beam "
        f"{_pinned_version(beam)}: the SDK harness and the installed SDK must be one release"
    )


def test_dockerfile_python_is_one_version_everywhere():
    sdk_python, _ = _beam_sdk_image()
    bases = [s["from"] for s in _stages() if s["from"].startswith("python:")]
    assert len(bases) == 1, f"expected one python: base image, found {bases}"
    base_version = re.match(r"python:(\d+\.\d+)\.(\d+)-", bases[0])
    assert base_version, f"base image {bases[0]} must pin the patch version (python:X.Y.Z-...)"
    assert base_version.group(1) == sdk_python, (
        f"base image is Python {base_version.group(1)} but boot comes from the Python {sdk_python} SDK image"
    )
    python_requires = re.search(r"python_requires\s*=\s*[\"']([^\"']+)[\"']", (ROOT / "setup.py").read_text())
    assert python_requires, "setup.py declares no python_requires"
    full = f"{base_version.group(1)}.{base_version.group(2)}"
    assert Version(full) in SpecifierSet(python_requires.group(1)), (
        f"the image's Python {full} is outside setup.py's python_requires {python_requires.group(1)}"
    )
    tf_requires = importlib.metadata.metadata("tensorflow")["Requires-Python"]
    assert Version(full) in SpecifierSet(tf_requires), f"tensorflow needs Python {tf_requires}"


def test_gpu_pins_are_exactly_tensorflows_cuda_extra():
    """Every library of tensorflow[and-cuda] is pinned, and every pin is inside the extra's range."""
    tf_pin = _pinned_version(_pins(ROOT / "requirements.txt")["tensorflow"])
    installed = importlib.metadata.version("tensorflow")
    assert installed == tf_pin, f"this environment has tensorflow {installed}, requirements.txt pins {tf_pin}"
    extra = {}
    for line in importlib.metadata.requires("tensorflow") or []:
        req = Requirement(line)
        if req.marker and req.marker.evaluate({"extra": "and-cuda"}) and not req.marker.evaluate({"extra": ""}):
            extra[req.name.lower()] = req
    assert extra, "tensorflow has no and-cuda extra: the image would have no CUDA libraries"
    gpu = _pins(INFRA / "requirements-gpu.txt")
    assert "tensorflow" in gpu and "and-cuda" in gpu["tensorflow"].extras, (
        "requirements-gpu.txt must name tensorflow[and-cuda]"
    )
    assert not gpu["tensorflow"].specifier, "tensorflow's version lives in requirements.txt only"
    pins = {name: req for name, req in gpu.items() if name != "tensorflow"}
    assert sorted(pins) == sorted(extra), (
        "requirements-gpu.txt and tensorflow's and-cuda extra list different libraries"
    )
    for name, req in pins.items():
        version = _pinned_version(req)
        assert extra[name].specifier.contains(version), f"{name}=={version} is outside tensorflow's {extra[name]}"


def test_dockerfile_targets_worker_and_driver():
    stages = _stages()
    names = [s["name"] for s in stages]
    assert names[-1] == "worker", "the worker must be the last stage: a plain `docker build` builds it"
    worker, driver = stages[-1], stages[names.index("driver")]
    assert 'ENTRYPOINT ["/opt/apache/beam/boot"]' in worker["lines"]
    assert "COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam" in worker["lines"]
    assert 'ENTRYPOINT ["embedpipe"]' in driver["lines"]
    user = [line for line in driver["lines"] if line.startswith("USER ")]
    assert user and user[-1] not in ("USER root", "USER 0"), "the driver must run as a non-root user"
    runtime = "\n".join(stages[names.index("runtime")]["lines"])
    uid = user[-1].split()[1].split(":")[0]
    assert f"--uid {uid}" in runtime, f"USER {uid} of the driver is not the user the runtime stage creates"
    assert "pip check" in runtime


def test_dockerfile_bakes_the_weights_the_fingerprint_names():
    from pipeline.config import IMAGENET_NOTOP_MD5

    text = DOCKERFILE.read_text()
    assert "ARG BAKE_IMAGENET_WEIGHTS=0" in text
    baked = re.search(r"([0-9a-f]{32})\s+(\S+resnet50_weights_tf_dim_ordering_tf_kernels_notop\.h5)", text)
    assert baked, "the Dockerfile does not check the baked weights' md5"
    assert baked.group(1) == IMAGENET_NOTOP_MD5
    keras_home = re.search(r"KERAS_HOME=(\S+)", text).group(1)
    assert baked.group(2).startswith(f"{keras_home}/models/"), "the weights must land where Keras looks (KERAS_HOME)"


def test_dockerignore_lets_every_copied_file_in():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]

    def excluded(path: str) -> bool:
        # Docker semantics: the last matching pattern wins; a pattern also matches a file's parents.
        parts = path.split("/")
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts))):
                result = not negate
        return result

    sources = []
    for stage in _stages():
        for line in stage["lines"]:
            if line.startswith("COPY ") and "--from=" not in line:
                sources.extend(line.split()[1:-1])
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert not excluded(source), f"COPY {source} is excluded by .dockerignore"
    assert excluded("infra/terraform.tfstate") and excluded(".git/config"), ".dockerignore must keep state and .git out"


def test_image_install_keeps_every_package_file():
    """The image installs the package (not editable): files other than .py reach site-packages only if
    setup.py or MANIFEST.in declares them, so a template added under pipeline/ would vanish there."""
    data = [p for p in (ROOT / "pipeline").rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    if data:
        declared = (ROOT / "MANIFEST.in").exists() or "package_data" in (ROOT / "setup.py").read_text()
        assert declared, f"{[str(p.relative_to(ROOT)) for p in data]} would be missing from the image"


def test_every_lint_skip_says_why():
    files = [DOCKERFILE, *sorted(INFRA.glob("*.tf"))]
    skips = [(f.name, m) for f in files for m in re.finditer(r"#\s*checkov:skip=([A-Z0-9_]+)(:?)(.*)", f.read_text())]
    assert skips, "expected the documented checkov skips"
    for name, match in skips:
        assert match.group(2) == ":" and len(match.group(3).strip()) >= 30, f"{name}: {match.group(1)} has no reason"


# ---------------------------------------------------------------- Terraform


@needs_hcl2
def test_every_tf_file_parses():
    paths = sorted(INFRA.glob("*.tf"))
    assert {"variables.tf", "outputs.tf", "versions.tf"} <= {p.name for p in paths}
    for path in paths:
        with path.open() as handle:
            assert isinstance(hcl2.load(handle), dict), path


def test_providers_and_terraform_are_pinned(tf):
    block = tf["terraform"][0]
    assert _unquote(block["required_version"]).startswith(">=")
    google = block["required_providers"][0]["google"]
    assert _unquote(google["source"]) == "hashicorp/google"
    assert re.match(r"~>\s*\d+\.\d+", _unquote(google["version"])), "pin the provider's major version"


def test_variables_and_outputs_exist(tf):
    variables = _named(tf, "variable")
    for name in (
        "project_id",
        "region",
        "gpu_type",
        "gpu_count",
        "machine_type",
        "schedule",
        "bucket_name",
        "image_tag",
    ):
        assert name in variables, f"variable {name} missing"
        assert _unquote(variables[name].get("description", "")), f"variable {name} has no description"
    outputs = _named(tf, "output")
    for name in ("bucket_name", "root", "latest_path", "worker_image", "driver_image", "nightly_job", "nightly_args"):
        assert name in outputs, f"output {name} missing"


def test_every_gpu_type_has_a_machine_family(tf):
    """The precondition that checks machine_type against gpu_type knows every allowed GPU."""
    validation = _named(tf, "variable")["gpu_type"]["validation"][0]["condition"]
    allowed = set(re.findall(r'\\?"(nvidia-[a-z0-9-]+)\\?"', validation))
    families = {_unquote(k) for item in tf["locals"] for k in item.get("gpu_families", {})}
    assert allowed and allowed == families
    default_gpu = _unquote(_named(tf, "variable")["gpu_type"]["default"])
    default_family = _unquote(_named(tf, "variable")["machine_type"]["default"]).split("-")[0]
    gpu_families = next(item["gpu_families"] for item in tf["locals"] if "gpu_families" in item)
    allowed_families = [_unquote(f) for f in gpu_families[f'"{default_gpu}"']]
    assert default_family in allowed_families, "the default machine type cannot carry the default GPU"


def test_bucket_is_private_versioned_and_expires_old_data(tf):
    bucket = _named(tf, "resource")["google_storage_bucket.data"]
    assert bucket["uniform_bucket_level_access"] is True
    assert _unquote(bucket["public_access_prevention"]) == "enforced"
    assert bucket["versioning"][0]["enabled"] is True
    assert bucket["force_destroy"] is False
    actions = [_unquote(rule["action"][0]["type"]) for rule in bucket.get("lifecycle_rule", [])]
    assert "AbortIncompleteMultipartUpload" in actions and actions.count("Delete") >= 2
    dynamic = {_unquote(k): v for item in bucket.get("dynamic", []) for k, v in item.items()}
    runs_rule = dynamic.get("lifecycle_rule", {}).get("content", [{}])[0]
    assert runs_rule.get("condition", [{}])[0].get("matches_prefix") == ['"${var.root_prefix}/runs/"'], (
        "the safety-net rule for old runs is missing"
    )
    assert _unquote(runs_rule["action"][0]["type"]) == "Delete"


def test_scheduler_starts_the_nightly_driver(tf):
    resources = _named(tf, "resource")
    scheduler = resources["google_cloud_scheduler_job.nightly"]
    target = scheduler["http_target"][0]
    assert _unquote(target["http_method"]) == "POST"
    uri = _unquote(target["uri"])
    assert uri.startswith("https://run.googleapis.com/v2/projects/${var.project_id}/locations/${var.region}/jobs/")
    assert uri.endswith("${google_cloud_run_v2_job.nightly.name}:run")
    assert target["oauth_token"][0]["service_account_email"] == "${google_service_account.scheduler.email}"
    grant = resources["google_cloud_run_v2_job_iam_member.scheduler_runs_nightly"]
    assert _unquote(grant["role"]) == "roles/run.invoker"
    assert grant["member"] == '"serviceAccount:${google_service_account.scheduler.email}"'

    job = resources["google_cloud_run_v2_job.nightly"]
    task = job["template"][0]["template"][0]
    container = task["containers"][0]
    assert container["image"] == "${local.driver_image}"
    assert container["args"] == "${local.nightly_args}"
    assert task["service_account"] == "${google_service_account.driver.email}"


def test_nightly_command_parses_as_a_dataflow_gpu_job(resolver, nightly_argv):
    from apache_beam.options.pipeline_options import (
        DebugOptions,
        GoogleCloudOptions,
        PipelineOptions,
        SetupOptions,
        StandardOptions,
        WorkerOptions,
    )

    assert nightly_argv[0] == "nightly"
    assert "--require-gpu" in nightly_argv
    options = PipelineOptions(nightly_argv[1:])
    project = REQUIRED_VARS["project_id"]
    assert options.view_as(StandardOptions).runner == "DataflowRunner"
    cloud = options.view_as(GoogleCloudOptions)
    assert cloud.project == project
    assert cloud.region == resolver.vars["region"]
    assert cloud.temp_location == f"gs://{project}-embedpipe/dataflow/tmp"
    assert cloud.service_account_email == f"embedpipe-worker@{project}.iam.gserviceaccount.com"
    gpu, count = resolver.vars["gpu_type"], resolver.vars["gpu_count"]
    assert f"worker_accelerator=type:{gpu};count:{count};install-nvidia-driver" in cloud.dataflow_service_options
    assert any(o.startswith("max_workflow_runtime_walltime_seconds=") for o in cloud.dataflow_service_options)
    worker = options.view_as(WorkerOptions)
    assert worker.sdk_container_image == (
        f"{resolver.vars['region']}-docker.pkg.dev/{project}/{resolver.vars['repository_id']}"
        f"/embedpipe:{REQUIRED_VARS['image_tag']}"
    )
    assert worker.machine_type == resolver.vars["machine_type"]
    assert worker.disk_size_gb == int(resolver.vars["worker_disk_gb"])
    assert worker.max_num_workers == int(resolver.vars["max_workers"])
    assert "no_use_multiple_sdk_containers" in options.view_as(DebugOptions).experiments
    assert options.view_as(SetupOptions).sdk_location == "container"


def test_nightly_command_is_what_the_cli_accepts(nightly_argv):
    from pipeline.cli import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    if "nightly" not in subcommands:
        pytest.skip("`embedpipe nightly` is not implemented yet: nothing to check the infra's command line against")
    args, beam_args = parser.parse_known_args(nightly_argv)
    # What embedpipe does not take goes to Beam unchanged: each such flag must be one Beam knows,
    # or the night would fail (or silently drop an option) at submission.
    beam_flags = _beam_option_flags()
    unknown = [a.split("=")[0] for a in beam_args if a.startswith("--") and a.split("=")[0] not in beam_flags]
    assert not unknown, f"neither `embedpipe nightly` nor Beam knows {unknown}"
    assert args.require_gpu is True
    assert args.input == REQUIRED_VARS["input"]


def test_the_worker_image_installs_the_gpu_decoder_the_tests_run():
    decode = _pins(INFRA / "requirements-gpu-decode.txt")
    dev = _pins(ROOT / "requirements-dev.txt")
    assert set(decode) == {"nvidia-nvimgcodec-cu12", "nvidia-nvjpeg-cu12"}
    assert _pinned_version(decode["nvidia-nvimgcodec-cu12"]) == _pinned_version(dev["nvidia-nvimgcodec-cu12"]), (
        "the worker image and the tests must run the same nvImageCodec"
    )
    runtime = "\n".join(_stages()[[s["name"] for s in _stages()].index("runtime")]["lines"])
    assert "requirements-gpu-decode.txt" in runtime, "the worker image must install the GPU decoder"

"""The cluster deployment (deploy/k8s): every manifest validated offline against the Kubernetes API schemas
shipped in the `kubernetes-validate` package (strict: unknown fields are errors), and the invariants that tie
the manifests to the image and the code: probe paths are the API's routes, the autoscaling metric is one the
API exports, the GPU is requested, the Secret carries the key, and the generation Job's indexes are exactly
`onestep generate`'s ranks."""

import copy
import http.server
import json
import math
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
# the oldest Kubernetes minor these manifests target (Indexed Job with backoffLimitPerIndex, autoscaling/v2,
# policy/v1) and the newest one whose schemas kubernetes-validate 1.37.0 ships
K8S_VERSIONS = ("1.30.0", "1.37.0")
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _docs() -> list[tuple[Path, dict]]:
    out = []
    for f in _manifest_files():
        out += [(f, d) for d in yaml.safe_load_all(f.read_text()) if d]
    return out


def _one(kind: str, component: str | None = None) -> dict:
    found = [d for _, d in _docs() if d["kind"] == kind
             and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)]
    assert len(found) == 1, f"expected one {kind} ({component}), found {len(found)}"
    return found[0]


def _container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "one container per pod: `onestep serve` runs Triton and the API together"
    return containers[0]


def _entrypoint() -> list[str]:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            return json.loads(line[len("ENTRYPOINT "):])
    raise AssertionError("no ENTRYPOINT in the Dockerfile")


def _parse(argv: list[str]):
    """Parse a container's command line (anything up to and including `onestep` dropped) as the CLI does."""
    from onestep.cli import build_parser

    return build_parser().parse_args(argv[argv.index("onestep") + 1:])


def _mounts(workload: dict) -> dict[str, dict]:
    """mountPath -> {mount, volume}"""
    vols = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    return {m["mountPath"]: {"mount": m, "volume": vols[m["name"]]} for m in _container(workload)["volumeMounts"]}


# --- schema validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_pinned_kubernetes_schemas(version):
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    docs = _docs()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler",
                                            "PodDisruptionBudget", "PersistentVolumeClaim", "Job"}
    for path, doc in docs:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']}/{doc['metadata']['name']} at {where}: {e.message}")


def test_the_validator_rejects_broken_manifests():
    """The check above is not vacuous: a misspelt field, a wrong type and a missing required field all fail."""
    kv = pytest.importorskip("kubernetes_validate.utils", reason="pip install kubernetes-validate")
    dep = _one("Deployment")
    typo, wrong_type, missing = copy.deepcopy(dep), copy.deepcopy(dep), copy.deepcopy(dep)
    _container(typo)["livenessProbe"]["httpGett"] = _container(typo)["livenessProbe"].pop("httpGet")
    _container(wrong_type)["ports"][0]["containerPort"] = "8080"
    del missing["spec"]["selector"]
    for bad in (typo, wrong_type, missing):
        with pytest.raises(kv.ValidationError):
            kv.validate(bad, K8S_VERSIONS[0], strict=True)


def test_kustomizations_list_exactly_the_manifests_beside_them():
    folders = sorted({p.parent for p in _manifest_files()})
    for folder in folders:
        kust = yaml.safe_load((folder / "kustomization.yaml").read_text())
        assert kust["kind"] == "Kustomization"
        listed = sorted(kust["resources"])
        assert listed == sorted(p.name for p in folder.glob("*.yaml") if p.name != "kustomization.yaml"), folder


# --- serving: selectors, probes, image, secret, GPU, autoscaling -------------------------------------------

def test_service_pdb_hpa_and_spread_select_the_deployment():
    dep = _one("Deployment")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc, pdb, hpa = _one("Service"), _one("PodDisruptionBudget"), _one("HorizontalPodAutoscaler")
    assert svc["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for c in dep["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
        assert c["labelSelector"]["matchLabels"].items() <= labels.items()
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", dep["metadata"]["name"])
    assert "replicas" not in dep["spec"], "the HPA owns the replica count; a fixed one fights it on every apply"
    port = _container(dep)["ports"][0]
    assert svc["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    claims = {d["metadata"]["name"] for _, d in _docs() if d["kind"] == "PersistentVolumeClaim"}
    for kind in ("Deployment", "Job"):
        for v in _one(kind)["spec"]["template"]["spec"]["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, v


def test_container_runs_the_image_entrypoint_as_its_user():
    dep = _one("Deployment")
    c = _container(dep)
    assert "command" not in c, "the pod runs the image's entrypoint (onestep serve), like docker run"
    entry = _entrypoint()
    assert entry[1:3] == ["onestep", "serve"]
    args = _parse(entry + c.get("args", []))
    assert args.fn.__module__ == "serving.cli" and args.fn.__name__ == "cmd_serve"
    assert args.host == "0.0.0.0" and not args.insecure
    assert c["ports"][0]["containerPort"] == args.port
    mounts = _mounts(dep)
    repo = mounts[args.repo]
    assert repo["mount"]["readOnly"] is True and repo["volume"]["persistentVolumeClaim"]["readOnly"] is True
    uid = int(next(line.split()[1].split(":")[0] for line in DOCKERFILE.read_text().splitlines()
                   if line.startswith("USER ")))
    pod_sc = dep["spec"]["template"]["spec"]["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == uid
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # with a read-only root: tempfile (Triton's repository view and log) and the python backend's /dev/shm
    assert "emptyDir" in mounts["/tmp"]["volume"]
    assert mounts["/dev/shm"]["volume"]["emptyDir"]["medium"] == "Memory"


def test_api_key_comes_from_a_secret_file_never_from_args_or_literals():
    dep = _one("Deployment")
    c = _container(dep)
    env = {e["name"]: e for e in c.get("env", [])}
    assert "ONESTEP_API_KEY" not in env or "valueFrom" in env["ONESTEP_API_KEY"], "no literal key in the manifest"
    path = Path(env["ONESTEP_API_KEY_FILE"]["value"])
    mount = _mounts(dep)[str(path.parent)]
    assert mount["mount"]["readOnly"] is True
    secret = mount["volume"]["secret"]
    assert path.name in [i["path"] for i in secret.get("items", [])] or "items" not in secret
    # readable by the container's user: 0440 with the pod's fsGroup, or 0444
    assert secret["defaultMode"] in (0o440, 0o444) and dep["spec"]["template"]["spec"]["securityContext"]["fsGroup"]
    assert not any("key" in a.lower() for a in c.get("args", [])), c.get("args")
    assert not any(d["kind"] == "Secret" for _, d in _docs()), "the key is created at deploy time, not committed"


def _api_routes() -> tuple[set[str], tuple[str, ...]]:
    from serving.api import OPEN_PATHS, APISettings, create_app

    app = create_app(APISettings())
    return {getattr(r, "path", None) for r in app.routes}, OPEN_PATHS


def _probe_url(probe: dict, container: dict) -> tuple[str, str]:
    """(path, how): an httpGet probe's path, or the URL path an exec probe's Python fetches."""
    if "httpGet" in probe:
        port = probe["httpGet"]["port"]
        assert port in (container["ports"][0]["name"], container["ports"][0]["containerPort"])
        return probe["httpGet"]["path"], "httpGet"
    cmd = probe["exec"]["command"]
    assert cmd[:3] == ["python3", "-I", "-c"], cmd
    compile(cmd[3], "<probe>", "exec")
    prefix = f"http://127.0.0.1:{container['ports'][0]['containerPort']}/"
    start = cmd[3].index(prefix) + len(prefix) - 1
    return cmd[3][start:cmd[3].index("'", start)], "exec"


def test_probes_hit_the_apis_health_routes():
    routes, open_paths = _api_routes()
    c = _container(_one("Deployment"))
    expected = {"livenessProbe": "/healthz", "startupProbe": "/healthz", "readinessProbe": "/readyz"}
    for name, path in expected.items():
        got, how = _probe_url(c[name], c)
        assert got == path and got in routes, (name, got)
        if how == "httpGet":  # a kubelet probe sends no API key: the path must be open
            assert got in open_paths, f"{name} on {got} would get 401 (not in serving.api.OPEN_PATHS)"
        else:
            assert "ONESTEP_API_KEY_FILE" in c[name]["exec"]["command"][3]


class _FakeAPI(http.server.BaseHTTPRequestHandler):
    key, status = "s3cret", 200

    def do_GET(self):  # noqa: N802
        ok = self.path == "/readyz" and self.headers.get("X-API-Key") == self.key
        self.send_response(self.status if ok else 401)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status,key,passes", [(200, "s3cret", True), (503, "s3cret", False),
                                               (200, "wrong", False)])
def test_readiness_probe_command_passes_only_when_ready(tmp_path, status, key, passes):
    import subprocess
    import sys

    c = _container(_one("Deployment"))
    code = c["readinessProbe"]["exec"]["command"][3]
    handler = type("H", (_FakeAPI,), {"status": status})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        code = code.replace(f"127.0.0.1:{c['ports'][0]['containerPort']}", f"127.0.0.1:{srv.server_port}")
        (tmp_path / "api-key").write_text(key + "\n")
        res = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30,
                             env={"ONESTEP_API_KEY_FILE": str(tmp_path / "api-key")})
    finally:
        srv.shutdown()
        srv.server_close()
    assert (res.returncode == 0) == passes, res.stderr


def test_gpu_is_requested_by_serving_and_generation():
    for kind in ("Deployment", "Job"):
        w = _one(kind)
        res = _container(w)["resources"]
        assert int(res["limits"]["nvidia.com/gpu"]) >= 1, kind
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"], kind  # extended resource
        assert _container(w)["image"].rsplit(":", 1)[1].endswith("-gpu"), "GPU pods run the VARIANT=gpu image"


def test_autoscaler_follows_the_apis_inflight_gauge():
    from serving.api import Metrics

    hpa = _one("HorizontalPodAutoscaler")
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    exported = {m.name: m.type for m in Metrics().registry.collect()}
    assert exported.get(name) == "gauge", f"{name} is not a gauge of serving.api.Metrics ({sorted(exported)})"
    c = _container(_one("Deployment"))
    args = _parse(_entrypoint() + c.get("args", []))
    target = float(metric["pods"]["target"]["averageValue"])
    assert 0 < target < args.max_inflight, "scale out before replicas answer 429"
    assert hpa["spec"]["minReplicas"] >= 2


def test_disruptions_and_shutdown_leave_room_to_drain():
    hpa, pdb, dep = _one("HorizontalPodAutoscaler"), _one("PodDisruptionBudget"), _one("Deployment")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain must leave a replica serving"
    args = _parse(_entrypoint() + _container(dep).get("args", []))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= args.drain + args.timeout + 5
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- offline generation: an Indexed Job whose indexes are the ranks ----------------------------------------

def _job_args() -> tuple[dict, object]:
    job = _one("Job")
    c = _container(job)
    entry = _entrypoint()
    assert c["command"] == [entry[0], "onestep", "generate"], "the serving image's entrypoint, another verb"
    return job, _parse(c["command"] + c["args"])


def test_job_indexes_are_generate_ranks():
    job, args = _job_args()
    spec, c = job["spec"], _container(job)
    assert spec["completionMode"] == "Indexed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    env = {e["name"]: e for e in c["env"]}
    assert env["RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == COMPLETION_INDEX
    assert int(env["WORLD_SIZE"]["value"]) == spec["completions"], "world size = completions: every shard is made"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    assert args.rank is None and args.world_size is None, "ranks come from RANK/WORLD_SIZE, not fixed flags"
    from onestep.noise import parse_seeds

    n_shards = math.ceil(len(parse_seeds(args.seeds)) / args.shard_size)
    assert n_shards >= spec["completions"], "more ranks than shards leaves ranks idle"
    mounts = _mounts(job)
    onnx = Path(args.onnx)
    models = mounts[str(onnx.parents[2])]
    assert models["mount"]["readOnly"] is True and onnx.parts[-2:] == ("1", "model.onnx")
    out = mounts[str(Path(args.out).parent)]
    assert "persistentVolumeClaim" in out["volume"] and not out["mount"].get("readOnly")


def test_job_command_makes_every_shard_once_across_its_ranks(tiny_artifacts, tmp_path, monkeypatch):
    """The Job's own arguments, with its volumes pointed at a tiny repository and a smaller seed range, run
    once per completion index with RANK/WORLD_SIZE set as the Job sets them: together the ranks make every
    shard exactly once."""
    job, _ = _job_args()
    c = _container(job)
    world = int({e["name"]: e for e in c["env"]}["WORLD_SIZE"]["value"])
    argv = list(c["args"])
    i = argv.index("--onnx")
    argv[i + 1] = str(tiny_artifacts["repo"] / "tiny" / "1" / "model.onnx")
    swaps = {"--out": str(tmp_path / "out"), "--seeds": f"0-{world * 2 * 5 - 1}", "--shard-size": "5",
             "--batch": "5", "--providers": "CPUExecutionProvider"}
    for flag, value in swaps.items():
        argv[argv.index(flag) + 1] = value
    for index in range(job["spec"]["completions"]):
        monkeypatch.setenv("RANK", str(index))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        args = _parse(c["command"] + argv + ["--threads", "1"])
        assert args.fn(args) == 0
    shards = sorted(p.name for p in (tmp_path / "out").glob("shard-*.npz"))
    assert shards == [f"shard-{k:06d}.npz" for k in range(world * 2)]
    assert json.loads((tmp_path / "out" / "job.json").read_text())["num_seeds"] == world * 10

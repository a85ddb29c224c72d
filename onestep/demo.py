"""`onestep demo`: the main job on the embedded default, end to end on this machine.

1. loads the shipped teacher and one-step student (artifacts/), samples both from the same seeds;
2. exports the student (and the teacher's denoiser) to ONNX with measured parity;
3. writes a Triton model repository, starts the REAL Triton server (bundled binary) and the HTTP API;
4. answers real requests over HTTP (the API) and gRPC (Triton), checks that every path returns the same
   image for the same (seed, label), times student vs teacher, and shuts everything down.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

ART = Path(__file__).resolve().parent.parent / "artifacts"
TEACHER = ART / "fmnist-teacher-attn.safetensors"  # the shipped student was distilled from it
STUDENT = ART / "fmnist-student.safetensors"


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def run_demo(out: str | Path = "runs/demo", teacher_steps: int = 18, port: int | None = None,
             teacher_path: str | Path = TEACHER, student_path: str | Path = STUDENT) -> dict:
    import torch

    from exporters.onnx_export import export_onnx
    from exporters.triton_repo import DEFAULT_MAX_QUEUE_DELAY_US, build_repository
    from onestep.checkpoint import load_model
    from onestep.data import to_uint8
    from onestep.images import save_grid
    from onestep.noise import seeded_noise
    from onestep.samplers import nfe, sample
    from serving.engine import ImageEngine

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {}
    teacher_path, student_path = Path(teacher_path), Path(student_path)
    for p in (teacher_path, student_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: it ships with the repository (git checkout -- artifacts/)")
    teacher, tmeta = load_model(teacher_path)
    student, smeta = load_model(student_path)
    _say(f"teacher {teacher_path.name}: {tmeta['num_parameters']/1e6:.2f}M params, trained "
         f"{tmeta.get('iteration')} iterations; student {student_path.name}: method {smeta.get('method')}, "
         f"sigma_g {smeta['model']['sigma_g']}")

    seeds = list(range(40))
    labels = torch.arange(40) % 10
    z = torch.from_numpy(seeded_noise(seeds, (1, 32, 32)))
    t0 = time.perf_counter()
    with torch.no_grad():
        x_student = student(z, labels).clamp(-1, 1)
    t_student = time.perf_counter() - t0
    t0 = time.perf_counter()
    x_teacher = sample(teacher, z, labels, "heun", teacher_steps).clamp(-1, 1)
    t_teacher = time.perf_counter() - t0
    x_teacher1 = sample(teacher, z, labels, "euler", 1).clamp(-1, 1)
    for name, x in (("student-1nfe", x_student), (f"teacher-heun-{nfe('heun', teacher_steps)}nfe", x_teacher),
                    ("teacher-euler-1nfe", x_teacher1)):
        save_grid(out / f"{name}.png", to_uint8(x.numpy()), nrow=10)
    summary["pytorch_40_images_s"] = {"student_1nfe": t_student, f"teacher_{nfe('heun', teacher_steps)}nfe": t_teacher}
    _say(f"40 images (seeds 0-39, classes 0-9) in PyTorch: student {t_student*1e3:.0f} ms (1 NFE), teacher {t_teacher*1e3:.0f} ms "
         f"({nfe('heun', teacher_steps)} NFE) -> {t_teacher / t_student:.1f}x; grids in {out}/")

    _say("exporting to ONNX (parity measured against PyTorch) ...")
    s_side = export_onnx(student_path, out / "student.onnx")
    t_side = export_onnx(teacher_path, out / "teacher.onnx")
    summary["onnx_parity_max_abs_err"] = {"student": s_side["parity"]["max_abs_err"],
                                          "teacher": t_side["parity"]["max_abs_err"]}
    _say(f"ONNX parity: student {s_side['parity']['max_abs_err']:.2e}, teacher {t_side['parity']['max_abs_err']:.2e}")
    repo = out / "model_repository"
    build_repository(repo, out / "student.onnx", "fmnist_student", out / "teacher.onnx", (("heun", teacher_steps),),
                     max_batch=64, max_queue_delay_us=DEFAULT_MAX_QUEUE_DELAY_US)
    _say(f"Triton model repository written to {repo}")

    reference = ImageEngine(out / "student.onnx").generate([7, 8], [7, 8])
    summary.update(_serve_and_ask(repo, reference, teacher_steps, port, out))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say(f"done: {out / 'summary.json'}")
    return summary


def _serve_and_ask(repo: Path, reference: np.ndarray, teacher_steps: int, port: int | None, out: Path) -> dict:
    import io

    from PIL import Image

    from onestep.data import FASHION_MNIST_CLASSES
    from serving.api import APISettings
    from serving.background import APIThread
    from serving.client import APIClient, TritonImageClient
    from serving.triton_server import TritonServer

    res: dict = {}
    t0 = time.perf_counter()
    with TritonServer(repo, ready_timeout=120) as ts:
        res["triton_ready_s"] = time.perf_counter() - t0
        _say(f"Triton {ts.http_url} (HTTP) / {ts.grpc_url} (gRPC) ready in {res['triton_ready_s']:.1f} s")
        api_thread = APIThread(APISettings(triton_url=ts.grpc_url, repository=str(repo)), port=port).start()
        try:
            api = APIClient(api_thread.url)
            png = api.generate_png("fmnist_student", seed=7, label=7)
            img = np.asarray(Image.open(io.BytesIO(png)))
            (out / "api-seed7-label7.png").write_bytes(png)
            grpc = TritonImageClient(ts.grpc_url, "grpc")
            via_grpc = grpc.generate("fmnist_student", [7, 8], [7, 8])
            same = bool(np.array_equal(img, reference[0, 0]) and np.array_equal(via_grpc, reference))
            _say(f"HTTP API answered POST /v1/generate (seed 7, label 7 = {FASHION_MNIST_CLASSES[7]}): "
                 f"{len(png)} bytes of PNG; identical to gRPC and in-process: {same}")
            if not same:
                raise RuntimeError("served images differ from the in-process reference")
            lat = {}
            for model in ("fmnist_student", f"teacher_heun{teacher_steps}"):
                grpc.generate(model, [0], [0])
                times = []
                for i in range(10):
                    t = time.perf_counter()
                    grpc.generate(model, [i], [i % 10])
                    times.append(time.perf_counter() - t)
                lat[model] = float(np.median(times) * 1e3)
            res["served_p50_ms_batch1"] = lat
            ratio = lat[f"teacher_heun{teacher_steps}"] / lat["fmnist_student"]
            _say(f"served through Triton gRPC, batch 1, p50 of 10: student {lat['fmnist_student']:.1f} ms, "
                 f"teacher {lat[f'teacher_heun{teacher_steps}']:.1f} ms -> {ratio:.1f}x faster")
            res["api_png_bytes"] = len(png)
            res["paths_identical"] = same
            grpc.close()
        finally:
            api_thread.stop()
    _say("Triton and the API are stopped")
    return res

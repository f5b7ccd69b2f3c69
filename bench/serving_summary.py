"""bench/results/serving_gpu_summary.json from the result files of the GPU steps (issue 13's figures),
each figure with the file, commit and GPU it comes from. Prints the summary.

    python bench/serving_summary.py            # reads bench/results/..., writes bench/results/serving_gpu_summary.json

Ratios are only ever taken inside one file (one run); where this session has no same-run ratio
(the torch baselines were not re-run with the v2 runtime), the earlier run's same-run ratio is given
with its own source, not recomputed across runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def load(rel: str) -> dict[str, Any]:
    return json.loads((RESULTS / rel).read_text())


def main() -> None:
    served = load("serving_gpu_h100/serving_gpu.json")
    cold = load("serving_gpu_h100/serving_gpu_cold.json")
    earlier = load("serving_gpu_h100_f4b798d.json")["summary"]  # the run that measured the torch baselines beside the runtime
    http = load("serving_gpu_h100/http_front_gpu.json")
    soak = load("serving_gpu_h100/service_soak_gpu_5min_af48002.json")
    soak10 = load("serving_gpu_h100/service_soak_gpu_10min_4ce2cf2.json")
    ray1 = load("ray_scale_gpu_h200x2/ray_scale_gpu.json")
    ray2 = load("ray_scale_gpu_h200x2/ray_scale_gpu_all.json")
    at256 = served["served"]["256"]
    one_image = [lv for lv in http["levels"] if lv["front_workers"] == 8 and lv["images_per_request"] == 1]
    eight = [lv for lv in http["levels"] if lv["front_workers"] == 8 and lv["images_per_request"] == 8]
    r1, r2 = ray1["results"], ray2["results"]
    raw1 = max(r1["raw_start"]["images_per_s"], r1["raw_end"]["images_per_s"])
    raw2 = max(r2["raw_start"]["images_per_s"], r2["raw_end"]["images_per_s"])
    summary: dict[str, Any] = {
        "revision": served["revision"],
        "gpu": served["gpu"],
        "model": served["model"],
        "runtime": served["runtime"],
        "encode_served_img_s": 64 * 1000 / at256["encode_b64_ms"],
        "decode_served_img_s": 64 * 1000 / at256["decode_b64_ms"],
        "encode_b1_ms": at256["encode_b1_ms"],
        "encode_512_served_img_s": 64 * 1000 / served["served"]["512"]["encode_b64_ms"],
        "decode_512_served_img_s": 64 * 1000 / served["served"]["512"]["decode_b64_ms"],
        "encode_served_over_best_torch": earlier["encode_served_over_best_torch"],
        "decode_served_over_best_torch": earlier["decode_served_over_best_torch"],
        "gpu_token_agreement": served["gate"]["token_agreement"],
        "gpu_decode_psnr_db": served["gate"]["decode_psnr_db"],
        "ready_s_warm_cache": served["load_s"] + served["warmup_s"],
        "ready_s_cold_cache": cold["load_s"] + cold["warmup_s"],
        "http_over_raw": min(lv["http_over_raw"] for lv in one_image),
        "http_over_raw_8_images": min(lv["http_over_raw"] for lv in eight) if eight else None,
        "http_over_raw_single_process": http["http_over_raw_min"].get("0"),
        "soak_minutes": soak["soak"]["seconds"] / 60,
        "soak_errors": sum(soak["soak"]["errors_by_status"].values()) if soak["soak"].get("errors_by_status") else 0,
        "soak_reload_ok": soak["verdict"]["reload_ok"],
        "soak_host_rss_growth": soak["soak"]["memory_growth"]["host_rss"]["growth"],
        "soak_gpu_memory_growth": soak["soak"]["memory_growth"]["gpu"]["growth"],
        "ray_1gpu_over_raw_steady": r1["ray_1"]["steady_images_per_s"] / raw1,
        "ray_1gpu_over_raw_wall": r1["ray_1"]["images_per_s"] / raw1,
        "ray_2gpu_over_1gpu_steady": r2["ray_all"]["steady_images_per_s"] / r1["ray_1"]["steady_images_per_s"],
        "ray_2gpu_over_2x_raw_steady": r2["ray_all"]["steady_images_per_s"] / (2 * raw2),
        "local_over_raw_steady": r1["local"]["steady_images_per_s"] / raw1,
    }
    sources = {
        "encode_served_img_s, decode_served_img_s, encode_b1_ms, *_512_*, gpu_token_agreement, ready_s_warm_cache": (
            f"serving_gpu_h100/serving_gpu.json ({served['gpu']}, revision {served['revision']}, warm Inductor cache)"
        ),
        "ready_s_cold_cache": "serving_gpu_h100/serving_gpu_cold.json (same machine, empty cache, 256² and 512² shapes)",
        "encode/decode_served_over_best_torch": (
            f"serving_gpu_h100_f4b798d.json: an earlier same-run measurement (revision {earlier.get('revision')}, {earlier.get('gpu')}, "
            "the v1 model: the same network and runtime); the torch baselines were not re-run this session"
        ),
        "http_over_raw*": (
            f"serving_gpu_h100/http_front_gpu.json (H100, revision {http['setup']['revision']}): front_workers=8, minimum over "
            "concurrency 32-256; 8-image requests at concurrency 32 and 64 only (128/256 skipped by the time budget)"
        ),
        "soak_*": (
            f"serving_gpu_h100/service_soak_gpu_5min_af48002.json (H100): 5 minutes (not 10) at {soak['verdict']['rate_fraction_of_saturation']:.3f} "
            "of saturation with a reload at the midpoint; the 10-minute run before the capture fix (4ce2cf2) had "
            f"{sum(soak10['soak']['errors_by_status'].values())} errors, all during its reload"
        ),
        "ray_*, local_*": (
            f"ray_scale_gpu_h200x2/ (2x {ray1['machine']['gpus'][0]}, revision {ray1['revision']}); 4-GPU machines were not lent: 2 GPUs, not 4"
        ),
    }
    out = {"summary": summary, "sources": sources}
    (RESULTS / "serving_gpu_summary.json").write_text(json.dumps(out, indent=1) + "\n")
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")


if __name__ == "__main__":
    main()

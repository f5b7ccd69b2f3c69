"""Not a measurement: the GPU serving figures gathered in one file.

Reads the result files of the GPU
serving runs (bench/results/serving/*, ray_scale/*) and writes bench/results/serving/summary.json, each
figure with the file, commit and GPU it comes from; prints the summary.

    python -m bench.serving_summary            # reads bench/results/..., writes bench/results/serving/summary.json

Ratios are only ever taken inside one file (one run); where there is no same-run ratio (the torch
baselines were not re-measured beside the v2 runtime), the earlier run's same-run ratio is given with
its own source, not recomputed across runs.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench.harness.record import RESULTS


def load(rel: str) -> dict[str, Any]:
    return json.loads((RESULTS / rel).read_text())


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    latest = load("serving/gpu-h100-2026-11-28-http-8-fronts/serving_gpu_256_b64.json")  # served and torch.compile at 256² b64, one run
    curve = load("serving/gpu-h100-2026-11-28-balanced-accept/serving_gpu.json")  # the served runtime at batch 1-64, 256², warm cache
    curve_cold = load("serving/gpu-h100-2026-11-28-balanced-accept/serving_gpu_cold.json")
    http_latest = load("serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu.json")  # balanced accept, 12 and 8 fronts
    http_shared = load(
        "serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu_shared_accept.json"
    )  # the same machine, shared accept, 12 fronts
    http_16 = load("serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu_16_fronts.json")
    http_797 = load("serving/gpu-h100-2026-11-28-http-8-fronts/http_front_gpu.json")
    http_inline = load(
        "serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu_04a78c5_shared.json"
    )  # inline decode, shared accept, 1 and 8 images
    local_797 = load("serving/gpu-h100-2026-11-28-http-8-fronts/local_engine_gpu.json")
    local_latest = load("serving/gpu-h100-2026-11-28-balanced-accept/local_engine_gpu.json")
    two = load("serving/gpu-h100-2026-11-28-balanced-accept/two_servers_gpu.json")
    served = load(
        "serving/gpu-h100-2026-11-28-reload-soak/serving_gpu.json"
    )  # the latest full runtime table, batch 1/16/64, 256² and 512² (cold cache)
    before = load("serving/gpu-h100-2026-11-27-runtime-http-soak/serving_gpu.json")  # the run before it (4ce2cf2, warm cache)
    cold = load("serving/gpu-h100-2026-11-27-runtime-http-soak/serving_gpu_cold.json")
    earlier = load("serving/gpu-h100-2026-11-27-served-vs-torch/serving_gpu.json")[
        "summary"
    ]  # the run that measured the torch baselines beside the runtime
    http = load("serving/gpu-h100-2026-11-27-runtime-http-soak/http_front_gpu.json")
    soak = load("serving/gpu-h100-2026-11-28-reload-soak/service_soak_gpu.json")
    soak10 = load("serving/gpu-h100-2026-11-27-runtime-http-soak/service_soak_gpu_10min_4ce2cf2.json")
    reload = load("serving/gpu-h100-2026-11-28-reload-soak/reload_memory_gpu.json")
    reload_before = load("ray_scale/gpu-2xh200-2026-11-27/reload_memory_gpu.json")
    ray = load("ray_scale/gpu-4xh200-2026-11-28/ray_scale_gpu.json")
    at256 = served["served"]["256"]
    one_image = [lv for lv in http["levels"] if lv["front_workers"] == 8 and lv["images_per_request"] == 1]
    eight = [lv for lv in http["levels"] if lv["front_workers"] == 8 and lv["images_per_request"] == 8]
    r = ray["results"]
    raw = max(r["raw_start"]["images_per_s"], r["raw_end"]["images_per_s"])
    reloaded = {x["model"]: x for x in soak["soak"]["reload"]["response"]["results"]}
    closes = [row for row in reload["rows"] if row["step"].startswith("closed")]
    closes_before = [row for row in reload_before["rows"] if row["step"].startswith("closed")]
    last = latest["served"]["256"]
    torch_rows = [k for k in latest if k.startswith("torch-") and isinstance(latest[k], dict)]
    best = {p: min(torch_rows, key=lambda k, p=p: latest[k]["256"][f"{p}_b64_ms"]) for p in ("encode", "decode")}
    one_latest = [lv for lv in http_latest["levels"] if lv["images_per_request"] == 1 and lv["front_workers"] == 12]

    def by_concurrency(result: dict[str, Any], fronts: int) -> dict[int, float]:
        return {
            lv["concurrency"]: round(lv["http_over_raw"], 3)
            for lv in result["levels"]
            if lv["images_per_request"] == 1 and lv["front_workers"] == fronts
        }

    at256_curve = curve["served"]["256"]
    raw_local = local_latest["raw_images_per_s"]
    summary: dict[str, Any] = {
        "revision": latest["revision"],
        "gpu": latest["gpu"],
        "model": latest["model"],
        "runtime": latest["runtime"],
        "encode_served_img_s": 64 * 1000 / last["encode_b64_ms"],
        "decode_served_img_s": 64 * 1000 / last["decode_b64_ms"],
        "encode_served_over_best_torch": latest[best["encode"]]["256"]["encode_b64_ms"] / last["encode_b64_ms"],
        "decode_served_over_best_torch": latest[best["decode"]]["256"]["decode_b64_ms"] / last["decode_b64_ms"],
        "best_torch_path": best,
        "encode_served_img_s_f9755e3": 64 * 1000 / at256["encode_b64_ms"],
        "decode_served_img_s_f9755e3": 64 * 1000 / at256["decode_b64_ms"],
        "encode_b1_ms": at256["encode_b1_ms"],
        "encode_b1_ms_4cdb142": at256_curve["encode_b1_ms"],
        "encode_served_img_s_by_batch": {b: round(b * 1000 / at256_curve[f"encode_b{b}_ms"]) for b in (1, 2, 4, 8, 16, 32, 64)},
        "decode_served_img_s_by_batch": {b: round(b * 1000 / at256_curve[f"decode_b{b}_ms"]) for b in (1, 2, 4, 8, 16, 32, 64)},
        "encode_512_served_img_s": 64 * 1000 / served["served"]["512"]["encode_b64_ms"],
        "decode_512_served_img_s": 64 * 1000 / served["served"]["512"]["decode_b64_ms"],
        "encode_served_img_s_previous_run": 64 * 1000 / before["served"]["256"]["encode_b64_ms"],
        "decode_served_img_s_previous_run": 64 * 1000 / before["served"]["256"]["decode_b64_ms"],
        "encode_served_over_eager_fp32": served["torch-eager-fp32"]["256"]["encode_b64_ms"] / at256["encode_b64_ms"],
        "decode_served_over_eager_fp32": served["torch-eager-fp32"]["256"]["decode_b64_ms"] / at256["decode_b64_ms"],
        "encode_served_over_best_torch_f4b798d": earlier["encode_served_over_best_torch"],
        "decode_served_over_best_torch_f4b798d": earlier["decode_served_over_best_torch"],
        "gpu_token_agreement": served["gate"]["token_agreement"],
        "gpu_decode_psnr_db": served["gate"]["decode_psnr_db"],
        "ready_s_warm_cache": before["load_s"] + before["warmup_s"],
        "ready_s_cold_cache": served["load_s"] + served["warmup_s"],
        "ready_s_warm_cache_14_shapes": curve["load_s"] + curve["warmup_s"],
        "ready_s_cold_cache_14_shapes": curve_cold["load_s"] + curve_cold["warmup_s"],
        "http_over_raw": min(lv["http_over_raw"] for lv in one_latest),
        "http_over_raw_by_concurrency": {lv["concurrency"]: round(lv["http_over_raw"], 3) for lv in one_latest},
        "http_over_raw_by_fronts": {
            "8": by_concurrency(http_latest, 8),
            "12": by_concurrency(http_latest, 12),
            "16": by_concurrency(http_16, 16),
            "12_shared_accept": by_concurrency(http_shared, 12),
        },
        "http_p50_ms_by_concurrency": {lv["concurrency"]: round(lv["p50_ms"], 1) for lv in one_latest},
        "http_engine_queue_plus_batch_ms_by_concurrency": {
            lv["concurrency"]: round(lv["mean_queue_ms"] + lv["mean_inference_ms"], 2) for lv in one_latest
        },
        "http_mean_batch_by_concurrency": {lv["concurrency"]: round(lv["mean_batch"], 1) for lv in one_latest},
        "http_front_cpu_ms_per_request": {
            lv["concurrency"]: round(1000 * lv["server_cpu_s_per_request_by_role"]["fronts"], 2) for lv in one_latest
        },
        "http_over_raw_797bc95": min(lv["http_over_raw"] for lv in http_797["levels"] if lv["images_per_request"] == 1),
        "http_over_raw_4ce2cf2": min(lv["http_over_raw"] for lv in one_image),
        "http_over_raw_8_images": min(lv["http_over_raw"] for lv in http_inline["levels"] if lv["images_per_request"] == 8),
        "http_over_raw_8_images_4ce2cf2": min(lv["http_over_raw"] for lv in eight) if eight else None,
        "http_over_raw_single_process": http["http_over_raw_min"].get("0"),
        "soak_minutes": soak["soak"]["seconds"] / 60,
        "soak_errors": sum(soak["soak"]["errors_by_status"].values()) if soak["soak"].get("errors_by_status") else 0,
        "soak_fraction_of_saturation": soak["verdict"]["rate_fraction_of_saturation"],
        "soak_served_model_reloaded": bool(reloaded.get(served["model"], {}).get("reloaded")),
        "soak_host_rss_growth": soak["soak"]["memory_growth"]["host_rss"]["growth"],
        "soak_gpu_memory_growth": soak["soak"]["memory_growth"]["gpu"]["growth"],
        "reload_device_used_mib_after_each_close": [row["device_used_mib"] for row in closes],
        "reload_left_by_closed_version_mib": [row.get("left_by_closed_mib") for row in closes],
        "reload_allocated_mib_after_each_close_before_fix": [round(row["allocated_mib"], 1) for row in closes_before],
        "ray_1gpu_over_raw_steady": r["ray_1"]["steady_images_per_s"] / raw,
        "ray_1gpu_over_raw_wall": r["ray_1"]["images_per_s"] / raw,
        "ray_4gpu_over_1gpu_steady": r["ray_all"]["steady_images_per_s"] / r["ray_1"]["steady_images_per_s"],
        "ray_4gpu_over_1gpu_wall": r["ray_all"]["images_per_s"] / r["ray_1"]["images_per_s"],
        "ray_4gpu_steady_img_s": r["ray_all"]["steady_images_per_s"],
        "local_over_raw_steady": local_latest["results"]["local"]["steady_images_per_s"] / raw_local,
        "local_over_raw_wall": local_latest["results"]["local"]["images_per_s"] / raw_local,
        "local_over_raw_steady_797bc95": local_797["results"]["local"]["steady_images_per_s"] / local_797["raw_images_per_s"],
        "local_over_raw_steady_c764811": r["local"]["steady_images_per_s"] / raw,
        "two_servers_one_gpu": {k: v for k, v in two["checks"].items()},
        "two_servers_ready_s": [srv.get("ready_s") for srv in two["servers"]],
    }
    sources = {
        "encode/decode_served_img_s, *_over_best_torch, best_torch_path": (
            f"serving/gpu-h100-2026-11-28-http-8-fronts/serving_gpu_256_b64.json ({latest['gpu']}, revision {latest['revision']}): served, torch "
            "eager fp32 and torch.compile default mode (bf16 autocast, channels_last) at 256², batch 64, in one process. "
            "max-autotune-no-cudagraphs was started twice and finished neither time (its compile ran past 490 s, then 380 s); "
            "reduce-overhead was not run"
        ),
        "*_f9755e3, encode_b1_ms, *_512_*, *_over_eager_fp32, gpu_token_agreement, ready_s_cold_cache": (
            f"serving/gpu-h100-2026-11-28-reload-soak/serving_gpu.json ({served['gpu']}, revision {served['revision']}, empty Inductor cache: "
            "the torch.compile rows of that run did not finish inside its time limit)"
        ),
        "*_previous_run, ready_s_warm_cache": (
            f"serving/gpu-h100-2026-11-27-runtime-http-soak/serving_gpu.json ({before['gpu']}, another machine, revision {before['revision']}, warm cache)"
        ),
        "ready_s_cold_cache (earlier)": f"serving/gpu-h100-2026-11-27-runtime-http-soak/serving_gpu_cold.json: {cold['load_s'] + cold['warmup_s']:.0f} s",
        "*_over_best_torch_f4b798d": (
            f"serving/gpu-h100-2026-11-27-served-vs-torch/serving_gpu.json: an earlier same-run measurement (revision {earlier.get('revision')}, {earlier.get('gpu')}, "
            "the v1 model: the same network and runtime); not re-measured since"
        ),
        "http_over_raw, http_over_raw_by_concurrency, http_front_cpu_ms_per_request, http_p50_*, http_engine_*, http_mean_batch_*": (
            f"serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu.json (H100 with 16 cores, revision {http_latest['setup']['revision']}): "
            "front_workers=12, balanced accept (the supervisor hands connections to the fronts in turn), inline decode, one 256² "
            "JPEG per request, concurrency 32-256"
        ),
        "http_over_raw_by_fronts": (
            "8 and 12 fronts: serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu.json (8 fronts: concurrency 256 skipped by the time budget); "
            "12 with shared accept: http_front_gpu_shared_accept.json, the same machine right after; 16: http_front_gpu_16_fronts.json, "
            "the same machine two calls later"
        ),
        "http_over_raw_797bc95": "serving/gpu-h100-2026-11-28-http-8-fronts/http_front_gpu.json: 8 fronts, shared accept, decode in threads",
        "http_over_raw_8_images": (
            "serving/gpu-h100-2026-11-28-balanced-accept/http_front_gpu_04a78c5_shared.json (H100, revision 04a78c5: inline decode, shared accept): "
            "8 and 12 fronts, eight 256² JPEGs per request, concurrency 32-256"
        ),
        "http_over_raw_4ce2cf2, http_over_raw_8_images_4ce2cf2, http_over_raw_single_process": (
            f"serving/gpu-h100-2026-11-27-runtime-http-soak/http_front_gpu.json (H100, revision {http['setup']['revision']}): front_workers=8, minimum over "
            "concurrency 32-256; 8-image requests at concurrency 32 and 64 only (128/256 skipped by the time budget). "
            "Neither the one-write IPC nor the grouped infer messages (both later) were measured on a GPU"
        ),
        "soak_*": (
            f"serving/gpu-h100-2026-11-28-reload-soak/service_soak_gpu.json (H100, revision {soak.get('setup', {}).get('revision', 'f9755e3')}): "
            "10 minutes, 8 fronts, concurrency 128, a reload at 300 s; its own verdict says reload_ok false because a stale, "
            "empty v1 directory on that machine was refused again at the reload; the served model reloaded. "
            f"The 10-minute run before the capture fix (4ce2cf2) had {sum(soak10['soak']['errors_by_status'].values())} errors"
        ),
        "reload_*": (
            "serving/gpu-h100-2026-11-28-reload-soak/reload_memory_gpu.json (H100, three reloads, buckets to 8) after the one-capture-stream fix; "
            "before it: ray_scale/gpu-2xh200-2026-11-27/reload_memory_gpu.json (H200)"
        ),
        "ray_*, local_over_raw_steady_c764811": f"ray_scale/gpu-4xh200-2026-11-28/ray_scale_gpu.json (4x {ray['machine']['gpus'][0]}, revision {ray['revision']})",
        "encode/decode_served_img_s_by_batch, encode_b1_ms_4cdb142, ready_s_*_14_shapes": (
            f"serving/gpu-h100-2026-11-28-balanced-accept/serving_gpu.json ({curve['gpu']}, revision {curve['revision']}): the served runtime alone "
            "at batch 1-64, 256², host to host, warm cache (serving_gpu_cold.json: the same on an empty cache)"
        ),
        "local_over_raw_steady_797bc95": "serving/gpu-h100-2026-11-28-http-8-fronts/local_engine_gpu.json: 8-image decoding tasks",
        "local_over_raw_steady, local_over_raw_wall": (
            f"serving/gpu-h100-2026-11-28-balanced-accept/local_engine_gpu.json ({local_latest['machine']['gpus'][0]}, revision {local_latest['revision']}): "
            "the local engine against raw (the larger of raw before and after) in one process"
        ),
        "two_servers_*": (
            f"serving/gpu-h100-2026-11-28-balanced-accept/two_servers_gpu.json (H100, revision {two['setup']['revision']}): two servers on GPU 0, "
            "each serving two models: v2 and the same files under a second name (v1 cannot travel: the 64 MiB transfer limit)"
        ),
    }
    sources["every http_* figure"] = (
        "counted by the load generator's six client processes, each of which opened its own measuring window when it had "
        "started (fixed after these runs: StartGate). On the CPU that over-counted by 7-18 % "
        "(load_generator/cpu-2026-11-28-one-window/); on the H200 the server's own batch counters allow 1.2-1.4x less than the clients "
        "counted. Read them as upper bounds until a GPU run with server_window"
    )
    summary["h200"], sources["h200"] = h200()
    summary["h200_dec86ed"], sources["h200_dec86ed"] = h200_dec86ed()
    summary["h200_ninth_pass"], sources["h200_ninth_pass"] = h200_ninth_pass()
    out = {"summary": summary, "sources": sources}
    (RESULTS / "serving/summary.json").write_text(json.dumps(out, indent=1) + "\n")
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"{k:{width}s}  {v:.4g}" if isinstance(v, float) else f"{k:{width}s}  {v}")


def h200() -> tuple[dict[str, Any], str]:
    """The seventh pass, on an H200 with 16 cores (the machine lent then): the same keys, from its own runs."""
    d = "serving/gpu-h200-2026-11-28-batch-workers"
    same_run = load(f"{d}/serving_gpu_all.json")  # served and torch.compile (default, reduce-overhead) at 256², one process
    cold, warm = load(f"{d}/runtime_cold_11433b4.json"), load(f"{d}/runtime_warm_11433b4.json")
    local = load(f"{d}/local_engine_gpu.json")
    one, eight = load(f"{d}/http_bw_1img.json"), load(f"{d}/http_bw_8img_efcc9ee.json")
    at = same_run["served"]["256"]
    curve = warm["served"]["256"]
    torch_rows = [k for k in same_run if k.startswith("torch-") and isinstance(same_run[k], dict)]
    best = {p: min(torch_rows, key=lambda k, p=p: same_run[k]["256"][f"{p}_b64_ms"]) for p in ("encode", "decode")}
    raw_local = local["raw_images_per_s"]

    def by_workers(result: dict[str, Any]) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for lv in result["levels"]:
            out.setdefault(f"batch_workers_{lv['batch_workers']}", {})[lv["concurrency"]] = round(lv["http_over_raw"], 3)
        return out

    figures = {
        "revision": same_run["revision"],
        "gpu": same_run["gpu"],
        "encode_served_img_s": 64 * 1000 / at["encode_b64_ms"],
        "decode_served_img_s": 64 * 1000 / at["decode_b64_ms"],
        "encode_served_2threads_img_s": at["encode_b64_2threads_img_s"],
        "decode_served_2threads_img_s": at["decode_b64_2threads_img_s"],
        "encode_served_over_best_torch": same_run[best["encode"]]["256"]["encode_b64_ms"] / at["encode_b64_ms"],
        "decode_served_over_best_torch": same_run[best["decode"]]["256"]["decode_b64_ms"] / at["decode_b64_ms"],
        "best_torch_path": best,
        "encode_b1_ms": at["encode_b1_ms"],
        "gpu_token_agreement": same_run["gate"]["token_agreement"],
        "gpu_decode_psnr_db": same_run["gate"]["decode_psnr_db"],
        "encode_served_img_s_by_batch": {b: round(b * 1000 / curve[f"encode_b{b}_ms"]) for b in (1, 2, 4, 8, 16, 32, 64)},
        "decode_served_img_s_by_batch": {b: round(b * 1000 / curve[f"decode_b{b}_ms"]) for b in (1, 2, 4, 8, 16, 32, 64)},
        "ready_s_cold_cache_14_shapes": cold["load_s"] + cold["warmup_s"],
        "ready_s_warm_cache_14_shapes": warm["load_s"] + warm["warmup_s"],
        "http_raw_img_s": one["raw_images_per_s"]["used"],
        "http_raw_2threads_img_s": one["raw_pipelined_images_per_s"]["used"],
        "http_over_raw_1_image_12_fronts": by_workers(one),
        "http_over_raw_8_images_12_fronts": by_workers(eight),
        "http_over_raw": one["http_over_raw_min"],
        "local_over_raw_steady": local["results"]["local"]["steady_images_per_s"] / raw_local,
        "local_over_raw_wall": local["results"]["local"]["images_per_s"] / raw_local,
        "local_driver_encode_wait_s": local["results"]["local"]["driver_encode_wait_s"],
        "local_driver_decode_wait_s": local["results"]["local"]["driver_decode_wait_s"],
    }
    source = (
        f"{d}/ (NVIDIA H200, 16 cores): serving_gpu_all.json (revision {same_run['revision']}, warm cache: served and torch.compile "
        "default and reduce-overhead at 256² in one process; max-autotune not run); runtime_{cold,warm}_11433b4.json (the runtime "
        "by batch; the fix of 2c8332a changes only calls on two graphs at once); local_engine_gpu.json (2c8332a); "
        "http_bw_1img.json (2c8332a) and http_bw_8img_efcc9ee.json: 12 fronts, batch workers 1 and 2, six client processes "
        "that each started their own measuring window (the StartGate came later). Those HTTP figures are the clients' count: "
        "the server's batch counters over the whole level (mean batch / mean inference time) allow 1.2-1.4x less, which the "
        "server_window figures of the next run will settle"
    )
    return figures, source


def h200_dec86ed() -> tuple[dict[str, Any], str]:
    """The eighth pass (H200, 16 cores): the first HTTP figures counted over one window by every client
    process (StartGate), each level checked against the server's own batch counters over that window;
    and torch.compile's max-autotune decode beside the served runtime in one process."""
    d = "serving/gpu-h200-2026-11-28-one-window"
    same_run = load(f"{d}/serving_gpu_autotune_same_run.json")  # served and max-autotune-no-cudagraphs decode, 256² b64
    runs = {
        "pow2_delay2ms": load(f"{d}/http_1img_bw2.json"),
        "fine_delay2ms": load(f"{d}/http_1img_bw2_fine.json"),
        "fine_delay0.5ms": load(f"{d}/http_1img_fine_delay05.json"),
    }
    eight = load(f"{d}/http_8img_bw2.json")
    at = same_run["served"]["256"]

    def ratios(result: dict[str, Any], fronts: int) -> dict[int, float]:
        return {lv["concurrency"]: round(lv["http_over_raw"], 3) for lv in result["levels"] if lv["front_workers"] == fronts}

    def agreement(result: dict[str, Any]) -> list[float]:  # clients' count / the server's batch counters, same window
        return [round(lv["images_per_s"] / lv["server_window"]["images_per_s"], 3) for lv in result["levels"]]

    one_image = {f"{name}_12_fronts": ratios(r, 12) for name, r in runs.items()}
    one_image["fine_delay0.5ms_16_fronts"] = ratios(runs["fine_delay0.5ms"], 16)
    figures = {
        "revision": same_run["revision"],
        "gpu": same_run["gpu"],
        "encode_served_img_s": 64 * 1000 / at["encode_b64_ms"],
        "decode_served_img_s": 64 * 1000 / at["decode_b64_ms"],
        "decode_max_autotune_img_s": 64 * 1000 / same_run["torch-compile-mat-bf16"]["256"]["decode_b64_ms"],
        "decode_served_over_max_autotune": same_run["torch-compile-mat-bf16"]["256"]["decode_b64_ms"] / at["decode_b64_ms"],
        "gpu_token_agreement": same_run["gate"]["token_agreement"],
        "http_raw_img_s": runs["pow2_delay2ms"]["raw_images_per_s"]["used"],
        "http_raw_2threads_img_s": runs["pow2_delay2ms"]["raw_pipelined_images_per_s"]["used"],
        "http_over_raw_1_image": one_image,
        "http_over_raw_8_images_12_fronts": ratios(eight, 12),
        "http_over_raw": min(min(v.values()) for v in one_image.values()),
        "http_over_raw_best_config_by_concurrency": {c: max(v[c] for v in one_image.values()) for c in (32, 64, 128, 256)},
        "http_clients_over_server_window": {
            "min": min(x for r in [*runs.values(), eight] for x in agreement(r)),
            "max": max(x for r in [*runs.values(), eight] for x in agreement(r)),
        },
    }
    source = (
        f"{d}/ (NVIDIA H200, 16 cores, revision dec86ed). serving_gpu_autotune_same_run.json: served and "
        "torch.compile max-autotune-no-cudagraphs (bf16, channels-last) decode at 256² batch 64 in one process; the "
        "autotuning of an earlier call on the same machine was cached (torch.log: 207 s to tune). http_1img_bw2.json "
        "(powers-of-two buckets, 2 ms batch delay), http_1img_bw2_fine.json (buckets 1,2,4,8,12,16,24,32,48,64), "
        "http_1img_fine_delay05.json (fine buckets, 0.5 ms delay, 12 and 16 fronts), http_8img_bw2.json: batch workers 2, "
        "six client processes sharing one window (StartGate); each level's server_window agrees with the clients' count "
        "within the min/max given. http_1img_bw2_intra1.json: --intra-op-threads 1 (it reaches ONNX Runtime's fallback "
        "only, not torch: no change)"
    )
    return figures, source


def h200_ninth_pass() -> tuple[dict[str, Any], str]:
    """The ninth pass (H200, 16 cores): the served runtime autotuned (`--compile-mode max-autotune`)
    against torch.compile's max-autotune decode in one process (27561a8), and the single-image HTTP
    sweep after the inference process stopped spinning torch's OpenMP workers on staging (fa59cfe)."""
    autotuned = load("serving/gpu-h200-2026-11-28-max-autotune/serving_gpu_max_autotune_same_run.json")
    http = load("serving/gpu-h200-2026-11-28-numpy-staging/http_1img_fine_delay05.json")
    before = load("serving/gpu-h200-2026-11-28-one-window/http_1img_fine_delay05.json")  # the same configuration, the pass before
    at = autotuned["served"]["256"]
    torch_ms = autotuned["torch-compile-mat-bf16"]["256"]["decode_b64_ms"]

    def levels(result: dict[str, Any]) -> list[dict[str, Any]]:
        return [lv for lv in result["levels"] if lv["front_workers"] == 12 and lv["images_per_request"] == 1]

    def ms(lv: dict[str, Any], *roles: str) -> float:
        return round(1000 * sum(lv["server_cpu_s_per_request_by_role"][r] for r in roles), 2)

    now, then = levels(http), levels(before)
    figures = {
        "revision_runtime": autotuned["revision"],
        "revision_http": http["setup"]["revision"],
        "gpu": autotuned["gpu"],
        "compile_mode": autotuned["compile_mode"],
        "encode_served_img_s": 64 * 1000 / at["encode_b64_ms"],
        "decode_served_img_s": 64 * 1000 / at["decode_b64_ms"],
        "decode_max_autotune_img_s": 64 * 1000 / torch_ms,
        "decode_served_over_max_autotune": torch_ms / at["decode_b64_ms"],
        "ready_s_autotuned_partly_cached": autotuned["load_s"] + autotuned["warmup_s"],
        "gpu_token_agreement": autotuned["gate"]["token_agreement"],
        "gpu_decode_psnr_db": autotuned["gate"]["decode_psnr_db"],
        "http_raw_img_s": http["raw_images_per_s"]["used"],
        "http_raw_2threads_img_s": http["raw_pipelined_images_per_s"]["used"],
        "http_over_raw_1_image_12_fronts": {lv["concurrency"]: round(lv["http_over_raw"], 3) for lv in now},
        "http_over_raw_1_image_12_fronts_dec86ed": {lv["concurrency"]: round(lv["http_over_raw"], 3) for lv in then},
        "http_over_raw": min(lv["http_over_raw"] for lv in now),
        "http_p50_ms": {lv["concurrency"]: round(lv["p50_ms"], 1) for lv in now},
        "http_p99_ms": {lv["concurrency"]: round(lv["p99_ms"], 1) for lv in now},
        # "engine" is the whole inference process (every thread); "engine_loop" is its event-loop thread, a part of it
        "inference_process_cpu_ms_per_request": {lv["concurrency"]: ms(lv, "engine") for lv in now},
        "inference_process_cpu_ms_per_request_dec86ed": {lv["concurrency"]: ms(lv, "engine") for lv in then},
        "inference_loop_thread_cpu_ms_per_request": {lv["concurrency"]: ms(lv, "engine_loop") for lv in now},
        "fronts_cpu_ms_per_request": {lv["concurrency"]: ms(lv, "fronts") for lv in now},
        "server_cores_busy": {lv["concurrency"]: round(lv["server_cores_busy"], 1) for lv in now},
        "mean_batch": {lv["concurrency"]: round(lv["mean_batch"], 1) for lv in now},
        "http_clients_over_server_window": [round(lv["images_per_s"] / lv["server_window"]["images_per_s"], 3) for lv in now],
        "server_ready_s_cold_20_shapes": now[0]["server_ready_s"],
    }
    source = (
        "serving/gpu-h200-2026-11-28-max-autotune/serving_gpu_max_autotune_same_run.json (NVIDIA H200, revision 27561a8): `serving_gpu.py "
        "--part all --compile-mode max-autotune --batches 64 --sizes 256 --torch-modes max-autotune-no-cudagraphs "
        "--torch-ops decode`, the second of two calls on one machine (the first was stopped by its time limit while "
        "tuning; the second resumed from the tuning cache). serving/gpu-h200-2026-11-28-numpy-staging/http_1img_fine_delay05.json "
        "(revision fa59cfe: numpy staging, in-memory multipart, one header read): 12 fronts, 2 batch workers, buckets "
        "1,2,4,8,12,16,24,32,48,64, 0.5 ms batch delay, one 256² JPEG a request, six client processes, cold Inductor "
        "cache; the *_dec86ed figures are the same configuration one pass earlier "
        "(serving/gpu-h200-2026-11-28-one-window/http_1img_fine_delay05.json; its CPU per request was taken over the whole level "
        "against the server's own request count over the same span, this pass's over the clients' window)"
    )
    return figures, source


if __name__ == "__main__":
    main()

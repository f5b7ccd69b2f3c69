"""Old load generator (ad36d11: each client process its own window) against the server's batch counters
sampled by this process over the middle of the run."""
import sys, threading, time, json
sys.path.insert(0, "/tmp/oldbench")
sys.path.insert(1, "/work/main")
import bench.http_front as old
from bench.service_load import scrape
from pathlib import Path

def main():
    url = sys.argv[1]; procs = int(sys.argv[2]); conc = int(sys.argv[3]); per_req = int(sys.argv[4])
    files = old.read_jpegs(Path("/work/shared/data/photos256/val"))[:32]
    marks = []
    def sampler():
        t0 = time.monotonic()
        for at in (3.0, 7.0):
            time.sleep(max(0, t0 + at - time.monotonic()))
            marks.append((time.monotonic(), scrape(url)))
    th = threading.Thread(target=sampler); th.start()
    level = old.run_load(url, files, conc, 8.0, procs, "crop", per_req=per_req)
    th.join()
    (t0, a), (t1, b) = marks
    server = (b["vqtok_batch_size_sum"] - a["vqtok_batch_size_sum"]) / (t1 - t0)
    print(f"procs {procs} c{conc} x{per_req}: old client count {level['images_per_s']:.1f} img/s, server batched (3-7 s) {server:.1f} img/s, ratio {level['images_per_s']/server:.3f}")

if __name__ == "__main__":
    main()

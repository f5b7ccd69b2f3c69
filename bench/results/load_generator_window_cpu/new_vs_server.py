import sys
sys.path.insert(0, "/work/main")
from pathlib import Path
from bench.http_front import read_jpegs, run_load

def main():
    url, procs, conc, per_req = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    files = read_jpegs(Path("/work/shared/data/photos256/val"))[:32]
    level = run_load(url, files, conc, 8.0, procs, "crop", per_req=per_req)
    w = level["server_window"]["images_per_s"]
    print(f"procs {procs} c{conc} x{per_req}: new client count {level['images_per_s']:.1f} img/s, server batched (same window) {w:.1f} img/s, ratio {level['images_per_s']/w:.3f}")

if __name__ == "__main__":
    main()

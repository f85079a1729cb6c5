"""What `make demo` runs: the main job on the bundled example stimuli.

AlexNet over examples/images and CochResNet50 over examples/sounds, each through the
`featx extract` command line, then `featx info` on the stores. Published weights are
used when they are in the weights cache ($FEATX_WEIGHTS); otherwise the models run
with seeded random weights, and this script and the stores say so.
"""

import sys
from pathlib import Path

from featx.cli import main as featx
from featx.registry import get_entry
from featx.weights import weights_cache_dir

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "out"
JOBS = [("alexnet", HERE / "images"), ("coch_resnet50", HERE / "sounds")]


def weights_for(name: str) -> str:
    entry = get_entry(name)
    cached = weights_cache_dir() / entry.weights.file
    if cached.is_file():
        print(f"demo: {name}: published weights {cached}")
        return str(cached)
    print(f"demo: {name}: {entry.weights.file} is not in the weights cache {weights_cache_dir()}, "
          "so this run uses RANDOM weights (the store records it). See the README, 'Weights'.")
    return "random"


def run() -> int:
    OUT.mkdir(exist_ok=True)
    for name, folder in JOBS:
        store = OUT / f"demo_{name}.h5"
        code = featx(["extract", name, str(folder), "-o", str(store), "--weights", weights_for(name),
                      "--overwrite"])
        if code:
            return code
        code = featx(["info", str(store)])
        if code:
            return code
    print(f"demo: done; open the stores with featx.open_store('{OUT}/demo_alexnet.h5') "
          "or xarray.open_dataset(path, engine='h5netcdf')")
    return 0


if __name__ == "__main__":
    sys.exit(run())

#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on a GPU machine whose image has torch but not kukla's storage
# and model stack (the device tool's bare H200: Python 3.12, no package index), fetched here into
# .whl/ (git-ignored); gpu.sh installs them from there. Carry `.whl` with the call (about 37 MB of
# the 64 MiB a call carries). The last two lines are SAELens, the anchor of train_bench and
# harvest_bench, and what its import needs beyond the image (its config imports wandb, 20 MB of it);
# its other requirements (plotly, nltk, babe, dotenv, tenacity) serve modules the benchmarks never
# import. The embedded Gemma (245 MB) cannot travel: gpu.sh skips the demo, naming why.
#
#   bash benchmarks/gpu_wheels.sh    # here, with the package index; then run gpu.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    zarr==3.1.6 donfig==0.8.1.post1 numcodecs==0.16.6 google-crc32c==1.9.0 \
    transformer-lens==3.9.0 better-abc==0.0.3 typeguard==4.6.1 fancy-einsum==0.0.3 beartype==0.23.1 \
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
    sae-lens==6.54.12 simple-parsing==0.1.9 docstring-parser==0.18.0 wandb==0.31.0 opentelemetry-api==1.45.2 \
    platformdirs==4.14.9 pydantic==2.13.4 pydantic-core==2.46.4 typing-inspection==0.4.2 annotated-types==0.7.0
du -sh .whl

#!/usr/bin/env bash
# Packs what scripts/gpu-check.sh needs on a GPU machine that has torch but no Rust, no network
# and perhaps not the system libraries the binary links (fontconfig/freetype for plots):
# .gpu-bundle/xsrec plus .gpu-bundle/lib/ with every non-torch, non-libc shared library it loads.
#
#   scripts/gpu-bundle.sh
# then, with the device tool: carry [".gpu-bundle", "data/ml-100k"], command scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
make build data >/dev/null
bundle=.gpu-bundle
rm -rf "$bundle" && mkdir -p "$bundle/lib"
cp target/release/xsrec "$bundle/"
# torch and CUDA come from that machine's own torch; glibc and the C++ runtime are newer there.
ldd target/release/xsrec | awk '$2 == "=>" && $3 ~ /^\// {print $3}' \
  | grep -v -E 'torch/lib|site-packages/nvidia|/(libc|libm|libdl|librt|libpthread|libutil|libgcc_s|libstdc\+\+)\.so' \
  | xargs -r cp -L -t "$bundle/lib/"
du -sh "$bundle" && ls "$bundle/lib"

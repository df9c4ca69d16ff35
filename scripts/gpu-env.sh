# Sourced by the GPU machine's scripts (gpu-check.sh, gpu-bench.sh, gpu-profile.sh): unpacks the
# carried dist/helix-train.gz (scripts/build-cuda.sh builds it) when BIN is not yet there, and
# points the loader at the NVIDIA libraries of the machine's Python packages.
#   BIN=dist/helix-train; source scripts/gpu-env.sh
BIN=${BIN:-dist/helix-train}
if [ ! -x "$BIN" ] && [ -f "$BIN.gz" ]; then
  gzip -dc "$BIN.gz" > "$BIN"
  chmod +x "$BIN"
fi
_nvidia_site=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
LD_LIBRARY_PATH="$(find "$_nvidia_site/nvidia" -maxdepth 3 -type d -name lib | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
unset _nvidia_site

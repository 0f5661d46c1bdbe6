# Sourced at the start of a device call (see real_size.sh): wheels from .whl (shared/tools/device-prep.sh), PYTHONPATH,
# a Numba cache under /root, and llama.cpp (.llama-src, shared/tools/llama-cuda-src.sh) building in the background.
mkdir -p /root/dev /root/m /root/out
if [ -d .whl ]; then mkdir -p /root/dev/whl && cp .whl/*.whl /root/dev/whl/; fi  # (cp -r into an existing folder nests it)
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /root/dev/site /root/dev/whl/*.whl 2>/dev/null
export PYTHONPATH=/root/dev/site:$PWD NUMBA_CACHE_DIR=/root/numba-cache PYTHONUNBUFFERED=1
# (a call's background jobs end with it: a build that a call started and did not finish goes on in the next one)
if [ -f .llama-src/llama-src.tar.xz ] && [ ! -f /root/build.rc ]; then
  [ -d /root/llama ] || { mkdir -p /root/llama && tar xJf .llama-src/llama-src.tar.xz -C /root/llama; }
  ( cd /root/llama/llama.cpp && cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF \
      -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
      -DCMAKE_BUILD_TYPE=Release >/root/cmake.log 2>&1 \
    && cmake --build build -j12 --target llama-bench llama-batched-bench >/root/build.log 2>&1; echo $? >/root/build.rc ) &
fi
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv,noheader

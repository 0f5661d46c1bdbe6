# One device call (`run` with carry [".whl", ".devdata", ".llama-src"], command `bash bench/gpu/real_size.sh`):
# rbees and llama.cpp on the Llama-3.1-8B and Qwen2.5-0.5B shapes in the Q4_K_M mix, same card, and the CUDA
# kernel tests while llama.cpp builds. .devdata/vocab.gguf: a vocabulary-only GGUF of SmolLM2 (`python bench/gguf_shapes.py --vocab-only --out .devdata/vocab.gguf`).
# BUDGET: seconds this script may take (the call's device time left, less the machine's start).
source bench/gpu/setup.sh
R=$PWD; T0=$(date +%s); left() { echo $(( ${BUDGET:-450} - ($(date +%s) - T0) )); }
cd /root/m
(time python3 $R/bench/gguf_shapes.py --shape llama-3.1-8b --mix q4_k_m --out l8b.gguf --vocab-from $R/${VOCAB:-.devdata/vocab.gguf}) 2>&1 | tail -4 | tee $OUT/gen.log
python3 $R/bench/gguf_shapes.py --shape qwen2.5-0.5b --mix q4_k_m --out q05.gguf --vocab-from $R/${VOCAB:-.devdata/vocab.gguf} 2>&1 | tail -1
cd $R
echo "== rbees 8B"; timeout 150 python3 bench/cuda_bench.py /root/m/l8b.gguf --batches 1,64 --steps 64 --repeat 3 --json 2>&1 | tail -2 | tee $OUT/rbees_l8b.log
echo "== rbees 0.5B"; timeout 80 python3 bench/cuda_bench.py /root/m/q05.gguf --batches 1,64,256 --steps 64 --repeat 3 --json 2>&1 | tail -2 | tee $OUT/rbees_q05.log
[ -f /root/build.rc ] || REQUIRE_REAL_GPU=1 timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tail -15 > $OUT/tests.log; tail -3 $OUT/tests.log
while [ ! -f /root/build.rc ] && [ $(left) -gt 50 ]; do sleep 2; done; echo "build rc $(cat /root/build.rc 2>/dev/null) left $(left)"
B=/root/llama/llama.cpp/build/bin
timeout $(( $(left) / 3 )) $B/llama-bench -m /root/m/l8b.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 2>&1 | grep -E "pp|tg" | tee $OUT/llama_l8b.log
timeout $(( $(left) / 3 )) $B/llama-batched-bench -m /root/m/l8b.gguf -ngl 99 -fa on -npp 128 -ntg 128 -npl 1,64 -c 17000 2>&1 | grep -E "^\|" | tee -a $OUT/llama_l8b.log
timeout $(( $(left) / 2 )) $B/llama-bench -m /root/m/q05.gguf -ngl 99 -fa 1 -p 512 -n 128 -r 2 2>&1 | grep -E "pp|tg" | tee $OUT/llama_q05.log
timeout $(( $(left) - 3 )) $B/llama-batched-bench -m /root/m/q05.gguf -ngl 99 -fa on -npp 128 -ntg 128 -npl 1,64,256 -c 66000 2>&1 | grep -E "^\|" | tee -a $OUT/llama_q05.log
echo "left $(left)"

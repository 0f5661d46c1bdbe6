# One device call (`run` with carry [".whl", ".devdata"], command `bash bench/gpu/profile.sh`): Nsight Compute
# on the Llama-3.1-8B shape (Q4_K_M mix): every kernel's time and DRAM bytes of one step of each of STEPS
# (cuda_step.py's options, `_` for spaces; default: batch-1 decode, 64 sequences, a 512-token prompt), then the
# full sections of layer 10's five batch-1 kernels. Read the CSVs with bench/ncu_times.py.
source bench/gpu/setup.sh; R=$PWD
cd /root/m && python3 $R/bench/gguf_shapes.py --shape llama-3.1-8b --mix q4_k_m --out l8b.gguf --vocab-from $R/.devdata/vocab.gguf | tail -1; cd $R
NCU="ncu --profile-from-start off --cache-control none --clock-control none"
M="--metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis"
for a in ${STEPS:-_ --batch_64 --prefill_512}; do
  f=$OUT/times$(echo "$a" | tr -d '_-').csv
  timeout 150 $NCU $M --csv python3 bench/cuda_step.py /root/m/l8b.gguf ${a//_/ } > $f 2>&1; echo "$a: $(wc -l < $f) lines"
done
timeout 70 $NCU $S --launch-skip 51 --launch-count 5 python3 bench/cuda_step.py /root/m/l8b.gguf > $OUT/sections_b1.txt 2>&1
ls -la $OUT

# One device call (`run` with carry [".whl", ".devdata"], command `bash bench/gpu/profile.sh`): Nsight Compute
# on the Llama-3.1-8B shape (Q4_K_M mix): every kernel's time and DRAM bytes of one step of each of STEPS
# (cuda_step.py's options, `_` for spaces; default: batch-1 decode, 64 sequences, a 512-token prompt), then the
# full sections of layer 10's five batch-1 kernels (or SECT: ncu's kernel choice, SECT_STEP: cuda_step.py's options,
# e.g. SECT="-k_regex:mma_kernel_--launch-skip_8_--launch-count_4" SECT_STEP=--prefill_512). Read the CSVs with
# bench/ncu_times.py.
source bench/gpu/setup.sh; R=$PWD
cd /root/m && [ -f l8b.gguf ] || python3 $R/bench/gguf_shapes.py --shape llama-3.1-8b --mix q4_k_m --out l8b.gguf --vocab-from $R/.devdata/vocab.gguf | tail -1; cd $R
NCU="ncu --profile-from-start off --cache-control none --clock-control none"
M="--metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
for a in ${STEPS:-_ --batch_64 --prefill_512}; do  # (STEPS=-: none)
  [ "$a" = - ] && continue
  f=$OUT/times$(echo "$a" | tr -d '_-').csv
  timeout 150 $NCU $M --csv python3 bench/cuda_step.py /root/m/l8b.gguf ${a//_/ } > $f 2>&1; echo "$a: $(wc -l < $f) lines"
done
SECT=${SECT:---launch-skip_51_--launch-count_5}; SECT_STEP=${SECT_STEP:-}
timeout ${SECT_S:-70} $NCU $S --section SourceCounters -o /root/sect ${SECT//_/ } python3 bench/cuda_step.py /root/m/l8b.gguf \
  ${SECT_STEP//_/ } > $OUT/sections.log 2>&1
ncu -i /root/sect.ncu-rep --page details > $OUT/sections.txt 2>&1  # then each instruction's samples and stall reasons
ncu -i /root/sect.ncu-rep --page source --csv --print-source sass > $OUT/source.csv 2>&1
ls -la $OUT

# One device call (`run` with carry [".whl", ".devdata"], command `bash bench/gpu/profile.sh`): Nsight Compute
# on the Llama-3.1-8B shape (Q4_K_M mix; MODELS="l8b q05" adds the Qwen2.5-0.5B shape): every kernel's time and
# DRAM bytes of one step of each of STEPS (cuda_step.py's options, `_` for spaces; default: batch-1 decode, 64
# sequences, a 512-token prompt), then the 8B's full sections of layer 10's five batch-1 kernels (or SECT: ncu's
# kernel choice, SECT_STEP: cuda_step.py's options, SECT_S its time limit, e.g.
# SECT="-k_regex:mma_kernel_--launch-skip_8_--launch-count_4" SECT_STEP=--prefill_512). Read the CSVs with
# bench/ncu_times.py.
source bench/gpu/setup.sh; R=$PWD
declare -A SHAPE=([l8b]=llama-3.1-8b [q05]=qwen2.5-0.5b)
for m in ${MODELS:-l8b}; do  # (MODELS="l8b q05": the steps on both shapes)
  [ -f /root/m/$m.gguf ] || python3 bench/gguf_shapes.py --shape ${SHAPE[$m]} --mix q4_k_m --out /root/m/$m.gguf \
    --vocab-from .devdata/vocab.gguf | tail -1
done
NCU="ncu --profile-from-start off --cache-control none --clock-control none"
M="--metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
S="--section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis"
for m in ${MODELS:-l8b}; do for a in ${STEPS:-_ --batch_64 --prefill_512}; do  # (STEPS=-: none)
  [ "$a" = - ] && continue
  f=$OUT/times$([ $m = l8b ] || echo _$m)$(echo "$a" | tr -d '_-').csv
  timeout 150 $NCU $M --csv python3 bench/cuda_step.py /root/m/$m.gguf ${a//_/ } > $f 2>&1; echo "$m $a: $(wc -l < $f) lines"
done; done
SECT=${SECT:---launch-skip_51_--launch-count_5}; SECT_STEP=${SECT_STEP:-}
timeout ${SECT_S:-70} $NCU $S --section SourceCounters -o /root/sect ${SECT//_/ } python3 bench/cuda_step.py /root/m/l8b.gguf \
  ${SECT_STEP//_/ } > $OUT/sections.log 2>&1
ncu -i /root/sect.ncu-rep --page details > $OUT/sections.txt 2>&1  # then each instruction's samples and stall reasons
ncu -i /root/sect.ncu-rep --page source --csv --print-source sass > $OUT/source.csv 2>&1
ls -la $OUT

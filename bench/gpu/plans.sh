# One device call (`run` with carry [".whl"], command `bash bench/gpu/plans.sh`): the tensor-core product's launch
# plans timed on each product of the Llama-3.1-8B and Qwen2.5-0.5B shapes (bench/mma_plan.py), after compiling
# their kernels in parallel processes. TOKENS: the step sizes; SHAPES; NJ: the token tiles a block; TESTS (optional):
# the real-GPU kernel tests' -k selection, run while the kernels compile (TEST_S seconds at most).
# VARIANTS (optional): space-separated sweeps, each LABEL[@ITEM]... where an ITEM is a tree to run in (".alt", carried),
# an option of mma_plan.py ("--slots=1:3,2:3,4:3,8:3") or an environment variable ("NAME=VALUE"); each its own
# Numba cache (Numba's does not key on the register bound or the environment).
source bench/gpu/setup.sh
SHAPES=${SHAPES:-llama-3.1-8b qwen2.5-0.5b}; TOKENS=${TOKENS:-16,64,512}; NJ=${NJ:-1 2 4 8}; R=$PWD
sweep() {  # sweep SECONDS VARIANT [mma_plan.py options]: in the variant's tree, cache and environment
  local limit=$1 label=${2%%@*} tree=$R args=() envs=(NUMBA_CACHE_DIR=/root/numba-cache-${2%%@*}) item
  for item in $(echo ${2#$label} | tr @ ' '); do
    case $item in .*) tree=$R/$item;; --*) args+=(${item/=/ });; *) envs+=($item);; esac
  done; shift 2
  (cd $tree && env "${envs[@]}" PYTHONPATH=/root/dev/site:$tree timeout $limit ${PY:-python3} bench/mma_plan.py \
    "${args[@]}" "$@")
}
if [ -n "$TESTS" ]; then
  REQUIRE_REAL_GPU=1 timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -n 2 tests/test_cuda_kernels.py \
    tests/test_architectures.py::test_cuda_matches_cpu -k "$TESTS" > $OUT/tests.log 2>&1 &
fi
for v in ${VARIANTS:-base}; do for s in $SHAPES; do for nj in $NJ; do
  sweep 400 $v --shape $s --tokens ${TOKENS%%,*} --nj $nj --warm > $OUT/warm_${s}_${nj}_${v%%@*}.log 2>&1 &
done; done; done
wait; echo "compiled after ${SECONDS} s"
# (a call brings back 8 files: the warm-up logs go into one, and the tests' failures into the output)
if [ -f $OUT/tests.log ]; then grep -E "^(FAILED|ERROR)|^E  |passed|failed" $OUT/tests.log | head -40; fi
for f in $OUT/warm_*.log; do echo "== $f"; cat $f; done > $OUT/warm.log 2>/dev/null; rm -f $OUT/warm_*.log
for v in ${VARIANTS:-base}; do for s in $SHAPES; do
  sweep ${SWEEP_S:-200} $v --shape $s --tokens $TOKENS --nj ${NJ// /,} --json > $OUT/plans_${s}_${v%%@*}.json \
    2> $OUT/plans_${s}_${v%%@*}.err
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['device'], len(d['rows']), 'rows')" \
    $OUT/plans_${s}_${v%%@*}.json ${v%%@*}
done; done
echo "done after ${SECONDS} s"

# One device call (`run` with carry [".whl"], command `bash bench/gpu/plans.sh`): the tensor-core product's launch
# plans timed on each product of the Llama-3.1-8B and Qwen2.5-0.5B shapes (bench/mma_plan.py), after compiling
# their kernels in parallel processes. TOKENS: the step sizes; SHAPES; TESTS (optional): the real-GPU kernel tests'
# -k selection, run while the kernels compile (TEST_S seconds at most).
source bench/gpu/setup.sh
SHAPES=${SHAPES:-llama-3.1-8b qwen2.5-0.5b}; TOKENS=${TOKENS:-16,64,512}
if [ -n "$TESTS" ]; then
  REQUIRE_REAL_GPU=1 timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -n 2 tests/test_cuda_kernels.py \
    tests/test_architectures.py::test_cuda_matches_cpu -k "$TESTS" > $OUT/tests.log 2>&1 &
fi
for s in $SHAPES; do for nj in 1 2 4 8; do
  timeout 400 python3 bench/mma_plan.py --shape $s --tokens ${TOKENS%%,*} --nj $nj --warm > $OUT/warm_${s}_$nj.log 2>&1 &
done; done
wait; tail -3 $OUT/tests.log 2>/dev/null; echo "compiled after ${SECONDS} s"
for s in $SHAPES; do
  timeout ${SWEEP_S:-200} python3 bench/mma_plan.py --shape $s --tokens $TOKENS --json > $OUT/plans_$s.json 2> $OUT/plans_$s.err
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['device'], len(d['rows']), 'rows')" $OUT/plans_$s.json
done
echo "done after ${SECONDS} s"

#!/usr/bin/env bash
# The GPU check of the PTX backend, run on a machine with an NVIDIA GPU and no
# Rust (the binaries are built elsewhere and carried in .dev/):
#   stage1: the common differential test on the GPU (every kernel vs the
#           reference interpreter), glassllm greedy GPU vs reference;
#   stage2: SmolLM2-135M: the 4-bit GGUF (Q4_1) and a 2-bit build compiled from
#           the same recipe: greedy 32 tokens on 3 prompts, perplexity, and
#           `kiln bench` on the GPU beside PyTorch (transformers on the same GGUF);
#   build:  a build compiled here for the `gpu` device and carried in .dev/build
#           (greedy, perplexity and bench, PTX vs reference), after stage1.
# stage1 also runs the DeepSeek-V4 fixture on the GPU when .dev/ds4_test is carried.
# Results go to $OUT (JSON lines + logs). See bench/gpu/README.md.
set -uo pipefail
stage=$1
K=/tmp/kiln-gpu
mkdir -p $K $OUT
export KILN_CACHE=$K/cache
mkdir -p $KILN_CACHE/models $KILN_CACHE/imatrix
log() { echo "== $*" | tee -a $OUT/log.txt; }
if [ "$stage" = stage1 ]; then
  cp .dev/kiln .dev/cuda_test $K/ && cp .dev/imatrix/* $KILN_CACHE/imatrix/ && cp .dev/gguf.part-a $K/
  cp -r .dev/glassllm-en-hf $KILN_CACHE/models/
  cp -r .dev/whl $K/
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/gpu.txt $K/gpu.txt
  log "differential test on the GPU"
  KILN_REQUIRE_GPU=1 $K/cuda_test --nocapture 2>&1 | tee $OUT/differential.txt | tail -80
  if [ -x .dev/ds4_test ]; then
    # The test binary finds its fixture under the checkout it was built in.
    src=$(cat .dev/ds4_test.src)
    [ -e "$src" ] || { mkdir -p "$(dirname "$src")" && ln -sfn "$PWD" "$src"; }
    log "DeepSeek-V4 fixture on the GPU: prefill, CUDA-graph decode, chunked prefill vs transformers"
    KILN_REQUIRE_GPU=1 .dev/ds4_test ptx_backend_on_the_gpu --nocapture 2>&1 | tee $OUT/ds4.txt | tail -20
  fi
  log "glassllm greedy: ptx vs reference"
  for b in ptx reference; do
    $K/kiln run $KILN_CACHE/models/glassllm-en-hf --backend $b -p "Once upon a time" -n 48 --json > $OUT/glassllm-$b.json 2>>$OUT/log.txt
  done
  python3 - <<'PY'
import json, os
o = os.environ["OUT"]
a = json.load(open(f"{o}/glassllm-ptx.json"))["output"]["tokens"]
b = json.load(open(f"{o}/glassllm-reference.json"))["output"]["tokens"]
print("glassllm greedy 48 tokens:", "IDENTICAL" if a == b else f"DIFFER at {next(i for i,(x,y) in enumerate(zip(a,b)) if x!=y)}")
PY
  tar czf $K/stage1.tgz -C $OUT glassllm-ptx.json glassllm-reference.json && rm -f $OUT/glassllm-*.json && mv $K/stage1.tgz $OUT/
  exit 0
fi
if [ "$stage" = build ]; then
  # A build compiled elsewhere for the `gpu` device and carried in .dev/build: greedy 32
  # tokens on 3 prompts, perplexity and `kiln bench`, PTX against the reference interpreter.
  cp $K/gpu.txt $OUT/ 2>/dev/null
  B=.dev/build
  i=0
  for p in "The capital of France is" "def fibonacci(n):" "Once upon a time, in a small village,"; do
    i=$((i+1))
    for b in ptx reference; do
      $K/kiln run $B --backend $b -p "$p" -n 32 --ignore-eos --json > $OUT/greedy-2bit-$i-$b.json 2>>$OUT/log.txt
    done
  done
  for b in ptx reference; do
    $K/kiln ppl $B --backend $b --file tests/fixtures/text/ppl-excerpt.txt --ctx 512 --chunks 4 --json > $OUT/ppl-2bit-$b.json 2>>$OUT/log.txt
  done
  $K/kiln bench $B --backend ptx --pp 512 --tg 128 --reps 3 --json > $OUT/bench-2bit-ptx.json 2>>$OUT/log.txt
  python3 bench/gpu/summarize.py $OUT > $K/summary.json
  tar czf $K/raw.tgz -C $OUT --exclude log.txt --exclude gpu.txt .
  find $OUT -maxdepth 1 -type f ! -name log.txt ! -name gpu.txt -delete
  mv $K/summary.json $K/raw.tgz $OUT/
  python3 bench/gpu/summarize.py --print $OUT/summary.json
  exit 0
fi
# stage2
cp $K/gpu.txt $OUT/ 2>/dev/null
cat $K/gguf.part-a .dev/gguf.part-b > $KILN_CACHE/models/smollm2-135m-instruct-q4_1.gguf
G=$KILN_CACHE/models/smollm2-135m-instruct-q4_1.gguf
sha256sum $G | tee -a $OUT/log.txt
log "compile the 2-bit recipe (gpu device)"
( time $K/kiln compile --recipe recipes/smollm2-135m-2bit.yaml --device gpu --out $K/build ) >> $OUT/log.txt 2>&1
B2=$K/build/smollm2-135m-2bit/gpu
ls -la $B2 >> $OUT/log.txt
log "greedy 32 tokens, 3 prompts, ptx vs reference"
i=0
for p in "The capital of France is" "def fibonacci(n):" "Once upon a time, in a small village,"; do
  i=$((i+1))
  for m in 4bit 2bit; do
    M=$G; [ $m = 2bit ] && M=$B2
    for b in ptx reference; do
      $K/kiln run $M --backend $b -p "$p" -n 32 --ignore-eos --json > $OUT/greedy-$m-$i-$b.json 2>>$OUT/log.txt
    done
  done
done
python3 - <<'PY' | tee -a $OUT/log.txt
import json, os
o = os.environ["OUT"]
for m in ["4bit", "2bit"]:
    for i in [1, 2, 3]:
        a = json.load(open(f"{o}/greedy-{m}-{i}-ptx.json"))["output"]
        b = json.load(open(f"{o}/greedy-{m}-{i}-reference.json"))["output"]
        same = a["tokens"] == b["tokens"]
        first = None if same else next(j for j, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y)
        print(json.dumps({"build": m, "prompt": i, "identical": same, "first_difference": first, "ptx_text": a["text"][:80], "decode_tps_ptx": a["decode_tokens_per_second"], "decode_tps_ref": b["decode_tokens_per_second"]}))
PY
log "perplexity ctx 512, 4 chunks, ptx vs reference"
for m in 4bit 2bit; do
  M=$G; [ $m = 2bit ] && M=$B2
  for b in ptx reference; do
    $K/kiln ppl $M --backend $b --file tests/fixtures/text/ppl-excerpt.txt --ctx 512 --chunks 4 --json > $OUT/ppl-$m-$b.json 2>>$OUT/log.txt
  done
done
log "kiln bench on the GPU (and decode without the CUDA graph, for comparison)"
for m in 4bit 2bit; do
  M=$G; [ $m = 2bit ] && M=$B2
  $K/kiln bench $M --backend ptx --pp 512 --tg 128 --reps 3 --json > $OUT/bench-$m-ptx.json 2>>$OUT/log.txt
  KILN_PTX_GRAPHS=0 $K/kiln bench $M --backend ptx --pp 512 --tg 128 --reps 3 --json > $OUT/bench-$m-ptx-nograph.json 2>>$OUT/log.txt
done
log "PyTorch peer"
python3 -m pip install -q --no-index --no-deps --target /tmp/site $K/whl/*.whl >> $OUT/log.txt 2>&1
PYTHONPATH=/tmp/site python3 bench/gpu/torch_baseline.py $KILN_CACHE/models smollm2-135m-instruct-q4_1.gguf 512 128 3 > $OUT/bench-torch.json 2>>$OUT/log.txt
cat $OUT/bench-*.json $OUT/ppl-*.json | tee -a $OUT/log.txt
python3 bench/gpu/summarize.py $OUT > $K/summary.json
tar czf $K/raw.tgz -C $OUT --exclude log.txt --exclude gpu.txt .
find $OUT -maxdepth 1 -type f ! -name log.txt ! -name gpu.txt -delete
mv $K/summary.json $K/raw.tgz $OUT/
python3 bench/gpu/summarize.py --print $OUT/summary.json

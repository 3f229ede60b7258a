#!/usr/bin/env bash
# Before/after of issue 10's refactor: kv_transfer (connector/raw ratio) and gateway overhead,
# before (1a9770e, from /tmp/before via a sitecustomize) and after (HEAD), interleaved.
py=/work/main/.venv/bin/python
side_env() { if [ "$1" = before ]; then export PYTHONPATH=/tmp/ba2/site; cd /tmp/before; else unset PYTHONPATH; cd /work/main; fi; }
for round in 1 2; do
  for side in before after; do
    side_env $side
    $py -c "import pdserve; print(pdserve.__file__)" > /tmp/ba2/kv-$side-$round.txt
    $py -m benchmark.kv_transfer --sizes-mib 4 64 --repeats 5 --json /tmp/ba2/kv-$side-$round.json >> /tmp/ba2/kv-$side-$round.txt 2>&1
  done
done
for side in before after; do
  side_env $side
  $py -m pdserve.cli bench overhead --requests 24 --concurrency 4 --prompt-tokens 128 --output-tokens 32 --rounds 4 --warmup-requests 8 --no-progress --json /tmp/ba2/overhead-$side.json > /tmp/ba2/overhead-$side.txt 2>&1
done
echo done > /tmp/ba2/DONE

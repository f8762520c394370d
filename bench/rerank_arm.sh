#!/usr/bin/env bash
# One reranker arm of issue 12's val protocol: a 2-layer aligned cross-encoder from the MiniLM backbone
# (no pretraining), fine-tuned on the dual encoder's top-20 groups, exported into a copy of the bundle,
# then val with the prior weight tuned (300 T2I queries, 200 T2P queries).
#
#   bench/rerank_arm.sh NAME STEPS SEED [extra `vitrine rerank train` flags...]
#
# Environment: BUNDLE (the dual encoder's bundle, default bundles/apu/apu/seed0, from `bench/quality.py --rows apu`), DATA (the catalog),
# WORK (default runs/r12/arms), CACHE (feature cache), THREADS (2).
set -euo pipefail
name=$1 steps=$2 seed=$3; shift 3
BUNDLE=${BUNDLE:-bundles/apu/apu/seed0}
DATA=${DATA:-${VITRINE_DATA:-../shared/data/fashion-products}}
WORK=${WORK:-runs/r12/arms}
CACHE=${CACHE:-runs/cache-r12}
THREADS=${THREADS:-2}

mkdir -p "$WORK"
init="$WORK/init-s$seed.pt"
if [ ! -f "$init" ]; then
    # One start per seed, shared by every arm: arms differ only in what they are given, and a seed draws
    # both the new parts' initial weights and the groups.
    # aligned_dim: the bundle's embedding size
    python3 - "$init" "$BUNDLE" "$seed" <<'EOF'
import sys
import torch
from trainer.cross_encoder.factory import create_cross_encoder, save_cross_encoder
from vitrine.runtime import read_manifest
torch.manual_seed(int(sys.argv[3]))
model, _ = create_cross_encoder("minilm-l6-aligned", num_layers=2, aligned_dim=read_manifest(sys.argv[2]).embed_dim)
save_cross_encoder(model, sys.argv[1])
EOF
fi

run="$WORK/$name-s$seed"
vitrine rerank train --stage finetune --bundle "$BUNDLE" --catalog "$DATA" --init "$init" \
    --out "$run" --steps "$steps" --seed "$seed" --lr 1e-4 --threads "$THREADS" --cache "$CACHE" "$@"
vitrine rerank export --checkpoint "$run/model.pt" --bundle "$BUNDLE" --out "bundles/r12/arms/$name-s$seed"
vitrine rerank eval --bundle "bundles/r12/arms/$name-s$seed" --features-bundle "$BUNDLE" --catalog "$DATA" \
    --split val --num-queries 300 --t2p-queries 200 --tune-prior --threads "$THREADS" --cache "$CACHE" --out "$run/val"

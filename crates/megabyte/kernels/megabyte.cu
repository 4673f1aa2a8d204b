// MEGABYTE's fused CUDA kernels, one header per op: LayerNorm/RMSNorm, GELU and dropout,
// softmax cross-entropy over the byte logits, AdamW and the gradient norm, causal attention (a
// one-warp kernel for the local model's patches, a small-sequence kernel, and flash-style and
// bf16 tensor-core kernels for long sequences that never hold the K×K score matrix) with the
// KV cache append, and the embedding lookup. The linear maps run on cuBLAS.
//
// Every kernel reads and writes its activations as T (float or bf16) and computes in float.
// Norm weights, losses, statistics and optimizer state are always float.
// Built by build.rs (feature `cuda`) into one fat binary; launched from the `cuda` module of
// each op's file in src/ops/ (norm.rs for norm.cuh, ...), which documents each entry point's
// shapes, and whose CPU kernels are the reference for each.

#include "norm.cuh"
#include "pointwise.cuh"
#include "cross_entropy.cuh"
#include "adamw.cuh"
#include "attention.cuh"
#include "embedding.cuh"

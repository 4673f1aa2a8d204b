//! The test oracle for the whole model: MEGABYTE written again from the checkpoint contract
//! (parameter names and shapes, ARCHITECTURE.md) with plain candle ops and the compositions
//! of `ops::reference`, so that candle's autograd differentiates it. The model's one
//! forward/backward pass (fused kernels, explicit backward) is checked against it in
//! `gradients.rs`; it shares no code with `model.rs` or `nn.rs`.

use megabyte::nn::{Dropout, Params};
use megabyte::ops::pointwise::mix64;
use megabyte::ops::reference;
use megabyte::{Activation, ModelConfig, NormKind, Tensor, TransformerConfig, V};

const EPS: f64 = 1e-5;

/// Every byte's loss [B, T'] (nats) for bytes [B, T'], differentiable with respect to every
/// parameter, with the branch dropout of a training pass (`dropout`, keyed as the model keys
/// it: one key per transformer, one mask per block and branch, rows counted from
/// `row_offset` of the global batch).
pub fn byte_losses(cfg: &ModelConfig, params: &Params, bytes: &Tensor, dropout: Option<Dropout>) -> Tensor {
    let p = |name: &str| params.vars().get(name).unwrap_or_else(|| panic!("no parameter {name}")).as_tensor().clone();
    let (b, t) = bytes.dims2().unwrap();
    let (pp, dg, dl) = (cfg.patch_size, cfg.d_global(), cfg.local.width);
    let k = t / pp;
    let ids = bytes.flatten_all().unwrap();

    // Hash n-gram rows of every byte [B·T', G], from the config's rule, and their sum over G
    // from a table [rows, D] [B·T', D].
    let ngrams = cfg.hash_ngrams.as_ref().map(|h| {
        let rows: Vec<Vec<u32>> = bytes.to_vec2::<u32>().unwrap();
        let ids: Vec<u32> = rows
            .iter()
            .flat_map(|row| {
                let row: Vec<u8> = row.iter().map(|&x| x as u8).collect();
                (0..t).flat_map(move |pos| (0..h.sizes.len()).map(|i| h.row(i, &row, pos) as u32).collect::<Vec<_>>())
            })
            .collect();
        (Tensor::from_vec(ids, b * t * h.sizes.len(), bytes.device()).unwrap(), h.sizes.len())
    });
    let ngram_sum = |table: &str, d: usize| -> Option<Tensor> {
        let (ids, g) = ngrams.as_ref()?;
        Some(p(table).index_select(ids, 0).unwrap().reshape((b * t, *g, d)).unwrap().sum(1).unwrap()) // [B·T', D]
    };

    // Patch embedder: byte embeddings plus positions, P bytes to a patch, shifted one patch.
    let mut h = p("patch_embedder.byte_embed.weight").index_select(&ids, 0).unwrap();
    if let Some(extra) = ngram_sum("patch_embedder.hash_embed.weight", dg) {
        h = (h + extra).unwrap();
    }
    let h = h.reshape((b, t, dg)).unwrap();
    let h = h.broadcast_add(&p("patch_embedder.pos_embed.weight").narrow(0, 0, t).unwrap()).unwrap();
    let h = h.reshape((b, k, pp * dg)).unwrap(); // [B, K, P·D_G]
    let pad = p("patch_embedder.global_pad").reshape((1, 1, pp * dg)).unwrap().broadcast_as((b, 1, pp * dg)).unwrap();
    let h = Tensor::cat(&[&pad, &h.narrow(1, 0, k - 1).unwrap()], 1).unwrap();

    // Global model, then w_GL on every D_G slice of its output.
    let global_drop = dropout.map(|d| (mix64(d.key ^ 1), d.row_offset, d.p));
    let h = transformer(&p, "global", &cfg.global, cfg, &h, global_drop); // [B, K, P·D_G]
    let context = linear(&h.reshape((b * k, pp, dg)).unwrap(), &p("global_to_local.weight")); // [B·K, P, D_L]

    // Local model over patches [B·K, P] or, cross-patch, whole windows [B, T'].
    let local_bytes = if cfg.cross_patch { bytes.clone() } else { bytes.reshape((b * k, pp)).unwrap() };
    let (n, s) = local_bytes.dims2().unwrap();
    let mut e = p("local_embedder.byte_embed.weight").index_select(&local_bytes.flatten_all().unwrap(), 0).unwrap();
    if let Some(extra) = ngram_sum("local_embedder.hash_embed.weight", dl) {
        e = (e + extra).unwrap(); // local_bytes is bytes in row order either way
    }
    let e = e.reshape((n, s, dl)).unwrap();
    let pad = p("local_embedder.local_pad").reshape((1, 1, dl)).unwrap().broadcast_as((n, 1, dl)).unwrap();
    let e = Tensor::cat(&[&pad, &e.narrow(1, 0, s - 1).unwrap()], 1).unwrap(); // the previous byte's embedding
    let e = e.broadcast_add(&p("local_embedder.pos_embed.weight").narrow(0, 0, s).unwrap()).unwrap();
    let x = (context.reshape((n, s, dl)).unwrap() + e).unwrap();
    let local_drop = dropout.map(|d| (mix64(d.key ^ 2), d.row_offset * (n / b), d.p));
    let h = transformer(&p, "local", &cfg.local, cfg, &x, local_drop); // [N, S, D_L]

    let head = if cfg.tied_head { p("local_embedder.byte_embed.weight") } else { p("head.weight") };
    let logits = linear(&h, &head).reshape((b * t, V)).unwrap();
    reference::cross_entropy(&logits, &ids).unwrap().reshape((b, t)).unwrap()
}

/// The mean loss over every byte.
pub fn loss(cfg: &ModelConfig, params: &Params, bytes: &Tensor, dropout: Option<Dropout>) -> Tensor {
    byte_losses(cfg, params, bytes, dropout).mean_all().unwrap()
}

fn linear(x: &Tensor, w: &Tensor) -> Tensor {
    x.broadcast_matmul(&w.t().unwrap()).unwrap()
}

fn norm(p: &impl Fn(&str) -> Tensor, name: &str, kind: NormKind, x: &Tensor) -> Tensor {
    let bias = match kind {
        NormKind::LayerNorm => Some(p(&format!("{name}.bias"))),
        NormKind::RmsNorm => None,
    };
    reference::norm(x, &p(&format!("{name}.weight")), bias.as_ref(), EPS).unwrap()
}

/// Each head's rows of q or k [N, S, D] RMS-normalised over the head dimension and scaled by
/// the gain `name` [head_dim] (QK-norm).
fn qk_normed(p: &impl Fn(&str) -> Tensor, name: &str, x: &Tensor, heads: usize) -> Tensor {
    let (n, s, d) = x.dims3().unwrap();
    let per_head = x.contiguous().unwrap().reshape((n, s, heads, d / heads)).unwrap();
    reference::norm(&per_head, &p(&format!("{name}.weight")), None, EPS).unwrap().reshape((n, s, d)).unwrap()
}

/// Pre-norm blocks then the final norm; `drop` is (transformer key, first row, p).
fn transformer(p: &impl Fn(&str) -> Tensor, name: &str, cfg: &TransformerConfig, model: &ModelConfig, x: &Tensor, drop: Option<(u64, usize, f64)>) -> Tensor {
    let (d, kind) = (cfg.width, model.norm);
    let dropped = |x: Tensor, block: usize, branch: u64| match drop {
        Some((key, row, prob)) => {
            // The mask's kept elements, scaled by 1/(1 − p) in x's own precision.
            let mask = reference::dropout_mask(x.shape(), prob, mix64(key ^ ((block as u64) << 1 | branch)), row, x.device()).unwrap();
            let kept = mask.ne(0f32).unwrap().to_dtype(x.dtype()).unwrap();
            ((x * kept).unwrap() * (1.0 / (1.0 - prob))).unwrap()
        }
        None => x,
    };
    let mut x = x.clone();
    for i in 0..cfg.layers {
        let blk = format!("{name}.blocks.{i}");
        let qkv = linear(&norm(p, &format!("{blk}.attn_norm"), kind, &x), &p(&format!("{blk}.attn.qkv.weight")));
        let (mut q, mut k, v) = (qkv.narrow(2, 0, d).unwrap(), qkv.narrow(2, d, d).unwrap(), qkv.narrow(2, 2 * d, d).unwrap());
        if model.qk_norm {
            q = qk_normed(p, &format!("{blk}.attn.q_norm"), &q, cfg.heads);
            k = qk_normed(p, &format!("{blk}.attn.k_norm"), &k, cfg.heads);
        }
        let y = reference::causal_attention(&q.contiguous().unwrap(), &k.contiguous().unwrap(), &v.contiguous().unwrap(), cfg.heads, cfg.window).unwrap();
        x = (&x + dropped(linear(&y, &p(&format!("{blk}.attn.proj.weight"))), i, 0)).unwrap();
        let u = linear(&norm(p, &format!("{blk}.mlp_norm"), kind, &x), &p(&format!("{blk}.mlp.up.weight")));
        let g = match model.mlp {
            Activation::Gelu => reference::gelu(&u).unwrap(),
            Activation::Relu2 => reference::relu2(&u).unwrap(),
        };
        x = (&x + dropped(linear(&g, &p(&format!("{blk}.mlp.down.weight"))), i, 1)).unwrap();
    }
    norm(p, &format!("{name}.norm"), kind, &x)
}

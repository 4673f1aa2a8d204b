//! Typed model configuration, named presets and compute accounting.
//!
//! Letters: B batch, T bytes per sequence, P patch size, K = T/P patches,
//! D_G per-byte global width (the global model is P·D_G wide), D_L local width, V = 256.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The vocabulary: every byte value is a real target.
pub const V: usize = 256;

/// Normalisation used inside the transformer blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// The paper's choice: LayerNorm with weight and bias.
    LayerNorm,
    /// RMSNorm with a weight only.
    RmsNorm,
}

/// The activation of the blocks' MLP (`down(act(up(x)))`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// The exact (erf) GELU, as GPT-2 and the paper's models.
    #[default]
    Gelu,
    /// ReLU²: max(x, 0)² (So et al. 2021, "Primer"; modded-nanogpt's MLP): cheaper than
    /// GELU and sparse, with a derivative 2·max(x, 0) that grows with x.
    Relu2,
}

impl Activation {
    /// Every activation, in the order they are listed to users.
    pub const ALL: &'static [Activation] = &[Activation::Gelu, Activation::Relu2];

    /// The name users type (`--mlp NAME`), as in config.json.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu",
            Activation::Relu2 => "relu2",
        }
    }

    fn is_gelu(&self) -> bool {
        *self == Activation::Gelu
    }
}

/// One decoder-only causal transformer (pre-norm, attention + 4× MLP, no biases).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Model width (the global model's is P·D_G, the local model's D_L).
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    /// Sliding-window attention: each position sees only the last `window` positions of
    /// this transformer (itself included). None: all earlier positions (full causal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<usize>,
}

impl TransformerConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }

    /// Parameters of the blocks and final norm (the matrices dominate: 12·width² per layer);
    /// `usize::MAX` when the count overflows (which [`ModelConfig::validate`] refuses).
    pub fn params(&self, norm: NormKind) -> usize {
        self.checked_params(norm).unwrap_or(usize::MAX)
    }

    /// [`TransformerConfig::params`], `None` when it overflows.
    pub fn checked_params(&self, norm: NormKind) -> Option<usize> {
        let d = self.width;
        let norm_params = match norm {
            NormKind::LayerNorm => d.checked_mul(2)?,
            NormKind::RmsNorm => d,
        };
        let per_layer = d.checked_mul(d)?.checked_mul(12)?.checked_add(norm_params.checked_mul(2)?)?;
        self.layers.checked_mul(per_layer)?.checked_add(norm_params)
    }

    /// Matrix parameters only, the ones that cost 2 FLOPs each per position in a forward pass
    /// (`usize::MAX` when the count overflows, which [`ModelConfig::validate`] refuses).
    pub fn matmul_params(&self) -> usize {
        self.layers.checked_mul(12).and_then(|n| n.checked_mul(self.width)).and_then(|n| n.checked_mul(self.width)).unwrap_or(usize::MAX)
    }
}

/// The whole MEGABYTE architecture. Saved with every checkpoint; there is deliberately no
/// `Default`: pick a preset or write every field. An unknown key is an error, not ignored: a
/// misspelt option would otherwise train without it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// P: bytes per patch.
    pub patch_size: usize,
    /// T: bytes per sequence, a multiple of P.
    pub context: usize,
    /// The global model, `P·D_G` wide, one position per patch.
    pub global: TransformerConfig,
    /// The local model, `D_L` wide, one position per byte of a patch.
    pub local: TransformerConfig,
    pub norm: NormKind,
    /// Head weight-tied to the local byte embedding (the paper) or a separate matrix.
    pub tied_head: bool,
    /// Standard deviation of the truncated (at 2σ) normal initialisation.
    pub init_std: f64,
    /// Cross-patch local attention (our form of paper §2.3's variant): the local model runs
    /// over the whole T-byte sequence with a sliding window of `local.window` bytes instead
    /// of over each patch alone; a patch's first byte gets the previous byte's embedding
    /// instead of the pad, and the local position table covers the window's T positions
    /// (not a patch's P). The global model is unchanged. Needs `local.window`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cross_patch: bool,
    /// w_GL starts at zero instead of at std/√D_G: the local model first learns as a byte
    /// model, without the untrained global model's output added to its inputs, and the
    /// global term grows in from the first step (w_GL's gradient does not need it to be
    /// nonzero). Measured on enwik8 (RESULTS.md, the search): the cross-patch model at
    /// T = 4,096 left the bigram plateau at step ~500 instead of ~1,000.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_w_gl: bool,
    /// The patch embedder's initial standard deviation (its byte and position tables and the
    /// global pad); `init_std` when absent. At `init_std` (0.02) the global model's input is
    /// about 40 times smaller than the unit scale its first norm maps it to, so the norm
    /// multiplies every change of that input by about 40, and AdamW's steps of size lr move
    /// it by a tenth of itself per step. 1.0 starts it at the norm's scale. Measured
    /// (RESULTS.md, "MEGABYTE's training can spike"): the gradient spikes of one enwik8
    /// MEGABYTE run in three start in the patch embedder; 1.0 removes them on the CPU proxy
    /// `scripts/spike-proxy.sh`, and none of six enwik8 seeds with it spiked. Meant for MEGABYTE:
    /// a byte transformer (P = 1) with its input embedding at 1.0 trained worse on enwik8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_embed_std: Option<f64>,
    /// QK-norm, in both transformers: each head's query and key are RMS-normalised over the
    /// head dimension, each scaled by a learned gain of head_dim entries (one for q, one for k
    /// per block, shared by the heads, starting at 1), before the scores `q·k/√head_dim`; the
    /// KV cache holds the normalised keys. SpaceByte found that byte models need QK layer norm
    /// to train stably (`qk_layer_norm`, a LayerNorm with weight and bias over d_key);
    /// modded-nanogpt's is parameterless and raises the attention scale to a tuned constant
    /// instead. A parameterless norm caps every score at √head_dim (8 for heads of 64), which
    /// limits how sharply a position can attend to one earlier byte, the copying a byte model
    /// lives on; the gains let each block learn its own temperature for 2·head_dim parameters,
    /// with no constant to tune. RMS without centring, as in the blocks' RMSNorm.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub qk_norm: bool,
    /// The MLP's activation in both transformers: GELU (the default, absent from config.json)
    /// or ReLU².
    #[serde(default, skip_serializing_if = "Activation::is_gelu")]
    pub mlp: Activation,
    /// Every block's attention output projection and MLP down projection start at zero
    /// (drawn all the same, so every other parameter keeps its value), as in modded-nanogpt:
    /// each block starts as the identity on the residual stream, and the first step gives the
    /// zero matrices their gradients (which do not need them nonzero), then the blocks below
    /// train through them. The init_std draw stays for everything else.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub zero_init_proj: bool,
    /// Hash n-gram embeddings (BLT, Pagnoni et al. 2024): for each size n, the n bytes
    /// ending at a byte are hashed into one of `buckets` rows of a table of the patch
    /// embedder (D_G wide) and one of the local embedder (D_L wide), whose rows are added to
    /// that byte's own embedding wherever it is used: the global model then sees, in each
    /// byte slot of a patch, the bytes before it as well. Bytes before the sequence count as
    /// a 257th value, so a window's first bytes hash as the window alone shows them.
    /// Cached decoding and continuous batching give each step the rows of the bytes before it
    /// in its window (`MegaByte::ngram_ids`); the CUDA decoding engine does not take them yet,
    /// so `generate` on CUDA decodes such models stepwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_ngrams: Option<HashNgrams>,
}

/// The n-gram sizes and table rows of [`ModelConfig::hash_ngrams`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashNgrams {
    /// n of each n-gram (2 to 8, distinct), e.g. [3, 4, 5].
    pub sizes: Vec<usize>,
    /// Rows of each size's section of the tables.
    pub buckets: usize,
}

impl HashNgrams {
    /// The Mersenne prime 2³¹ − 1 the rolling hash reduces by: every intermediate value stays
    /// below 2³¹·257 < 2⁴⁰, exact in any integer type and in f64.
    pub const MODULUS: u64 = (1 << 31) - 1;

    /// Table row of the n-gram of `bytes` ending at position `t` (bytes before 0 count as
    /// 256), in section `i` (size `sizes[i]`): h = n, then h ← (257·h + b + 1) mod (2³¹ − 1)
    /// over the bytes from t back to t − n + 1, row i·buckets + h mod buckets.
    pub fn row(&self, i: usize, bytes: &[u8], t: usize) -> usize {
        let n = self.sizes[i];
        let mut h = n as u64;
        for k in 0..n {
            let b = if k <= t { bytes[t - k] as u64 } else { 256 };
            h = (257 * h + b + 1) % Self::MODULUS;
        }
        i * self.buckets + (h % self.buckets as u64) as usize
    }

    /// Rows of the tables: one section of `buckets` per size.
    pub fn rows(&self) -> usize {
        self.sizes.len().saturating_mul(self.buckets)
    }
}

pub const PRESETS: &[&str] = &[
    "tiny",
    "enwik8",
    "enwik8-10min",
    "paper-arxiv",
    "paper-pg19",
    "byte-enwik8",
    "byte-enwik8-10min",
    "byte-350m",
];

/// The preset of a command that names none.
pub const DEFAULT_PRESET: &str = "tiny";

impl ModelConfig {
    /// A named preset. `tiny` is the CPU shape; `enwik8` the 88.6M shape of the GPU issue;
    /// `paper-arxiv` and `paper-pg19` are Table 15's compute-matched and generation models;
    /// `byte-enwik8` and `byte-350m` are byte-transformer baselines (see [`ModelConfig::is_byte_transformer`]).
    /// `enwik8-10min` and `byte-enwik8-10min` are the models of a training recipe, the best
    /// measured 10-minute enwik8 MEGABYTE and its byte-transformer baseline of the same cost
    /// (their training settings: [`crate::train::TrainConfig::recipe`]).
    pub fn preset(name: &str) -> Result<Self> {
        let tf = |width, layers, heads| TransformerConfig { width, layers, heads, window: None };
        let cfg = match name {
            "tiny" => ModelConfig {
                patch_size: 8,
                context: 256,
                global: tf(128, 2, 2),
                local: tf(32, 2, 2),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            "enwik8" => ModelConfig {
                patch_size: 8,
                context: 4096,
                global: tf(768, 12, 12),
                local: tf(256, 4, 4),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            // RESULTS.md's `xp8-g768x4-l512x11-w1024-t1024-z-pe1`: P = 8, T = 1,024, a small
            // global model (768 × 4) and a local model of the baseline's layers less one that
            // sees the whole sequence across patches (window 1,024), w_GL starting at zero and
            // the patch embedder at unit scale. 63.8M parameters, 300M FLOPs per byte.
            "enwik8-10min" => ModelConfig {
                patch_size: 8,
                context: 1024,
                global: tf(768, 4, 12),
                local: TransformerConfig { window: Some(1024), ..tf(512, 11, 8) },
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: true,
                zero_w_gl: true,
                patch_embed_std: Some(1.0),
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            "paper-arxiv" => ModelConfig {
                patch_size: 8,
                context: 8192,
                global: tf(2048, 14, 32),
                local: tf(1024, 18, 16),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.006,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            "paper-pg19" => ModelConfig {
                patch_size: 8,
                context: 8192,
                global: tf(2048, 24, 32),
                local: tf(1024, 15, 16),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.006,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            // Byte-transformer baselines (paper §5, Table 2's "Transformer"): one level, full
            // causal attention over bytes. Expressed as MEGABYTE with P = 1 and no local
            // layers: the global model is then a decoder-only transformer over bytes, followed
            // by w_GL and the local final norm before the tied head.
            "byte-enwik8" => ModelConfig {
                patch_size: 1,
                context: 1024,
                global: tf(768, 12, 12),
                local: tf(768, 0, 12),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            // RESULTS.md's `byte-512x12`, `enwik8-10min`'s baseline: 38.8M parameters, 304M
            // FLOPs per byte.
            "byte-enwik8-10min" => ModelConfig {
                patch_size: 1,
                context: 1024,
                global: tf(512, 12, 8),
                local: tf(512, 0, 8),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            "byte-350m" => ModelConfig {
                patch_size: 1,
                context: 1024,
                global: tf(1024, 24, 16),
                local: tf(1024, 0, 16),
                norm: NormKind::LayerNorm,
                tied_head: true,
                init_std: 0.02,
                cross_patch: false,
                zero_w_gl: false,
                patch_embed_std: None,
                qk_norm: false,
                mlp: Activation::Gelu,
                zero_init_proj: false,
                hash_ngrams: None,
            },
            other => {
                return Err(Error::Config(format!(
                    "unknown preset `{other}`; choose one of: {}",
                    PRESETS.join(", ")
                )))
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// True for the one-level baseline: P = 1 and no local layers, so the global model is a
    /// decoder-only transformer over bytes.
    pub fn is_byte_transformer(&self) -> bool {
        self.patch_size == 1 && self.local.layers == 0
    }

    /// Positions of one local sequence: a patch (P), or the whole window with cross-patch attention (T).
    pub fn local_positions(&self) -> usize {
        if self.cross_patch {
            self.context
        } else {
            self.patch_size
        }
    }

    /// D_G: the per-byte slice of the global width.
    pub fn d_global(&self) -> usize {
        self.global.width / self.patch_size
    }

    /// K: patches per sequence.
    pub fn patches(&self) -> usize {
        self.context / self.patch_size
    }

    /// Checks every shape constraint, with a message that says what to change.
    pub fn validate(&self) -> Result<()> {
        let p = self.patch_size;
        let bad = |msg: String| Err(Error::Config(msg));
        if p == 0 {
            return bad("patch_size must be at least 1".into());
        }
        if self.context == 0 || self.context % p != 0 {
            return bad(format!(
                "context (T = {}) must be a positive multiple of patch_size (P = {p})",
                self.context
            ));
        }
        for (name, t) in [("global", &self.global), ("local", &self.local)] {
            if t.width == 0 || t.heads == 0 {
                return bad(format!("{name}: width and heads must be at least 1"));
            }
            if t.window == Some(0) {
                return bad(format!("{name}.window must be at least 1 (or absent for full attention)"));
            }
            if t.layers == 0 && name == "global" {
                return bad("global: layers must be at least 1 (only the local model may have none)".into());
            }
            if t.width % t.heads != 0 {
                return bad(format!(
                    "{name}.width ({}) must be divisible by {name}.heads ({})",
                    t.width, t.heads
                ));
            }
        }
        if self.global.width % p != 0 {
            return bad(format!(
                "global.width ({}) must be divisible by patch_size (P = {p}): it is P·D_G",
                self.global.width
            ));
        }
        if self.cross_patch && (self.local.layers == 0 || self.local.window.is_none()) {
            return bad("cross_patch needs local layers and local.window (the bytes each local position sees, e.g. 4·P)".into());
        }
        if !(self.init_std > 0.0 && self.init_std.is_finite()) {
            return bad(format!("init_std must be positive, got {}", self.init_std));
        }
        if let Some(std) = self.patch_embed_std {
            if !(std > 0.0 && std.is_finite()) {
                return bad(format!("patch_embed_std must be positive (or absent for init_std), got {std}"));
            }
        }
        if let Some(h) = &self.hash_ngrams {
            let mut sizes = h.sizes.clone();
            sizes.sort_unstable();
            sizes.dedup();
            if h.sizes.is_empty() || sizes.len() != h.sizes.len() || h.sizes.iter().any(|&n| !(2..=8).contains(&n)) {
                return bad(format!("hash_ngrams.sizes must be distinct n-gram sizes from 2 to 8, got {:?}", h.sizes));
            }
            if !(1..=1 << 24).contains(&h.buckets) {
                return bad(format!("hash_ngrams.buckets must be 1 to 16777216, got {}", h.buckets));
            }
        }
        // Every count derived from the shape must fit a machine word: a larger model could not
        // be allocated, and its counts would wrap around.
        if self.checked_param_counts().is_none() || self.kv_cache_elems().is_none() {
            return bad(format!(
                "the model is far too large: its parameter or cache sizes overflow a {}-bit count; \
                 lower the widths, layers or context",
                usize::BITS
            ));
        }
        Ok(())
    }

    /// Parameter counts, as the model allocates them (`usize::MAX` where a count overflows,
    /// which [`ModelConfig::validate`] refuses).
    pub fn param_counts(&self) -> ParamCounts {
        self.checked_param_counts().unwrap_or(ParamCounts { global: usize::MAX, local: usize::MAX, total: usize::MAX })
    }

    /// [`ModelConfig::param_counts`], `None` when a count overflows.
    pub fn checked_param_counts(&self) -> Option<ParamCounts> {
        let (p, t, dg, dl) = (self.patch_size, self.context, self.d_global(), self.local.width);
        let sum = |terms: &[Option<usize>]| terms.iter().try_fold(0usize, |acc, &x| acc.checked_add(x?));
        // patch embedder: byte table, byte positions, global pad; plus the global transformer
        let hash_rows = self.hash_ngrams.as_ref().map_or(0, HashNgrams::rows);
        let global = sum(&[
            V.checked_mul(dg),
            t.checked_mul(dg),
            p.checked_mul(dg),
            self.global.checked_params(self.norm),
            self.qk_gains(&self.global),
            hash_rows.checked_mul(dg),
        ])?;
        // w_GL, local byte table, local positions, local pad, local transformer, untied head
        let head = if self.tied_head { 0 } else { V.checked_mul(dl)? };
        let local = sum(&[
            dg.checked_mul(dl),
            V.checked_mul(dl),
            self.local_positions().checked_mul(dl),
            Some(dl),
            self.local.checked_params(self.norm),
            self.qk_gains(&self.local),
            hash_rows.checked_mul(dl),
            Some(head),
        ])?;
        Some(ParamCounts { global, local, total: global.checked_add(local)? })
    }

    /// The QK-norm gains of one transformer: a q and a k gain of head_dim entries per block.
    fn qk_gains(&self, t: &TransformerConfig) -> Option<usize> {
        if !self.qk_norm {
            return Some(0);
        }
        t.layers.checked_mul(2)?.checked_mul(t.width.checked_div(t.heads)?)
    }

    /// Elements of one sequence's KV caches (keys and values of every layer: the global model
    /// over K patches, the local one over its positions), `None` when the count overflows.
    pub fn kv_cache_elems(&self) -> Option<usize> {
        let cache = |t: &TransformerConfig, positions: usize| 2usize.checked_mul(t.layers)?.checked_mul(positions)?.checked_mul(t.width);
        cache(&self.global, self.patches())?.checked_add(cache(&self.local, self.local_positions())?)
    }

    /// A deliberately low estimate of the bytes `work` needs on its device, so that a model
    /// refused by [`ModelConfig::check_fits`] certainly cannot run (f64: no overflow):
    ///
    /// - the weights: 4 bytes a parameter in f32 (training keeps f32 master weights; inference
    ///   holds them in the activations' format);
    /// - training: their gradient and the two AdamW moments, 12 more bytes a parameter, and
    ///   activations for the micro-batch's rows: per sequence, each block keeps at least 4
    ///   values of its width per position (its input, normed input, attention output, MLP
    ///   input; the MLP's hidden 4·width is not counted), 1 with recomputation, plus the f32
    ///   logits (T·V);
    /// - inference: the KV caches and f32 logits (V) of every sequence decoded together.
    ///
    /// Measured against it: `paper-arxiv` at batch 16 in bf16 peaks at about 104 GiB on an
    /// H200, and this estimate is 36 GiB.
    pub fn memory_estimate(&self, work: Workload) -> f64 {
        let params = self.param_counts().total as f64;
        let bytes = |p: Precision| match p {
            Precision::F32 => 4.0,
            Precision::Bf16 => 2.0,
        };
        let f = |n: usize| n as f64;
        match work {
            Workload::Inference { rows, precision } => {
                let kv = 2.0 * (f(self.global.layers) * f(self.patches()) * f(self.global.width)
                    + f(self.local.layers) * f(self.local_positions()) * f(self.local.width));
                (params + f(rows) * kv) * bytes(precision) + f(rows) * 4.0 * f(V)
            }
            Workload::Training { rows, recompute, precision } => {
                let kept = if recompute { 1.0 } else { 4.0 };
                let per_sequence = f(self.global.layers) * f(self.patches()) * f(self.global.width)
                    + f(self.local.layers) * f(self.context) * f(self.local.width);
                let activations = f(rows) * (kept * per_sequence * bytes(precision) + 4.0 * f(self.context) * f(V));
                16.0 * params + activations
            }
        }
    }

    /// Refuses, before anything is allocated, a model whose [`ModelConfig::memory_estimate`]
    /// exceeds what `device` has: on the CPU the memory the kernel reports available
    /// (`MemAvailable` of /proc/meminfo; no limit where it cannot be read), on CUDA the
    /// device's free memory. The error gives the estimate and the limit.
    pub fn check_fits(&self, work: Workload, device: &candle_core::Device) -> Result<()> {
        let Some((limit, what)) = available_memory(device) else { return Ok(()) };
        let need = self.memory_estimate(work);
        if need <= limit as f64 {
            return Ok(());
        }
        let gib = |b: f64| b / (1u64 << 30) as f64;
        let doing = match work {
            Workload::Inference { rows, .. } => format!("to hold its weights and the caches of {rows} sequences"),
            Workload::Training { rows, .. } => format!("to train ({} parameters, {rows} sequences a micro-batch)", self.param_counts().total),
        };
        Err(Error::Config(format!(
            "the model does not fit: it needs at least {:.1} GiB {doing}, and {:.1} GiB are {what}; \
             choose a smaller model, batch or context (or --recompute)",
            gib(need),
            gib(limit as f64)
        )))
    }

    /// Training FLOPs per byte: paper §3's `6(m_G/P + m_L)` over matrix parameters (w_GL and
    /// the head counted in m_L), plus attention in the PaLM convention (`12·L·D·ctx` per
    /// position, causal masking not discounted; ctx is the window when there is one).
    pub fn train_flops_per_byte(&self) -> f64 {
        let p = self.patch_size as f64;
        let k = self.global.window.map_or(self.patches(), |w| w.min(self.patches())) as f64;
        let m_g = self.global.matmul_params() as f64;
        let m_l = self.local.matmul_params() as f64 + (self.d_global() as f64 + V as f64) * self.local.width as f64;
        let dense = 6.0 * (m_g / p + m_l);
        let attn_global = 12.0 * self.global.layers as f64 * self.global.width as f64 * k / p;
        // The local model attends within its patch, or across patches over its window.
        let local_reach = if self.cross_patch { self.context as f64 } else { p };
        let attn_local = 12.0 * self.local.layers as f64 * self.local.width as f64 * self.local.window.map_or(local_reach, |w| (w as f64).min(local_reach));
        dense + attn_global + attn_local
    }
}

/// What a model is for, in [`ModelConfig::memory_estimate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Evaluation or sampling of `rows` sequences together, weights in `precision`.
    Inference { rows: usize, precision: Precision },
    /// Training with `rows` sequences a micro-batch on this device.
    Training { rows: usize, recompute: bool, precision: Precision },
}

/// Bytes `device` can still allocate and where they are: the CPU's `MemAvailable`
/// (/proc/meminfo), a CUDA device's free memory; `None` when unknown.
fn available_memory(device: &candle_core::Device) -> Option<(u64, &'static str)> {
    match device {
        candle_core::Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.trim_start_matches("MemAvailable:").trim().trim_end_matches("kB").trim().parse().ok()?;
            Some((kib.checked_mul(1024)?, "available on this machine"))
        }
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            let (free, _total) = d.cuda_stream().context().mem_get_info().ok()?;
            Some((free as u64, "free on the GPU"))
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    pub global: usize,
    pub local: usize,
    pub total: usize,
}

/// The activations' number format. Parameters and optimizer state are always f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision (CUDA only): bf16 activations and matmuls from the f32 master weights;
    /// norm, softmax and loss statistics in f32.
    Bf16,
}

impl Precision {
    /// `f32`, `bf16`, or `auto` (bf16 on CUDA, f32 on the CPU).
    pub fn parse(spec: &str, device: &candle_core::Device) -> Result<Self> {
        let p = match spec.trim() {
            "f32" => Precision::F32,
            "bf16" => Precision::Bf16,
            "auto" => Precision::default_for(device),
            other => return Err(Error::Config(format!("unknown precision `{other}`: use f32, bf16 or auto"))),
        };
        p.check(device)?;
        Ok(p)
    }

    pub fn default_for(device: &candle_core::Device) -> Self {
        if device.is_cuda() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// bf16 needs the CUDA kernels.
    pub fn check(self, device: &candle_core::Device) -> Result<()> {
        if self == Precision::Bf16 && !device.is_cuda() {
            return Err(Error::Config("precision bf16 runs on CUDA only; use f32 on the CPU".into()));
        }
        Ok(())
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

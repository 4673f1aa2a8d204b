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

    /// Parameters of the blocks and final norm (the matrices dominate: 12·width² per layer).
    pub fn params(&self, norm: NormKind) -> usize {
        let d = self.width;
        let norm_params = match norm {
            NormKind::LayerNorm => 2 * d,
            NormKind::RmsNorm => d,
        };
        self.layers * (12 * d * d + 2 * norm_params) + norm_params
    }

    /// Matrix parameters only, the ones that cost 2 FLOPs each per position in a forward pass.
    pub fn matmul_params(&self) -> usize {
        self.layers * 12 * self.width * self.width
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
        Ok(())
    }

    /// Parameter counts, as the model allocates them.
    pub fn param_counts(&self) -> ParamCounts {
        let (p, t, dg, dl) = (self.patch_size, self.context, self.d_global(), self.local.width);
        // patch embedder: byte table, byte positions, global pad; plus the global transformer
        let global = V * dg + t * dg + p * dg + self.global.params(self.norm);
        // w_GL, local byte table, local positions, local pad, local transformer, untied head
        let head = if self.tied_head { 0 } else { V * dl };
        let local = dg * dl + V * dl + self.local_positions() * dl + dl + self.local.params(self.norm) + head;
        ParamCounts { global, local, total: global + local }
    }

    /// Training FLOPs per byte: paper §3's `6(m_G/P + m_L)` over matrix parameters (w_GL and
    /// the head counted in m_L), plus attention in the PaLM convention (`12·L·D·ctx` per
    /// position, causal masking not discounted; ctx is the window when there is one).
    pub fn train_flops_per_byte(&self) -> f64 {
        let p = self.patch_size as f64;
        let k = self.global.window.map_or(self.patches(), |w| w.min(self.patches())) as f64;
        let m_g = self.global.matmul_params() as f64;
        let m_l = (self.local.matmul_params() + self.d_global() * self.local.width + V * self.local.width)
            as f64;
        let dense = 6.0 * (m_g / p + m_l);
        let attn_global = 12.0 * (self.global.layers * self.global.width) as f64 * k / p;
        // The local model attends within its patch, or across patches over its window.
        let local_reach = if self.cross_patch { self.context as f64 } else { p };
        let attn_local = 12.0 * (self.local.layers * self.local.width) as f64 * self.local.window.map_or(local_reach, |w| (w as f64).min(local_reach));
        dense + attn_global + attn_local
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

//! Argument groups that several subcommands share, and the library's choices as clap values.
//! Every default that the library knows is the library's: an option left out is `None` here
//! and filled from it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::builder::PossibleValuesParser;
use megabyte::config::{DEFAULT_PRESET, PRESETS};
use megabyte_data::image::PixelOrder;
use megabyte::train::TrainConfig;
use megabyte::{Device, ModelConfig, Precision};

/// A `clap::ValueEnum` over a fieldless library enum: its values are the library's `ALL` and
/// their names its `name()`, so the command keeps no copy of either.
macro_rules! library_value_enum {
    ($(#[$doc:meta])* $name:ident($lib:ty)) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug)]
        pub struct $name(pub $lib);

        impl clap::ValueEnum for $name {
            fn value_variants<'a>() -> &'a [Self] {
                static ALL: std::sync::OnceLock<Vec<$name>> = std::sync::OnceLock::new();
                ALL.get_or_init(|| <$lib>::ALL.iter().map(|&v| $name(v)).collect())
            }

            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.0.name()))
            }
        }
    };
}

library_value_enum!(
    /// `--decay`: how the learning rate falls after warm-up.
    DecayArg(megabyte::train::Decay)
);
library_value_enum!(
    /// `--mlp`: the blocks' MLP activation.
    ActivationArg(megabyte::Activation)
);
library_value_enum!(
    /// `megabyte data fetch NAME`: a known data set.
    DatasetArg(megabyte_data::fetch::Dataset)
);

/// Which model: a preset, or a JSON model config, at its own context and window or others.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// Named architecture [default: tiny]. `enwik8-10min` and `byte-enwik8-10min` are
    /// recipes, a model and the training settings of a measured enwik8 run (README: Presets):
    /// `train` takes those settings too (each flag given replaces one), and `info` lists them.
    #[arg(long, value_parser = PossibleValuesParser::new(PRESETS))]
    pub preset: Option<String>,
    /// A model config JSON file (as saved in checkpoints as config.json); replaces the
    /// preset's model (a recipe's training settings still apply).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Bytes per sequence (T), replacing the preset's or config's: the same architecture at
    /// another context length (a multiple of P).
    #[arg(long)]
    pub context: Option<usize>,
    /// Sliding-window attention in the global model: each position sees only its last W
    /// positions (patches; bytes for the byte-* presets).
    #[arg(long, value_name = "W")]
    pub window: Option<usize>,
    /// QK-norm in both transformers: each head's query and key RMS-normalised, with a learned
    /// gain, before the attention scores (`qk_norm` of a model config).
    #[arg(long)]
    pub qk_norm: bool,
    /// The MLP's activation in both transformers (`mlp` of a model config) [default: the
    /// preset's or config's, gelu].
    #[arg(long, value_enum, value_name = "ACT")]
    pub mlp: Option<ActivationArg>,
    /// Every block's attention output and MLP down projections start at zero
    /// (`zero_init_proj` of a model config).
    #[arg(long)]
    pub zero_init_proj: bool,
    /// Hash n-gram embeddings of these sizes (e.g. `3,4,5`) in the patch and local embedders
    /// (`hash_ngrams` of a model config).
    #[arg(long, value_delimiter = ',', value_name = "N,N,..")]
    pub hash_ngrams: Option<Vec<usize>>,
    /// Rows of each n-gram size's table [default: the config's, else 8192].
    #[arg(long, value_name = "ROWS")]
    pub hash_buckets: Option<usize>,
}

/// Table rows per n-gram size when neither `--hash-buckets` nor the config gives them.
pub const DEFAULT_HASH_BUCKETS: usize = 8192;

impl ModelArgs {
    /// The preset named, or the default one.
    pub fn preset_name(&self) -> &str {
        self.preset.as_deref().unwrap_or(DEFAULT_PRESET)
    }

    /// The flag that names the model: `--config PATH` or `--preset NAME`.
    pub fn describe_flag(&self) -> String {
        match &self.config {
            Some(path) => format!("--config {}", path.display()),
            None => format!("--preset {}", self.preset_name()),
        }
    }

    /// What `--config` or `--preset` names, for records and tables.
    pub fn describe(&self) -> String {
        self.config.as_ref().map_or_else(|| self.preset_name().to_string(), |p| p.display().to_string())
    }

    /// The model: `--config`'s or the preset's, with `--context`, `--window` and the model
    /// options given (`--qk-norm`, `--mlp`, `--zero-init-proj`, `--hash-ngrams`,
    /// `--hash-buckets`) applied.
    pub fn resolve(&self) -> Result<ModelConfig> {
        self.resolve_over(None)
    }

    /// As [`ModelArgs::resolve`], but starting from `base` (a resumed run's model) unless
    /// `--config` or `--preset` names another.
    pub fn resolve_over(&self, base: Option<&ModelConfig>) -> Result<ModelConfig> {
        let mut cfg = match (&self.config, &self.preset, base) {
            (Some(path), _, _) => {
                let text = megabyte::data::read_regular_file(path, megabyte::data::JSON_MAX_BYTES, "model config")?;
                serde_json::from_slice(&text).with_context(|| format!("{} is not a valid model config", path.display()))?
            }
            (None, None, Some(base)) => base.clone(),
            (None, _, _) => ModelConfig::preset(self.preset_name())?,
        };
        if let Some(t) = self.context {
            cfg.context = t;
        }
        if self.window.is_some() {
            cfg.global.window = self.window;
        }
        cfg.qk_norm |= self.qk_norm;
        cfg.zero_init_proj |= self.zero_init_proj;
        if self.hash_ngrams.is_some() || self.hash_buckets.is_some() {
            let base = cfg.hash_ngrams.take();
            let sizes = match (self.hash_ngrams.clone(), &base) {
                (Some(sizes), _) => sizes,
                (None, Some(b)) => b.sizes.clone(),
                (None, None) => anyhow::bail!("--hash-buckets needs --hash-ngrams (or a model config with hash_ngrams)"),
            };
            let buckets = self.hash_buckets.or(base.map(|b| b.buckets)).unwrap_or(DEFAULT_HASH_BUCKETS);
            cfg.hash_ngrams = Some(megabyte::HashNgrams { sizes, buckets });
        }
        if let Some(act) = self.mlp {
            cfg.mlp = act.0;
        }
        // A config file or --context may break a shape rule; say so before any work.
        cfg.validate()?;
        Ok(cfg)
    }

    /// The training settings of the recipe `--preset` names, if it names one.
    pub fn recipe(&self) -> Option<TrainConfig> {
        TrainConfig::recipe(self.preset.as_deref()?)
    }
}

/// `--precision`: the activations' format. Parameters and optimizer state are always f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionArg {
    /// bf16 on CUDA, f32 on the CPU.
    Auto,
    F32,
    /// Mixed precision, CUDA only.
    Bf16,
}

impl PrecisionArg {
    pub fn on(self, device: &Device) -> Precision {
        match self {
            PrecisionArg::Auto => Precision::default_for(device),
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        }
    }
}

/// Where a command runs.
#[derive(clap::Args, Clone)]
pub struct DeviceArgs {
    /// cpu, cuda or cuda:N [default: cpu; in a rank of a multi-GPU `train` job: cuda:LOCAL_RANK].
    #[arg(long)]
    pub device: Option<String>,
    /// Activations' format.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    pub precision: PrecisionArg,
}

impl DeviceArgs {
    /// The device's name as given, `cpu` by default.
    pub fn name(&self) -> &str {
        self.device.as_deref().unwrap_or("cpu")
    }

    /// The device and the precision on it, for commands that load a model to run it (a
    /// trainer checks its own).
    pub fn open(&self) -> Result<(Device, Precision)> {
        let device = megabyte::device(self.name())?;
        let precision = self.precision.on(&device);
        precision.check(&device)?;
        Ok((device, precision))
    }
}

/// Where and how a training step runs: `train` and `bench`.
#[derive(clap::Args, Clone)]
pub struct ComputeArgs {
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (activation checkpointing): the same gradients for about a third more compute, when a
    /// sequence's activations would not fit in memory.
    #[arg(long)]
    pub recompute: bool,
}

/// `--order`: how an image's pixels become bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderArg {
    /// The paper's: --block × --block pixel blocks in raster order, raster order inside each.
    PatchScan,
    /// Rows top to bottom, pixels left to right.
    Raster,
}

/// The pixel order of image bytes: `data images` writes it, `generate --image` undoes it.
#[derive(clap::Args, Clone)]
pub struct PixelOrderArgs {
    /// Pixel order (`generate`: the one the model was trained on).
    #[arg(long, value_enum, default_value_t = OrderArg::PatchScan)]
    pub order: OrderArg,
    /// Block side p of patch-scan order; width and height must be multiples of it. Use
    /// P = p·p·C as the model's patch size so one patch is one block.
    #[arg(long, default_value_t = 4)]
    pub block: usize,
}

impl PixelOrderArgs {
    pub fn pixel_order(&self) -> PixelOrder {
        match self.order {
            OrderArg::PatchScan => PixelOrder::PatchScan { block: self.block },
            OrderArg::Raster => PixelOrder::Raster,
        }
    }
}

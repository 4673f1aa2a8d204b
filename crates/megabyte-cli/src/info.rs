//! `megabyte info`: parameter counts and training FLOPs per byte, and a recipe's training
//! settings.

use anyhow::Result;

use crate::args::ModelArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = args.model.resolve()?;
    let counts = cfg.param_counts();
    let flops = cfg.train_flops_per_byte();
    let recipe = args.model.recipe();
    if args.json {
        let out = serde_json::json!({
            "preset": args.model.config.is_none().then(|| args.model.preset_name()),
            "config": cfg,
            "params": counts,
            "train_flops_per_byte": flops,
            // As flags: its precision is the device's, not the recipe's.
            "recipe": recipe.as_ref().map(crate::train::recipe_flags),
        });
        println!("{out}");
        return Ok(());
    }
    if cfg.is_byte_transformer() {
        println!("byte transformer (one level: MEGABYTE with P = 1 and no local layers)");
    }
    let d_g = cfg.d_global();
    println!("P = {}, T = {}, K = {}, D_G = {d_g}", cfg.patch_size, cfg.context, cfg.patches());
    println!(
        "global: {} wide × {} layers ({} heads)   local: {} wide × {} layers ({} heads)",
        cfg.global.width, cfg.global.layers, cfg.global.heads, cfg.local.width, cfg.local.layers, cfg.local.heads
    );
    if let Some(w) = cfg.global.window {
        println!("global attention: sliding window of {w} positions");
    }
    match (cfg.cross_patch, cfg.local.window) {
        (true, Some(w)) => println!("local attention: across patches, sliding window of {w} bytes"),
        (false, Some(w)) => println!("local attention: within each patch, sliding window of {w} bytes"),
        _ => {}
    }
    if cfg.zero_w_gl {
        println!("w_GL starts at zero (zero_w_gl)");
    }
    if cfg.qk_norm {
        println!("queries and keys RMS-normalised per head, with gains (qk_norm)");
    }
    if let Some(h) = &cfg.hash_ngrams {
        println!("hash n-gram embeddings: sizes {:?}, {} rows each (hash_ngrams)", h.sizes, h.buckets);
    }
    if cfg.zero_init_proj {
        println!("attention output and MLP down projections start at zero (zero_init_proj)");
    }
    if cfg.mlp != megabyte::Activation::Gelu {
        println!("MLP activation: {}", cfg.mlp.name());
    }
    if let Some(std) = cfg.patch_embed_std {
        println!("the patch embedder starts at std {std} (patch_embed_std)");
    }
    println!("parameters: global {}  local {}  total {}", human(counts.global), human(counts.local), human(counts.total));
    println!("training FLOPs per byte: {:.4e}  (6·(m_G/P + m_L) + attention)", flops);
    if let Some(recipe) = recipe {
        println!("training recipe (`megabyte train --preset {}`): {}", args.model.preset_name(), crate::train::recipe_flags(&recipe));
    }
    Ok(())
}

fn human(n: usize) -> String {
    if n >= 1_000_000 {
        format!("{:.2}M", n as f64 / 1e6)
    } else {
        format!("{:.1}K", n as f64 / 1e3)
    }
}

//! The recipe presets are the models of the records they name.

use std::process::Command;

use megabyte::ModelConfig;

/// RESULTS.md's "enwik8 in 10 minutes" models, as their config files give them.
const RECORDED: [(&str, &str); 2] = [
    (
        "enwik8-10min", // xp8-g768x4-l512x11-w1024-t1024-z-pe1.json
        r#"{"patch_size": 8, "context": 1024, "global": {"width": 768, "layers": 4, "heads": 12}, "local": {"width": 512, "layers": 11, "heads": 8, "window": 1024}, "norm": "layer_norm", "tied_head": true, "init_std": 0.02, "cross_patch": true, "zero_w_gl": true, "patch_embed_std": 1.0}"#,
    ),
    (
        "byte-enwik8-10min", // byte-512x12.json
        r#"{"patch_size": 1, "context": 1024, "global": {"width": 512, "layers": 12, "heads": 8}, "local": {"width": 512, "layers": 0, "heads": 8}, "norm": "layer_norm", "tied_head": true, "init_std": 0.02}"#,
    ),
];

#[test]
fn recipe_presets_are_the_recorded_models() {
    for (name, json) in RECORDED {
        let recorded: ModelConfig = serde_json::from_str(json).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(["info", "--preset", name, "--json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let cfg: ModelConfig = serde_json::from_value(info["config"].clone()).unwrap();
        assert_eq!(cfg, recorded, "{name}");
        // The record's command: `--batch-size 64 --lr 2e-3 --warmup 200 --eval-every 1000
        // --checkpoint-every 100000 --sample-bytes 0 --dropout 0.1` for 8.5 minutes.
        let recipe = info["recipe"].as_str().unwrap();
        for flag in ["--batch-size 64 ", "--lr 0.002 ", "--warmup 200 ", "--eval-every 1000 ", "--checkpoint-every 100000 ", "--dropout 0.1 ", "--time 8.5 ", "--sample-bytes 0"] {
            assert!(recipe.contains(flag), "{name}: no `{flag}` in {recipe}");
        }
    }
}

#[test]
fn every_recipe_is_a_model_preset_with_valid_settings() {
    use megabyte::config::PRESETS;
    use megabyte::train::{TrainConfig, RECIPES};
    for name in PRESETS {
        ModelConfig::preset(name).unwrap();
        let recipe = TrainConfig::recipe(name);
        assert_eq!(recipe.is_some(), RECIPES.contains(name), "{name}");
        if let Some(recipe) = recipe {
            recipe.validate().unwrap();
        }
    }
}

/// The recipe's model options are off in every preset and absent from configs written
/// without them, so an old config.json reads as the model it was and a preset's config
/// writes as before; `--qk-norm`, `--mlp relu2`, `--zero-init-proj` and `--hash-ngrams` turn
/// them on over a preset.
#[test]
fn the_recipe_options_are_off_unless_asked_for_and_absent_from_old_configs() {
    use megabyte::config::PRESETS;
    for name in PRESETS {
        let cfg = ModelConfig::preset(name).unwrap();
        assert!(!cfg.qk_norm && cfg.mlp == megabyte::Activation::Gelu && !cfg.zero_init_proj && cfg.hash_ngrams.is_none(), "{name}");
        let text = serde_json::to_string(&cfg).unwrap();
        for key in ["qk_norm", "mlp", "zero_init_proj", "hash_ngrams"] {
            assert!(!text.contains(key), "{name}: {text}");
        }
    }
    for (name, json) in RECORDED {
        let old: ModelConfig = serde_json::from_str(json).unwrap();
        assert_eq!(old, ModelConfig::preset(name).unwrap(), "{name}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_megabyte")).args(["info", "--preset", "tiny", "--qk-norm", "--mlp", "relu2", "--zero-init-proj", "--hash-ngrams", "3,4", "--hash-buckets", "100", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((info["config"]["qk_norm"].as_bool(), info["config"]["mlp"].as_str()), (Some(true), Some("relu2")), "{info}");
    assert_eq!(info["config"]["zero_init_proj"].as_bool(), Some(true), "{info}");
    let cfg: ModelConfig = serde_json::from_value(info["config"].clone()).unwrap();
    let tiny = ModelConfig::preset("tiny").unwrap();
    // 2 gains of head_dim 64 (global) and 16 (local) per block, 2 blocks each; two n-gram
    // tables of 2·100 rows, D_G = 16 and D_L = 32 wide.
    let gains = 2 * 2 * (64 + 16);
    let tables = 2 * 100 * (16 + 32);
    assert_eq!(cfg.hash_ngrams, Some(megabyte::HashNgrams { sizes: vec![3, 4], buckets: 100 }));
    assert_eq!(cfg.param_counts().total, tiny.param_counts().total + gains + tables);
    assert_eq!(info["params"]["total"].as_u64(), Some(cfg.param_counts().total as u64), "{info}");
    let (_, params) = megabyte::MegaByte::init(&cfg, 1, megabyte::DType::F32, &megabyte::Device::Cpu).unwrap();
    assert_eq!(params.count(), cfg.param_counts().total, "the model allocates what the config counts");
}

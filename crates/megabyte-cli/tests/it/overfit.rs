//! A tiny model memorises one fixed batch: the loss falls near zero.

use megabyte::model::{mean_weights, TrainPass};
use megabyte::nn::Params;
use megabyte::optim::{AdamW, AdamWConfig};
use megabyte::{MegaByte, Tensor};

use crate::{bytes_tensor, random_bytes, tiny};

#[test]
fn tiny_model_overfits_one_batch() {
    let (model, params) = tiny(3);
    let t = model.config().context;
    let x = bytes_tensor(&[random_bytes(t, 21), random_bytes(t, 22)]);
    let (first, last) = overfit(&model, &params, &x);
    assert!(first > 5.0, "random init should start near ln 256, got {first}");
    assert!(last < 0.05, "loss only fell from {first} to {last}");
}

/// Up to 400 AdamW steps (lr 3e-3) on the one batch `x`: (first loss, last loss).
pub fn overfit(model: &MegaByte, params: &Params, x: &Tensor) -> (f32, f32) {
    let mut opt = AdamW::new(params.vars(), AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.0 }).unwrap();
    let first = model.loss(x).unwrap().to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..400 {
        let (loss, grads) = model.loss_and_grads(x, &mean_weights(x).unwrap(), TrainPass::default()).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        if last < 0.02 {
            break;
        }
        opt.step(&grads, 3e-3, 1.0).unwrap();
    }
    (first, last)
}

/// Muon for the blocks' matrices (AdamW for the rest, through the run's `Optimizer`) also
/// memorises the batch.
#[test]
fn tiny_model_overfits_one_batch_with_muon() {
    use megabyte::optim::{MuonConfig, Optimizer};
    let (model, params) = tiny(3);
    let t = model.config().context;
    let x = bytes_tensor(&[random_bytes(t, 21), random_bytes(t, 22)]);
    let adamw = AdamWConfig { beta1: 0.9, beta2: 0.98, eps: 1e-8, weight_decay: 0.0 };
    let mut opt = Optimizer::new(params.vars(), adamw, Some(MuonConfig { lr: 0.02, ..MuonConfig::DEFAULT }), 3e-3).unwrap();
    let first = model.loss(&x).unwrap().to_scalar::<f32>().unwrap();
    let mut last = first;
    for _ in 0..400 {
        let (loss, grads) = model.loss_and_grads(&x, &mean_weights(&x).unwrap(), TrainPass::default()).unwrap();
        last = loss.to_scalar::<f32>().unwrap();
        if last < 0.02 {
            break;
        }
        let norm = opt.step_clipped_agreed(&grads, 3e-3, 1.0, Ok).unwrap();
        assert!(norm.total.is_finite());
    }
    assert!(last < 0.05, "loss only fell from {first} to {last}");
}

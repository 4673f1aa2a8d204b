//! AdamW with decoupled weight decay on matrices only, and global-norm gradient clipping.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the schedule each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

/// One parameter's moments.
struct Moments {
    m: Var,
    v: Var,
}

/// AdamW over a fixed set of named parameters. Weight decay applies to tensors of rank ≥ 2
/// (the matrices and embedding tables), never to norms, pads or other vectors.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>,
    /// Optimizer steps taken (for bias correction).
    t: u64,
}

impl AdamW {
    pub fn new(params: &BTreeMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        let params: Vec<(String, Var)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let moments = params
            .iter()
            .map(|(_, p)| {
                let zeros = || Var::zeros(p.shape(), DType::F32, p.device());
                Ok(Moments { m: zeros()?, v: zeros()? })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW { cfg, params, moments, t: 0 })
    }

    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr` from the gradients in `grads`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.t += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        for ((name, p), mo) in self.params.iter().zip(&self.moments) {
            let g = grads
                .get(p.as_tensor())
                .ok_or_else(|| Error::Input(format!("no gradient reached parameter `{name}`")))?
                .to_dtype(DType::F32)?;
            let m = ((mo.m.as_tensor() * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((mo.v.as_tensor() * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + eps)?)?;
            let w = p.as_tensor().to_dtype(DType::F32)?;
            let w = if p.rank() >= 2 && weight_decay > 0.0 { (w * (1.0 - lr * weight_decay))? } else { w };
            let w = (w - (update * lr)?)?;
            p.set(&w.to_dtype(p.dtype())?)?;
            mo.m.set(&m)?;
            mo.v.set(&v)?;
        }
        Ok(())
    }

    /// Moments by name (`m.{param}`, `v.{param}`) for a checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), mo) in self.params.iter().zip(&self.moments) {
            out.insert(format!("m.{name}"), mo.m.as_tensor().clone());
            out.insert(format!("v.{name}"), mo.v.as_tensor().clone());
        }
        out
    }

    /// Restores the moments written by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> std::result::Result<(), String> {
        if tensors.len() != 2 * self.params.len() {
            return Err(format!(
                "optimizer state holds {} tensors, the model needs {}",
                tensors.len(),
                2 * self.params.len()
            ));
        }
        for ((name, p), mo) in self.params.iter().zip(&self.moments) {
            for (key, var) in [(format!("m.{name}"), &mo.m), (format!("v.{name}"), &mo.v)] {
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if t.dims() != p.dims() {
                    return Err(format!("optimizer tensor `{key}` has shape {:?}, expected {:?}", t.dims(), p.dims()));
                }
                let t = t.to_dtype(DType::F32).and_then(|t| t.to_device(p.device())).map_err(|e| e.to_string())?;
                var.set(&t).map_err(|e| e.to_string())?;
            }
        }
        self.t = t;
        Ok(())
    }
}

/// Global L2 norm of all gradients of `params`.
pub fn grad_norm(grads: &GradStore, params: &BTreeMap<String, Var>) -> Result<f64> {
    let mut sq = Vec::new();
    for p in params.values() {
        if let Some(g) = grads.get(p.as_tensor()) {
            sq.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
        }
    }
    let total = Tensor::stack(&sq, 0)?.sum_all()?.to_scalar::<f32>()?;
    Ok((total as f64).sqrt())
}

/// Multiplies every gradient by `scale` in place of the store's entries.
pub fn scale_grads(grads: &mut GradStore, params: &BTreeMap<String, Var>, scale: f64) -> Result<()> {
    for p in params.values() {
        if let Some(g) = grads.remove(p.as_tensor()) {
            grads.insert(p.as_tensor(), (g * scale)?);
        }
    }
    Ok(())
}

/// Adds `other`'s gradients into `acc` (gradient accumulation).
pub fn add_grads(acc: &mut GradStore, other: GradStore, params: &BTreeMap<String, Var>) -> Result<()> {
    let mut other = other;
    for p in params.values() {
        if let Some(g) = other.remove(p.as_tensor()) {
            let sum = match acc.remove(p.as_tensor()) {
                Some(a) => (a + g)?,
                None => g,
            };
            acc.insert(p.as_tensor(), sum);
        }
    }
    Ok(())
}

//! AdamW with decoupled weight decay on matrices only, and global-norm gradient clipping.

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Tensor, Var};

use crate::grad::Grads;
use crate::ops::adamw::AdamWStep;
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

impl AdamWConfig {
    /// Every setting finite and in range: 0 ≤ β1, β2 < 1, ε > 0 and weight decay ≥ 0 (a NaN
    /// here would make every weight NaN at the first step).
    pub fn validate(&self) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = *self;
        let bad = |m: String| Err(Error::Config(m));
        if !((0.0..1.0).contains(&beta1) && (0.0..1.0).contains(&beta2)) {
            return bad(format!("AdamW betas must be in [0, 1), got β1 {beta1} β2 {beta2}"));
        }
        if !(eps > 0.0 && eps.is_finite()) {
            return bad(format!("AdamW eps must be positive and finite, got {eps}"));
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return bad(format!("weight decay must be finite and at least 0 (0 = off), got {weight_decay}"));
        }
        Ok(())
    }
}

/// AdamW over a fixed set of named parameters. Weight decay applies to tensors of rank ≥ 2
/// (the matrices and embedding tables), never to norms, pads or other vectors. On CUDA one
/// fused kernel updates every parameter ([`crate::ops::adamw::update_many`]).
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, the f32 moments [m | v] (2·numel).
    moments: Vec<Tensor>,
    /// Optimizer steps taken (for bias correction).
    t: u64,
    /// The model's parts and the indices of their parameters, in name order.
    parts: Vec<(String, Vec<usize>)>,
}

/// A step's gradient norm before clipping: over all parameters, and over each part of the
/// model ([`part_of`]). The parts' squares sum to the total's square; a spike's part says
/// where it came from.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GradNorm {
    pub total: f64,
    pub parts: BTreeMap<String, f64>,
}

/// The part of the model a parameter belongs to, for [`GradNorm`]: the first component of its
/// name (`global`, `global_to_local`, `local`, `head`), except that each embedding table and
/// pad is a part of its own (`patch_embedder.byte_embed`, `patch_embedder.pos_embed`,
/// `patch_embedder.global_pad`, and the same three of `local_embedder`): MEGABYTE's spikes
/// show in the patch embedder, and its tables feed the global model in different ways.
pub fn part_of(name: &str) -> &str {
    match name.split_once('.') {
        Some((first, _)) if first.ends_with("_embedder") => name.strip_suffix(".weight").unwrap_or(name),
        Some((first, _)) => first,
        None => name,
    }
}

/// The name of the first of `tensors` that holds a NaN or an infinity, `None` when all are
/// finite. One fused Σx² over all of them and one read back; only when that sum is not finite
/// is each tensor checked exactly (x − x sums to 0 exactly when every x is finite), so finite
/// values whose squares overflow f32 (|x| ≳ 1e19) are not mistaken for non-finite ones.
pub fn first_non_finite<'a>(tensors: &[(&'a str, &Tensor)]) -> Result<Option<&'a str>> {
    if tensors.is_empty() {
        return Ok(None);
    }
    let all: Vec<&Tensor> = tensors.iter().map(|(_, t)| *t).collect();
    let sumsq = crate::ops::adamw::sum_squares(&all)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
    if sumsq.is_finite() {
        return Ok(None);
    }
    for (name, t) in tensors {
        let t = t.to_dtype(DType::F32)?;
        if (&t - &t)?.sum_all()?.to_scalar::<f32>()? != 0.0 {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

impl AdamW {
    pub fn new(params: &BTreeMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let params: Vec<(String, Var)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let moments = params
            .iter()
            .map(|(_, p)| Ok(Tensor::zeros(2 * p.elem_count(), DType::F32, p.device())?))
            .collect::<Result<Vec<_>>>()?;
        let mut by_part: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (name, _)) in params.iter().enumerate() {
            by_part.entry(part_of(name)).or_default().push(i);
        }
        let parts: Vec<(String, Vec<usize>)> = by_part.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        Ok(AdamW { cfg, params, moments, t: 0, parts })
    }

    pub fn steps(&self) -> u64 {
        self.t
    }

    /// One update with learning rate `lr` from the gradients in `grads`, each multiplied by
    /// `grad_scale` first (1.0, or a clipping factor computed by the caller).
    pub fn step(&mut self, grads: &Grads, lr: f64, grad_scale: f64) -> Result<()> {
        let gs = self.gradients(grads)?;
        self.update(&gs, lr, grad_scale, None)
    }

    /// One update with the gradients clipped to global norm `max_norm` (0: no clipping);
    /// returns the norm before clipping. On CUDA the norm never leaves the device until every
    /// update is queued. A non-finite norm changes nothing and is returned for the caller to
    /// report.
    pub fn step_clipped(&mut self, grads: &Grads, lr: f64, max_norm: f64) -> Result<GradNorm> {
        self.step_clipped_agreed(grads, lr, max_norm, Ok)
    }

    /// [`AdamW::step_clipped`] with `agree` applied to Σg² (an f32 scalar on the device)
    /// before anything reads it. Data-parallel ranks make it rank 0's: the CUDA sum adds its
    /// blocks' partial sums atomically, in no fixed order, so ranks with identical gradients
    /// could otherwise clip by factors a rounding apart and their weights drift apart.
    pub fn step_clipped_agreed(
        &mut self,
        grads: &Grads,
        lr: f64,
        max_norm: f64,
        agree: impl FnOnce(Tensor) -> Result<Tensor>,
    ) -> Result<GradNorm> {
        let gs = self.gradients(grads)?;
        // Σg² per part (f32 scalars on the device), and their sum for clipping.
        let part_sums = self
            .parts
            .iter()
            .map(|(_, members)| crate::ops::adamw::sum_squares(&members.iter().map(|&i| gs[i]).collect::<Vec<_>>()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let part_sums = Tensor::stack(&part_sums, 0)?; // [parts]
        let sumsq = agree(part_sums.sum_all()?)?;
        self.update(&gs, lr, 1.0, Some((&sumsq, max_norm)))?;
        // One read back: the total, then the parts.
        let all = Tensor::cat(&[&sumsq.reshape(1)?, &part_sums], 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let total = all[0].sqrt();
        if !total.is_finite() {
            self.t -= 1;
        }
        let parts = self.parts.iter().zip(&all[1..]).map(|((name, _), s)| (name.clone(), s.sqrt())).collect();
        Ok(GradNorm { total, parts })
    }

    /// Each parameter's gradient, in parameter order.
    fn gradients<'g>(&self, grads: &'g Grads) -> Result<Vec<&'g Tensor>> {
        self.params
            .iter()
            .map(|(name, p)| grads.get(p.as_tensor()).ok_or_else(|| Error::Input(format!("no gradient reached parameter `{name}`"))))
            .collect()
    }

    /// Applies one AdamW step to every parameter (fused, `ops::adamw::update_many`).
    fn update(&mut self, gs: &[&Tensor], lr: f64, grad_scale: f64, clip: Option<(&Tensor, f64)>) -> Result<()> {
        self.t += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.t as i32);
        let bc2 = 1.0 - beta2.powi(self.t as i32);
        let mut items: Vec<_> = self
            .params
            .iter()
            .zip(self.moments.iter_mut())
            .zip(gs)
            .map(|(((_, p), mv), g)| (p, *g, mv, if p.rank() >= 2 { weight_decay } else { 0.0 }))
            .collect();
        let hp = AdamWStep { lr, beta1, beta2, eps, weight_decay, bc1, bc2, grad_scale };
        if let Err(e) = crate::ops::adamw::update_many(&mut items, hp, clip) {
            // Some parameters may be updated already: the step count stays as it was and the
            // error ends training (the last checkpoint is intact).
            self.t -= 1;
            return Err(e.into());
        }
        Ok(())
    }

    /// The name of the first parameter (in name order) holding a NaN or an infinity, if any
    /// ([`first_non_finite`]: one device reduction and one read back when all are finite).
    pub fn first_non_finite_param(&self) -> Result<Option<String>> {
        let named: Vec<(&str, &Tensor)> = self.params.iter().map(|(n, p)| (n.as_str(), p.as_tensor())).collect();
        Ok(first_non_finite(&named)?.map(str::to_string))
    }

    /// Moments by name (`m.{param}`, `v.{param}`) for a checkpoint.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, p), mv) in self.params.iter().zip(&self.moments) {
            let n = p.elem_count();
            out.insert(format!("m.{name}"), mv.narrow(0, 0, n)?.reshape(p.shape())?);
            out.insert(format!("v.{name}"), mv.narrow(0, n, n)?.reshape(p.shape())?);
        }
        Ok(out)
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
        for ((name, p), mv) in self.params.iter().zip(self.moments.iter_mut()) {
            let mut halves = Vec::new();
            for key in [format!("m.{name}"), format!("v.{name}")] {
                let t = tensors.get(&key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                if t.dims() != p.dims() {
                    return Err(format!("optimizer tensor `{key}` has shape {:?}, expected {:?}", t.dims(), p.dims()));
                }
                halves.push(t.flatten_all().map_err(|e| e.to_string())?);
            }
            *mv = Tensor::cat(&halves, 0)
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_device(p.device()))
                .map_err(|e| e.to_string())?;
        }
        self.t = t;
        Ok(())
    }
}

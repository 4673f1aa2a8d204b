//! AdamW with decoupled weight decay on matrices only, and global-norm gradient clipping; and
//! Muon (orthogonalised Nesterov momentum) for the blocks' matrices with AdamW for the rest,
//! behind [`Optimizer`], the run's optimizer.

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
        let parts = parts_of(&params);
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
        let part_sums = part_sums(&self.parts, &gs)?;
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
    pub(crate) fn gradients<'g>(&self, grads: &'g Grads) -> Result<Vec<&'g Tensor>> {
        gradients_of(&self.params, grads)
    }

    /// Applies one AdamW step to every parameter (fused, `ops::adamw::update_many`).
    pub(crate) fn update(&mut self, gs: &[&Tensor], lr: f64, grad_scale: f64, clip: Option<(&Tensor, f64)>) -> Result<()> {
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

/// The model's parts ([`part_of`]) and the indices of their members in `params`, in name
/// order.
fn parts_of(params: &[(String, Var)]) -> Vec<(String, Vec<usize>)> {
    let mut by_part: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, (name, _)) in params.iter().enumerate() {
        by_part.entry(part_of(name)).or_default().push(i);
    }
    by_part.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The gradient of each of `params` in `grads`, in their order; a missing one is an error.
fn gradients_of<'g>(params: &[(String, Var)], grads: &'g Grads) -> Result<Vec<&'g Tensor>> {
    params
        .iter()
        .map(|(name, p)| grads.get(p.as_tensor()).ok_or_else(|| Error::Input(format!("no gradient reached parameter `{name}`"))))
        .collect()
}

/// Σg² of each part of the model (`parts`: names and the indices of their members in `gs`),
/// f32 scalars on the device, stacked: [parts].
fn part_sums(parts: &[(String, Vec<usize>)], gs: &[&Tensor]) -> Result<Tensor> {
    let sums = parts
        .iter()
        .map(|(_, members)| crate::ops::adamw::sum_squares(&members.iter().map(|&i| gs[i]).collect::<Vec<_>>()))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Tensor::stack(&sums, 0)?)
}

/// Muon hyper-parameters ([`Muon`]); the learning rate follows the run's schedule, scaled so
/// that its peak is `lr`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MuonConfig {
    /// Peak learning rate of the matrices Muon updates: the length of each step in units of
    /// the orthogonalised direction (whose RMS entry is about 1/√max(R, C)), so about 100
    /// times AdamW's (modded-nanogpt: 0.05 at width 768, AdamW 0.008 for the rest).
    pub lr: f64,
    /// Momentum of the Nesterov buffer.
    #[serde(default = "MuonConfig::default_momentum")]
    pub momentum: f64,
    /// Newton–Schulz iterations per step.
    #[serde(default = "MuonConfig::default_ns_steps")]
    pub ns_steps: usize,
    /// Decoupled weight decay of those matrices: w ← w·(1 − lr·weight_decay) before the step.
    #[serde(default)]
    pub weight_decay: f64,
}

impl MuonConfig {
    /// modded-nanogpt's settings, at a learning rate of 0.02.
    pub const DEFAULT: MuonConfig = MuonConfig { lr: 0.02, momentum: 0.95, ns_steps: 5, weight_decay: 0.0 };

    fn default_momentum() -> f64 {
        Self::DEFAULT.momentum
    }

    fn default_ns_steps() -> usize {
        Self::DEFAULT.ns_steps
    }

    pub fn validate(&self) -> Result<()> {
        let MuonConfig { lr, momentum, ns_steps, weight_decay } = *self;
        let bad = |m: String| Err(Error::Config(m));
        if !(lr > 0.0 && lr.is_finite()) {
            return bad(format!("the Muon learning rate must be positive and finite, got {lr}"));
        }
        if !(0.0..1.0).contains(&momentum) {
            return bad(format!("the Muon momentum must be in [0, 1), got {momentum}"));
        }
        if !(1..=20).contains(&ns_steps) {
            return bad(format!("Muon's Newton–Schulz steps must be 1 to 20, got {ns_steps}"));
        }
        if !(weight_decay >= 0.0 && weight_decay.is_finite()) {
            return bad(format!("the Muon weight decay must be finite and at least 0, got {weight_decay}"));
        }
        Ok(())
    }
}

/// True for the parameters Muon updates: the blocks' matrices (attention qkv and output, MLP
/// up and down) of both transformers. Embeddings, position tables, pads, norms and gains,
/// w_GL and the head stay with AdamW: Muon's orthogonalised steps are for hidden layers
/// whose inputs and outputs are both dense activations.
pub fn is_muon_param(name: &str, rank: usize) -> bool {
    rank == 2 && name.contains(".blocks.")
}

/// Muon (modded-nanogpt's form): per matrix W with gradient G, the momentum buffer
/// M ← β·M + (1 − β)·G, the Nesterov direction N = (1 − β)·G + β·M, then
/// W ← W·(1 − lr·wd) − lr·√max(1, R/C)·NS(N), where NS orthogonalises
/// ([`crate::ops::muon::newton_schulz`], in f32) and R×C is the matrix's shape. The fused
/// qkv weight [3D, D] is three matrices (q, k and v, each orthogonalised alone, as
/// modded-nanogpt's separate projections are).
pub struct Muon {
    cfg: MuonConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, the f32 momentum buffer (the parameter's shape).
    momenta: Vec<Tensor>,
}

impl Muon {
    pub fn new(params: Vec<(String, Var)>, cfg: MuonConfig) -> Result<Self> {
        cfg.validate()?;
        let momenta = params.iter().map(|(_, p)| Ok(Tensor::zeros(p.shape(), DType::F32, p.device())?)).collect::<Result<Vec<_>>>()?;
        Ok(Muon { cfg, params, momenta })
    }

    /// One step at learning rate `lr`, each gradient (in parameter order) multiplied by
    /// `grad_scale` first.
    pub fn step(&mut self, gs: &[&Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let MuonConfig { momentum: beta, ns_steps, weight_decay, .. } = self.cfg;
        for (((name, p), m), g) in self.params.iter().zip(self.momenta.iter_mut()).zip(gs) {
            let g = (g.to_dtype(DType::F32)? * grad_scale)?;
            *m = ((&*m * beta)? + (&g * (1.0 - beta))?)?;
            let n = ((&g * (1.0 - beta))? + (&*m * beta)?)?;
            let (r, c) = p.dims2()?;
            let blocks = if name.ends_with(".attn.qkv.weight") && r % 3 == 0 { 3 } else { 1 };
            let (rb, c) = (r / blocks, c);
            let o = crate::ops::muon::newton_schulz(&n.reshape((blocks, rb, c))?, ns_steps)?.reshape((r, c))?;
            let scale = (rb as f64 / c as f64).max(1.0).sqrt();
            let w = p.as_tensor().to_dtype(DType::F32)?;
            let w = ((w * (1.0 - lr * weight_decay))? - (o * (lr * scale))?)?;
            p.set(&w.to_dtype(p.dtype())?)?;
        }
        Ok(())
    }
}

/// The run's optimizer: AdamW for every parameter, or with `muon` Muon for the blocks'
/// matrices ([`is_muon_param`]) and AdamW for the rest. Clipping and the reported norms cover
/// every parameter either way.
pub struct Optimizer {
    adamw: AdamW,
    muon: Option<Muon>,
    /// The schedule's peak rate: Muon's rate is `muon.lr` times the schedule's `lr / peak`.
    peak_lr: f64,
    /// With Muon: every parameter in name order and, per part of the model, their indices.
    all: Vec<(String, Var)>,
    parts: Vec<(String, Vec<usize>)>,
}

impl Optimizer {
    /// AdamW with `adamw` for every parameter, or with `muon` as [`Optimizer`] says.
    pub fn new(params: &BTreeMap<String, Var>, adamw: AdamWConfig, muon: Option<MuonConfig>, peak_lr: f64) -> Result<Self> {
        let Some(muon_cfg) = muon else {
            return Ok(Optimizer { adamw: AdamW::new(params, adamw)?, muon: None, peak_lr, all: Vec::new(), parts: Vec::new() });
        };
        let (matrices, rest): (BTreeMap<String, Var>, BTreeMap<String, Var>) =
            params.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(k, v)| is_muon_param(k, v.rank()));
        let all: Vec<(String, Var)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let parts = parts_of(&all);
        Ok(Optimizer {
            adamw: AdamW::new(&rest, adamw)?,
            muon: Some(Muon::new(matrices.into_iter().collect(), muon_cfg)?),
            peak_lr,
            all,
            parts,
        })
    }

    /// [`AdamW::step_clipped_agreed`] over every parameter: AdamW's part updated on the device
    /// before the norm is read back, then (with Muon, and a finite norm) the matrices' Muon
    /// steps with the same clipping factor, at `muon.lr · lr / peak`.
    pub fn step_clipped_agreed(&mut self, grads: &Grads, lr: f64, max_norm: f64, agree: impl FnOnce(Tensor) -> Result<Tensor>) -> Result<GradNorm> {
        let Some(muon) = self.muon.as_mut() else {
            return self.adamw.step_clipped_agreed(grads, lr, max_norm, agree);
        };
        let gs = gradients_of(&self.all, grads)?;
        let part_sums = part_sums(&self.parts, &gs)?;
        let sumsq = agree(part_sums.sum_all()?)?;
        let adamw_gs = self.adamw.gradients(grads)?;
        self.adamw.update(&adamw_gs, lr, 1.0, Some((&sumsq, max_norm)))?;
        let all = Tensor::cat(&[&sumsq.reshape(1)?, &part_sums], 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        let total = all[0].sqrt();
        let parts = self.parts.iter().zip(&all[1..]).map(|((name, _), s)| (name.clone(), s.sqrt())).collect();
        if !total.is_finite() {
            self.adamw.t -= 1;
            return Ok(GradNorm { total, parts });
        }
        let scale = if max_norm > 0.0 && total > max_norm { max_norm / total } else { 1.0 };
        let muon_gs = gradients_of(&muon.params, grads)?;
        muon.step(&muon_gs, muon.cfg.lr * lr / self.peak_lr, scale)?;
        Ok(GradNorm { total, parts })
    }

    /// [`AdamW::first_non_finite_param`] over every parameter.
    pub fn first_non_finite_param(&self) -> Result<Option<String>> {
        let mut named: Vec<(&str, &Tensor)> = self.adamw.params.iter().map(|(n, p)| (n.as_str(), p.as_tensor())).collect();
        if let Some(muon) = &self.muon {
            named.extend(muon.params.iter().map(|(n, p)| (n.as_str(), p.as_tensor())));
        }
        Ok(first_non_finite(&named)?.map(str::to_string))
    }

    /// AdamW's moments ([`AdamW::state_tensors`]) and Muon's momentum buffers (`muon.{param}`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.adamw.state_tensors()?;
        if let Some(muon) = &self.muon {
            for ((name, _), m) in muon.params.iter().zip(&muon.momenta) {
                out.insert(format!("muon.{name}"), m.clone());
            }
        }
        Ok(out)
    }

    /// Restores what [`Optimizer::state_tensors`] wrote, and the step count; a checkpoint of
    /// the other optimizer (Muon buffers present or missing) is refused, naming the cause.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> std::result::Result<(), String> {
        let (muon_state, adamw_state): (HashMap<String, Tensor>, HashMap<String, Tensor>) =
            tensors.iter().map(|(k, v)| (k.clone(), v.clone())).partition(|(k, _)| k.starts_with("muon."));
        match &mut self.muon {
            None if !muon_state.is_empty() => return Err("optimizer state holds Muon buffers, and this run trains with AdamW alone".into()),
            None => {}
            Some(muon) => {
                if muon_state.len() != muon.params.len() {
                    return Err(format!("optimizer state holds {} Muon buffers, the model needs {}", muon_state.len(), muon.params.len()));
                }
                for ((name, p), m) in muon.params.iter().zip(muon.momenta.iter_mut()) {
                    let key = format!("muon.{name}");
                    let t = muon_state.get(&key).ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                    if t.dims() != p.dims() {
                        return Err(format!("optimizer tensor `{key}` has shape {:?}, expected {:?}", t.dims(), p.dims()));
                    }
                    *m = t.to_dtype(DType::F32).and_then(|t| t.to_device(p.device())).map_err(|e| e.to_string())?;
                }
            }
        }
        self.adamw.load_state(&adamw_state, t)
    }
}

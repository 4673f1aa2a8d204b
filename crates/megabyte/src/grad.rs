//! Gradients by parameter (`Grads`), which the model's backward pass fills
//! (`MegaByte::loss_and_grads`, `nn.rs`) and the optimizer reads.
//!
//! The backward pass does not use candle's autograd, which adds every gradient into a fresh
//! zero tensor, one memset and one add per graph edge (40% of an `enwik8` training step on the
//! H200, BENCHMARKS.md): each layer runs its ops' backward kernels in reverse order over the
//! activations its forward kept. `from_store` reads autograd's gradients for the tests, which
//! check the backward pass against autograd through the reference model (tests/it/reference.rs)
//! and against finite differences.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};

use crate::error::{Error, Result};

/// Gradients keyed by their parameter's tensor.
#[derive(Clone, Debug, Default)]
pub struct Grads {
    map: HashMap<TensorId, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Grads::default()
    }

    /// Adds `g` to the gradient of `param`.
    pub fn add(&mut self, param: &Tensor, g: Tensor) -> Result<()> {
        let g = g.to_dtype(param.dtype())?.reshape(param.shape())?;
        let sum = match self.map.remove(&param.id()) {
            Some(acc) => crate::ops::pointwise::add(&acc, &g)?,
            None => g,
        };
        self.map.insert(param.id(), sum);
        Ok(())
    }

    pub fn get(&self, param: &Tensor) -> Option<&Tensor> {
        self.map.get(&param.id())
    }

    /// Adds all of `other` into `self` (gradient accumulation).
    pub fn merge(&mut self, other: Grads) -> Result<()> {
        for (id, g) in other.map {
            let sum = match self.map.remove(&id) {
                Some(acc) => crate::ops::pointwise::add(&acc, &g)?,
                None => g,
            };
            self.map.insert(id, sum);
        }
        Ok(())
    }

    /// The gradients of `params` from candle's autograd; every parameter must have one.
    pub fn from_store(store: &GradStore, params: &std::collections::BTreeMap<String, Var>) -> Result<Self> {
        let mut out = Grads::new();
        for (name, p) in params {
            let g = store.get(p.as_tensor()).ok_or_else(|| Error::Input(format!("no gradient reached parameter `{name}`")))?;
            out.map.insert(p.as_tensor().id(), g.clone());
        }
        Ok(out)
    }
}

/// Σ over the rows of x [m, n] → [n], as a matrix product (candle's reductions over a
/// leading dimension are slow on CUDA).
pub(crate) fn sum_rows(x: &Tensor) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    let ones = Tensor::ones((1, m), x.dtype(), x.device())?;
    Ok(ones.matmul(&x.contiguous()?)?.squeeze(0)?)
}

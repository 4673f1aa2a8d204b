//! The CUDA decoding engine: [`super::generate`] on a GPU without a host round trip per byte.
//!
//! The stepwise path costs about a hundred candle ops and one read-back of the logits per
//! byte; at batch 1 that host work, not the GPU, sets the speed. Here every buffer is
//! allocated once, each step is a fixed list of launches on raw addresses (kernels/decode.cu,
//! the norm and GELU kernels, cuBLAS) captured once into a CUDA graph and replayed, the byte
//! is sampled on the device into the patch buffer that feeds the next step, and the host reads
//! bytes back once per patch.
//!
//! Prefill and window slides stay on the stepwise path ([`Decoder`]), whose caches and state
//! the engine continues: its KV buffers are written in place here and their lengths kept.
//!
//! With cross-patch attention the local cache is not reset at patch boundaries: it holds the
//! window's bytes, and the local position (cache length and position-table row) is a device
//! state that each local step advances, so one graph per position in the patch still serves.
//! Sliding-window attention (either model) attends to the cache's last W positions.

use candle_core::{DType, Device, Tensor};

use super::{Decoder, Sampler, Sampling};
use crate::config::V;
use crate::error::{Error, Result};
use crate::model::MegaByte;
use crate::nn::{Norm, Transformer, NORM_EPS};
use crate::ops::cuda::decode::{address_of, head_dim_supported, Kernels, Position, SampleRule};
use candle_core::cuda_backend::cudarc::driver::CudaGraph;

/// True when the engine runs `model` on `device`: CUDA, f32 or bf16 activations with every
/// matrix in that dtype (sampling models are converted so), f32 norm weights and pads, and
/// head dimensions `dec_attn` is built for. Cross-patch and sliding-window models included;
/// models with QK-norm or ReLU² are not (they decode through [`super::generate_stepwise`]).
pub(super) fn supported(model: &MegaByte, device: &Device) -> bool {
    let act = model.activation_dtype();
    let cfg = model.config();
    let is = |t: &Tensor, dtype: DType| t.dtype() == dtype;
    let stack_ok = |t: &Transformer, heads: usize| {
        let width = t.norm.weight.dim(0).unwrap_or(0);
        let norm_ok = |n: &Norm| is(&n.weight, DType::F32) && n.bias.as_ref().is_none_or(|b| is(b, DType::F32));
        width % 2 == 0
            && (t.blocks.is_empty() || head_dim_supported(width / heads.max(1)))
            && norm_ok(&t.norm)
            && t.blocks.iter().all(|b| {
                // QK-norm and ReLU² have no kernels here: such models decode stepwise.
                b.attn.qk_norm.is_none()
                    && b.mlp.act == crate::config::Activation::Gelu
                    && [&b.attn.qkv.weight, &b.attn.proj.weight, &b.mlp.up.weight, &b.mlp.down.weight].iter().all(|w| is(w, act))
                    && norm_ok(&b.attn_norm)
                    && norm_ok(&b.mlp_norm)
            })
    };
    let pe = &model.patch_embedder;
    let le = &model.local_embedder;
    device.is_cuda()
        && matches!(act, DType::F32 | DType::BF16)
        && [&pe.byte_embed, &pe.pos_embed, &le.byte_embed, &le.pos_embed, &model.global_to_local.weight, &model.head_linear().weight].iter().all(|t| is(t, act))
        && is(&le.local_pad, DType::F32)
        && cfg.hash_ngrams.is_none()
        && stack_ok(&model.global, cfg.global.heads)
        && stack_ok(&model.local, cfg.local.heads)
}

/// [`super::generate`] through the engine (the caller checked [`supported`]).
pub(super) fn generate(
    model: &MegaByte,
    prompts: &[Vec<u8>],
    n: usize,
    sampler: &mut Sampler,
    device: &Device,
    on_bytes: &mut dyn FnMut(&[u8]),
) -> Result<Vec<Vec<u8>>> {
    let mut dec = Decoder::new(model, prompts, device)?; // prefill, stepwise
    let rows = prompts.len();
    let p = model.config().patch_size;
    let start = dec.history[0].len();
    let rule = sample_rule(sampler.rule());
    let cross = model.config().cross_patch;
    let mut engine = Engine::new(model, rows, &mut dec, rule, device)?;
    engine.restart(&dec)?;
    let mut out = vec![Vec::new(); rows];
    let mut t = start; // index of the next byte
    while t < start + n {
        let local_len = dec.local.len(); // with cross-patch attention: bytes in the window
        let pos0 = local_len % p;
        let steps = (p - pos0).min(start + n - t);
        // The local position is read on the device, unchecked there: the window's slides keep
        // it inside the cache.
        if local_len + steps > dec.local.capacity() {
            return Err(Error::Input(format!("CUDA decoder: local position {} past the cache's {}", local_len + steps, dec.local.capacity())));
        }
        if rule.mode != 0 {
            let draws: Vec<f64> = (0..steps * rows).map(|_| sampler.uniform()).collect();
            engine.k.write(engine.u + (pos0 * rows * 8) as u64, &draws)?;
        }
        for pos in pos0..pos0 + steps {
            // With cross-patch attention only an empty window's first byte (an empty prompt)
            // takes the pad; otherwise every patch's first byte does, in its graph.
            engine.local_step(pos, cross && local_len + pos - pos0 == 0)?;
        }
        dec.local.set_len(local_len + steps);
        let bytes = engine.read_patch(pos0, steps)?;
        for step in bytes.chunks(rows) {
            let next: Vec<u8> = step.iter().map(|&b| b as u8).collect();
            for ((o, h), &b) in out.iter_mut().zip(dec.history.iter_mut()).zip(&next) {
                o.push(b);
                h.push(b);
            }
            on_bytes(&next);
        }
        t += steps;
        if pos0 + steps < p || t == start + n {
            continue;
        }
        // A patch is complete: one global step, or a window slide (stepwise prefill).
        if dec.slide_if_full()? {
            engine.restart(&dec)?;
            continue;
        }
        let len = dec.global.len();
        if len >= dec.global.capacity() {
            return Err(Error::Input(format!("CUDA decoder: global position {len} past the cache's {}", dec.global.capacity())));
        }
        engine.global_step()?;
        dec.global.set_len(len + 1);
        if !cross {
            dec.local.reset();
        }
    }
    Ok(out)
}

fn sample_rule(s: Sampling) -> SampleRule {
    let all = V as i32;
    match s {
        Sampling::Greedy => SampleRule { mode: 0, temperature: 1.0, top_k: all, top_p: 1.0 },
        Sampling::Temperature { temperature } => SampleRule { mode: 1, temperature, top_k: all, top_p: 1.0 },
        Sampling::TopK { k, temperature } => SampleRule { mode: 2, temperature, top_k: k.min(V) as i32, top_p: 1.0 },
        Sampling::TopP { p, temperature } => SampleRule { mode: 3, temperature, top_k: all, top_p: p },
    }
}

/// Addresses of a norm's f32 weight and optional bias.
type NormAddrs = (u64, Option<u64>);

fn norm_addrs(n: &Norm) -> Result<NormAddrs> {
    Ok((address_of(&n.weight)?, n.bias.as_ref().map(address_of).transpose()?))
}

/// One block's weights, as addresses.
struct LayerAddrs {
    attn_norm: NormAddrs,
    qkv: u64,
    proj: u64,
    mlp_norm: NormAddrs,
    up: u64,
    down: u64,
}

/// One transformer: its blocks, final norm and shape, and its scratch buffers for the
/// engine's rows (one position each).
struct Stack {
    layers: Vec<LayerAddrs>,
    norm: NormAddrs,
    width: usize,
    heads: usize,
    /// Sliding-window attention: positions seen, itself included (None: all).
    window: Option<usize>,
    /// Residual stream, norm output, qkv, attention output, attention projection, MLP hidden,
    /// MLP output: [rows, width] except qkv (3×) and the MLP hidden (4×).
    x: u64,
    h: u64,
    qkv: u64,
    y: u64,
    a: u64,
    u: u64,
    delta: u64,
}

/// Per-layer (key, value) buffer addresses of a KV cache and its capacity.
struct CacheAddrs {
    layers: Vec<(u64, u64)>,
    capacity: usize,
}

/// Addresses of the model's non-block parameters.
struct Tables {
    patch_bytes: u64,
    patch_pos: u64,
    global_to_local: u64,
    local_bytes: u64,
    local_pos: u64,
    local_pad: u64,
    head: u64,
}

struct Engine<'m> {
    k: Kernels,
    model: &'m MegaByte,
    rows: usize,
    rule: SampleRule,
    global: Stack,
    local: Stack,
    global_cache: CacheAddrs,
    local_cache: CacheAddrs,
    /// The global output [rows, P·D_G], the local contexts of the current patch
    /// [rows, P, D_L], the local output [rows, D_L] and the logits [rows, V].
    global_out: u64,
    context: u64,
    local_out: u64,
    logits: u64,
    /// The current patch's bytes, time-major [P, rows] u32; its uniform draws [P, rows] f64;
    /// the global state: i32 [global position, window byte of the next patch]; the local
    /// state (cross-patch attention): i32 [local position, unused].
    cur: u64,
    u: u64,
    state: u64,
    local_state: u64,
    tables: Tables,
    /// Captured on first use: one graph per local position, one for the global step.
    local_graphs: Vec<Option<CudaGraph>>,
    global_graph: Option<CudaGraph>,
    /// The buffers behind the addresses above, kept alive.
    _buffers: Vec<Tensor>,
}

impl<'m> Engine<'m> {
    /// Buffers for `rows` sequences, continuing the caches of `dec` (allocating the local
    /// one's buffers when its prefill did not).
    fn new(model: &'m MegaByte, rows: usize, dec: &mut Decoder, rule: SampleRule, device: &Device) -> Result<Self> {
        let candle_core::Device::Cuda(dev) = device else {
            return Err(Error::Input("the CUDA decoder needs a CUDA device".into()));
        };
        let act = model.activation_dtype();
        let k = Kernels::new(dev, act)?;
        let cfg = model.config();
        let mut buffers = Vec::new();
        let mut buffer = |n: usize, dtype: DType| -> Result<u64> {
            let t = Tensor::zeros(n.max(1), dtype, device)?;
            let a = address_of(&t)?;
            buffers.push(t);
            Ok(a)
        };
        let mut stack = |t: &Transformer, heads: usize, window: Option<usize>| -> Result<Stack> {
            let width = t.norm.weight.dim(0)?;
            let layers = t
                .blocks
                .iter()
                .map(|b| {
                    Ok(LayerAddrs {
                        attn_norm: norm_addrs(&b.attn_norm)?,
                        qkv: address_of(&b.attn.qkv.weight)?,
                        proj: address_of(&b.attn.proj.weight)?,
                        mlp_norm: norm_addrs(&b.mlp_norm)?,
                        up: address_of(&b.mlp.up.weight)?,
                        down: address_of(&b.mlp.down.weight)?,
                    })
                })
                .collect::<Result<_>>()?;
            let w = rows * width;
            Ok(Stack {
                layers,
                norm: norm_addrs(&t.norm)?,
                width,
                heads,
                window,
                x: buffer(w, act)?,
                h: buffer(w, act)?,
                qkv: buffer(3 * w, act)?,
                y: buffer(w, act)?,
                a: buffer(w, act)?,
                u: buffer(4 * w, act)?,
                delta: buffer(w, act)?,
            })
        };
        let global = stack(&model.global, cfg.global.heads, cfg.global.window)?;
        let local = stack(&model.local, cfg.local.heads, cfg.local.window)?;
        let (p, dl) = (cfg.patch_size, cfg.local.width);
        let global_out = buffer(rows * cfg.global.width, act)?;
        let context = buffer(rows * p * dl, act)?;
        let local_out = buffer(rows * dl, act)?;
        let logits = buffer(rows * V, act)?;
        let cur = buffer(p * rows, DType::U32)?;
        let u = buffer(p * rows, DType::F64)?;
        let state = buffer(2, DType::U32)?; // i32 values, never above 2³¹
        let local_state = buffer(2, DType::U32)?;
        let (pe, le) = (&model.patch_embedder, &model.local_embedder);
        let tables = Tables {
            patch_bytes: address_of(&pe.byte_embed)?,
            patch_pos: address_of(&pe.pos_embed)?,
            global_to_local: address_of(&model.global_to_local.weight)?,
            local_bytes: address_of(&le.byte_embed)?,
            local_pos: address_of(&le.pos_embed)?,
            local_pad: address_of(&le.local_pad)?,
            head: address_of(&model.head_linear().weight)?,
        };
        let global_cache = cache_addresses(&mut dec.global, rows, cfg.global.width, act, device)?;
        let local_cache = cache_addresses(&mut dec.local, rows, dl, act, device)?;
        Ok(Engine {
            k,
            model,
            rows,
            rule,
            global,
            local,
            global_cache,
            local_cache,
            global_out,
            context,
            local_out,
            logits,
            cur,
            u,
            state,
            local_state,
            tables,
            local_graphs: (0..p).map(|_| None).collect(),
            global_graph: None,
            _buffers: buffers,
        })
    }

    fn esize(&self) -> u64 {
        self.k.dtype().size_in_bytes() as u64
    }

    /// Takes over from the stepwise path after a prefill: its local contexts, its global
    /// position, and the bytes of a partial patch.
    fn restart(&self, dec: &Decoder) -> Result<()> {
        let c = dec.context.contiguous()?;
        let cfg = self.model.config();
        if c.dtype() != self.k.dtype() || c.elem_count() != self.rows * cfg.patch_size * cfg.local.width {
            return Err(Error::Input(format!("CUDA decoder: unexpected context {:?} {:?}", c.dims(), c.dtype())));
        }
        self.k.copy(self.context, address_of(&c)?, c.elem_count() * c.dtype().size_in_bytes())?;
        let len = dec.global.len();
        let first = len.saturating_sub(1) * cfg.patch_size; // window byte of the next patch
        self.k.write(self.state, &[len as i32, first as i32])?;
        let p = cfg.patch_size;
        let r = dec.local.len() % p; // bytes of the current patch so far
        let partial: Vec<u32> = (0..r).flat_map(|j| dec.history.iter().map(move |h| u32::from(h[h.len() - r + j]))).collect();
        if !partial.is_empty() {
            self.k.write(self.cur, &partial)?;
        }
        if cfg.cross_patch {
            self.k.write(self.local_state, &[dec.local.len() as i32, 0])?;
            if r == 0 && !dec.local.is_empty() {
                // A patch's first byte sees the previous byte, which local_step reads from
                // the previous patch's last slot.
                let last: Vec<u32> = dec.history.iter().map(|h| u32::from(h[h.len() - 1])).collect();
                self.k.write(self.cur + ((p - 1) * self.rows * 4) as u64, &last)?;
            }
        }
        // The copies above are ordered before the next launches; keep `c` alive until they ran.
        self.k.synchronize()?;
        Ok(())
    }

    /// Bytes pos0..pos0+steps of the current patch of every sequence, time-major (waits for
    /// the GPU).
    fn read_patch(&self, pos0: usize, steps: usize) -> Result<Vec<u32>> {
        Ok(self.k.read_u32(self.cur + (pos0 * self.rows * 4) as u64, steps * self.rows)?)
    }

    /// One position of a transformer: the input in `s.x`, the new position `len`; the final
    /// norm's output goes to `out`.
    fn stack_step(&self, s: &Stack, cache: &CacheAddrs, len: Position, out: u64) -> Result<()> {
        let (k, rows, d) = (&self.k, self.rows, s.width);
        let eps = NORM_EPS as f32;
        let mut delta = None;
        for (l, &(kc, vc)) in s.layers.iter().zip(&cache.layers) {
            k.norm(s.x, delta, l.attn_norm.0, l.attn_norm.1, s.h, rows, d, eps)?;
            k.linear(s.h, l.qkv, s.qkv, rows, 3 * d, d)?;
            k.attention(s.qkv, kc, vc, cache.capacity, len, s.window, s.y, rows, s.heads, d / s.heads)?;
            k.linear(s.y, l.proj, s.a, rows, d, d)?;
            k.norm(s.x, Some(s.a), l.mlp_norm.0, l.mlp_norm.1, s.h, rows, d, eps)?;
            k.linear_gelu(s.h, l.up, s.u, rows, 4 * d, d)?;
            k.linear(s.u, l.down, s.delta, rows, d, 4 * d)?;
            delta = Some(s.delta);
        }
        k.norm(s.x, delta, s.norm.0, s.norm.1, out, rows, d, eps)?;
        Ok(())
    }

    /// Runs local position `pos` of the current patch, sampling its byte into `cur[pos]` with
    /// the draws `u[pos]`. `window_start`: the first byte of an empty window (it gets the pad;
    /// run once, not captured).
    fn local_step(&mut self, pos: usize, window_start: bool) -> Result<()> {
        if window_start {
            return self.enqueue_local_step(pos, true);
        }
        if self.local_graphs[pos].is_none() {
            let graph = self.k.capture(|| self.enqueue_local_step(pos, false).map_err(candle_core::Error::wrap))?;
            self.local_graphs[pos] = Some(graph);
        }
        self.local_graphs[pos].as_ref().expect("captured above").launch().map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    fn enqueue_local_step(&self, pos: usize, window_start: bool) -> Result<()> {
        let (k, rows, es, tb) = (&self.k, self.rows, self.esize(), &self.tables);
        let cfg = self.model.config();
        let (p, dl) = (cfg.patch_size, cfg.local.width);
        let slot = |j: usize| self.cur + (j * rows * 4) as u64;
        // The previous byte: this patch's, or with cross-patch attention at a patch's first
        // position the previous patch's last (still in its slot); the pad otherwise.
        let prev = match (pos, cfg.cross_patch && !window_start) {
            (0, false) => None,
            (0, true) => Some(slot(p - 1)),
            _ => Some(slot(pos - 1)),
        };
        // The local position: fixed per position in the patch, or the window's byte count.
        let at = if cfg.cross_patch { Position::OnDevice(self.local_state) } else { Position::Fixed(pos) };
        let ctx = self.context + (pos * dl) as u64 * es;
        k.local_input(ctx, p * dl, tb.local_bytes, tb.local_pad, tb.local_pos, at, prev, self.local.x, rows, dl)?;
        self.stack_step(&self.local, &self.local_cache, at, self.local_out)?;
        k.linear(self.local_out, tb.head, self.logits, rows, V, dl)?;
        k.sample(self.logits, slot(pos), self.u + (pos * rows * 8) as u64, rows, self.rule)?;
        if cfg.cross_patch {
            k.advance(self.local_state, 0)?;
        }
        Ok(())
    }

    /// The global step for the completed patch in `cur`, at the global position and window
    /// byte in `state` (which it advances); leaves the next patch's local contexts in `context`.
    fn global_step(&mut self) -> Result<()> {
        if self.global_graph.is_none() {
            let graph = self.k.capture(|| self.enqueue_global_step().map_err(candle_core::Error::wrap))?;
            self.global_graph = Some(graph);
        }
        self.global_graph.as_ref().expect("captured above").launch().map_err(candle_core::Error::wrap)?;
        Ok(())
    }

    fn enqueue_global_step(&self) -> Result<()> {
        let (k, rows, tb) = (&self.k, self.rows, &self.tables);
        let cfg = self.model.config();
        let (p, dg, dl) = (cfg.patch_size, cfg.d_global(), cfg.local.width);
        k.patch_input(tb.patch_bytes, tb.patch_pos, self.state, self.cur, self.global.x, rows, p, dg)?;
        self.stack_step(&self.global, &self.global_cache, Position::OnDevice(self.state), self.global_out)?;
        k.linear(self.global_out, tb.global_to_local, self.context, rows * p, dl, dg)?;
        k.advance(self.state, p)?;
        Ok(())
    }
}

/// The per-layer buffers of a KV cache (allocated where missing) as addresses.
fn cache_addresses(cache: &mut crate::nn::KvCache, rows: usize, width: usize, dtype: DType, device: &Device) -> Result<CacheAddrs> {
    let layers = cache.buffers(rows, width, dtype, device)?.iter().map(|(k, v)| Ok((address_of(k)?, address_of(v)?))).collect::<Result<_>>()?;
    Ok(CacheAddrs { layers, capacity: cache.capacity() })
}

//! Scratch diagnostic: which windows give the patch embedder a large gradient.
use megabyte::{DType, Device, Tensor};

fn main() -> megabyte::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::Path::new(&a[1]);
    let data = std::fs::read(&a[2]).unwrap();
    let n: usize = a[3].parse().unwrap();
    let (model, params) = megabyte::checkpoint::load_model(dir, DType::F32, &Device::Cpu)?;
    let t = model.config().context;
    let mut rng = 0x9E3779B97F4A7C15u64 ^ a.get(4).map_or(0, |s| s.parse().unwrap());
    let mut out = Vec::new();
    for _ in 0..n {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let start = (rng >> 11) as usize % (data.len() - t);
        let w: Vec<u32> = data[start..start + t].iter().map(|&b| b as u32).collect();
        let x = Tensor::from_vec(w, (1, t), &Device::Cpu)?;
        let (loss, grads) = model.loss_and_grads(&x, 1.0)?;
        let mut pe = 0.0f64;
        let mut pos_rows = None;
        let mut glob = 0.0f64;
        for (name, v) in params.vars() {
            let g = grads.get(v.as_tensor()).unwrap();
            let s = g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            if name.starts_with("patch_embedder") { pe += s; }
            if name.starts_with("global.") { glob += s; }
            if name == "patch_embedder.pos_embed.weight" {
                pos_rows = Some(g.sqr()?.sum(1)?.to_vec1::<f32>()?);
            }
        }
        let rows = pos_rows.unwrap();
        let (arg, mx) = rows.iter().enumerate().fold((0, 0.0f32), |m, (i, &v)| if v > m.1 { (i, v) } else { m });
        let tot: f32 = rows.iter().sum();
        out.push((pe.sqrt(), glob.sqrt(), start, arg, (mx / tot.max(1e-30)), loss.to_dtype(DType::F64)?.to_scalar::<f64>()?));
    }
    out.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let med = out[out.len() / 2].0;
    println!("median pe norm {med:.4}, n {n}");
    for (pe, g, start, arg, frac, loss) in out.iter().take(12) {
        let s = (start + arg).saturating_sub(16);
        let snippet = String::from_utf8_lossy(&data[s..(start + arg + 16).min(data.len())]).replace('\n', "\\n");
        println!("pe {pe:8.3} global {g:7.3} loss {loss:.3} start {start} pos {arg} (patch {}, byte {}) share {frac:.2} | {snippet}", arg / 8, arg % 8);
    }
    Ok(())
}

//! The Rust model against the independent NumPy reference (tools/reference/).

use megabyte::nn::Params;
use megabyte::{DType, Device, MegaByte, ModelConfig};

use crate::{fixture, max_abs_diff};

#[test]
fn logits_and_loss_match_the_numpy_reference() {
    let mut tensors = megabyte::checkpoint::load_tensors(&fixture("golden-tiny-v1.safetensors")).unwrap();
    let input = tensors.remove("input.bytes").unwrap();
    let want_logits = tensors.remove("output.logits").unwrap();
    let want_loss = tensors.remove("output.loss").unwrap().to_dtype(DType::F64).unwrap();
    let want_loss = want_loss.flatten_all().unwrap().to_vec1::<f64>().unwrap()[0];

    let cfg = ModelConfig::preset("tiny").unwrap();
    let mut params = Params::for_loading(DType::F32, &Device::Cpu);
    let model = MegaByte::new(&cfg, &mut params).unwrap();
    params.assign(&tensors).unwrap();

    let logits = model.logits(&input).unwrap();
    let diff = max_abs_diff(&logits, &want_logits);
    assert!(diff < 2e-5, "logits differ from the reference by {diff}");
    let loss = model.loss(&input).unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((loss - want_loss).abs() < 1e-5, "loss {loss} vs reference {want_loss}");
}

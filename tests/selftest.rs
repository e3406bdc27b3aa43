//! `kdx selftest` through the library: the CPU's f32 ops against its f64 reference, and device
//! tensors behaving as documented whether or not this machine has a GPU.

use kdx::backend::backend;
use kdx::cli::selftest::selftest;
use kdx::{DType, Device, Tensor};

#[test]
fn cpu_selftest_passes_every_case() {
    let report = selftest(Device::Cpu, 7, None).unwrap();
    let failures: Vec<_> = report.failures().collect();
    assert!(failures.is_empty(), "{}", report.table());
    for op in [
        "add",
        "add_assign",
        "scale",
        "sum_squares",
        "dropout",
        "gelu",
        "gelu_backward",
        "tanh",
        "tanh_backward",
        "layer_norm",
        "layer_norm_backward",
        "l2_normalize",
        "embedding",
        "embedding_backward",
        "cross_entropy",
        "pool(mean)",
        "pool_backward(cls)",
        "adamw",
        "cosine_topk",
        "cosine_topk(2 calls)",
        "sample",
    ] {
        assert!(report.checks.iter().any(|c| c.op == op), "no check of {op}");
    }
}

#[test]
fn selftest_filter_selects_ops() {
    let report = selftest(Device::Cpu, 7, Some("layer_norm")).unwrap();
    assert!(!report.checks.is_empty());
    assert!(report.checks.iter().all(|c| c.op.contains("layer_norm")));
}

/// Without a GPU, every way onto one says what is missing; with one, a round trip keeps the values
/// and host-only accessors refuse the device tensor instead of panicking.
#[test]
fn device_tensors_copy_or_explain() {
    let x = Tensor::from_vec(vec![1.5f32, -2.0, 0.25, 3.0, -0.5, 7.0], &[2, 3]).unwrap();
    match x.to_device(Device::Cuda(0)) {
        Err(e) => {
            let message = format!("{e:#}");
            assert!(message.contains("cuda:0"), "{message}");
            let b = backend(Device::Cuda(0)).err().expect("no GPU, no backend");
            assert!(format!("{b:#}").contains("cuda:0"));
        }
        Ok(on_gpu) => {
            assert_eq!(on_gpu.device(), Device::Cuda(0));
            let message = format!("{:#}", on_gpu.data::<f32>().unwrap_err());
            assert!(message.contains("to_device(Device::Cpu)"), "{message}");
            let back = on_gpu.to_device(Device::Cpu).unwrap();
            assert_eq!(back.to_vec_f32(), x.to_vec_f32());
            // Clones share the buffer until one is written: the other keeps its values.
            let mut doubled = on_gpu.clone();
            backend(Device::Cuda(0))
                .unwrap()
                .scale(&mut doubled, 2.0)
                .unwrap();
            assert_eq!(on_gpu.to_vec_f32(), x.to_vec_f32());
            assert_eq!(doubled.to_vec_f32()[5], 14.0);
            let bf16 = on_gpu.to_dtype(DType::BF16).unwrap();
            assert_eq!(
                bf16.to_vec_f32(),
                x.to_vec_f32(),
                "these values are exact in bf16"
            );
            let report = selftest(Device::Cuda(0), 7, None).unwrap();
            assert!(report.failures().next().is_none(), "{}", report.table());
        }
    }
}

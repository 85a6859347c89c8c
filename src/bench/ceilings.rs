//! The two rates that bound any batch: dense matrix multiply and device-memory bandwidth.
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use super::median_seconds;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ceilings {
    /// Square bf16 matmul, FLOP/s.
    pub bf16_matmul_flops: f64,
    /// Square fp32 matmul (TF32 off, libtorch's default), FLOP/s.
    pub fp32_matmul_flops: f64,
    /// Device-to-device copy, bytes read plus bytes written per second.
    pub copy_bytes_per_sec: f64,
}

impl Ceilings {
    /// Large enough to saturate an H200 on a GPU; small enough to finish in seconds on a CPU.
    pub fn measure(device: Device) -> Self {
        let (matmul_n, copy_bytes) = match device {
            Device::Cuda(_) => (8192, 2 << 30),
            _ => (1024, 256 << 20),
        };
        Self {
            bf16_matmul_flops: matmul_rate(device, Kind::BFloat16, matmul_n),
            fp32_matmul_flops: matmul_rate(device, Kind::Float, matmul_n),
            copy_bytes_per_sec: copy_bandwidth(device, copy_bytes),
        }
    }

    pub fn matmul_flops(&self, kind: Kind) -> f64 {
        match kind {
            Kind::BFloat16 | Kind::Half => self.bf16_matmul_flops,
            _ => self.fp32_matmul_flops,
        }
    }
}

pub fn matmul_rate(device: Device, kind: Kind, n: i64) -> f64 {
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let seconds = median_seconds(device, 3, 10, || {
        let _ = a.matmul(&b);
    });
    2.0 * (n as f64).powi(3) / seconds
}

pub fn copy_bandwidth(device: Device, bytes: i64) -> f64 {
    let source = Tensor::ones([bytes / 4], (Kind::Float, device));
    let mut target = Tensor::empty([bytes / 4], (Kind::Float, device));
    let seconds = median_seconds(device, 2, 10, || {
        target.copy_(&source);
    });
    2.0 * bytes as f64 / seconds
}

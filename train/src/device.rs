//! Device and precision selection, checked before any work starts.

use serde::{Deserialize, Serialize};
use tch::Device;

use crate::error::{Result, TrainError};

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TorchDevice {
    /// CPU (the default).
    Cpu,
    /// CUDA device `N`.
    Cuda(usize),
}

impl std::str::FromStr for TorchDevice {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(TorchDevice::Cpu),
            "cuda" => Ok(TorchDevice::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(TorchDevice::Cuda)
                .ok_or_else(|| TrainError::Config(format!("unknown device '{s}' (cpu, cuda or cuda:N)"))),
        }
    }
}

impl TorchDevice {
    /// The libtorch device, or a clear error if CUDA is asked for and not usable.
    pub fn resolve(self) -> Result<Device> {
        match self {
            TorchDevice::Cpu => Ok(Device::Cpu),
            TorchDevice::Cuda(n) => {
                let count = tch::Cuda::device_count();
                if count <= 0 {
                    return Err(TrainError::Device(format!(
                        "--device cuda:{n}: CUDA is not available (libtorch sees no CUDA device: no NVIDIA GPU or driver \
                         on this machine); use --device cpu"
                    )));
                }
                if n as i64 >= count {
                    return Err(TrainError::Device(format!(
                        "--device cuda:{n}: only {count} CUDA device(s) present (cuda:0..cuda:{})",
                        count - 1
                    )));
                }
                Ok(Device::Cuda(n))
            }
        }
    }

    /// The device in words, for the run's start message.
    pub fn describe(self, device: Device) -> String {
        match device {
            Device::Cpu => format!("cpu ({} threads)", tch::get_num_threads()),
            Device::Cuda(n) => format!(
                "cuda:{n}{}",
                if tch::Cuda::cudnn_is_available() {
                    " (cuDNN)"
                } else {
                    ""
                }
            ),
            other => format!("{other:?}"),
        }
    }
}

/// Float precision of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// float32 everywhere.
    F32,
    /// bfloat16 matrix products (linear layers, attention, patch embedding) with float32 weights, norms,
    /// softmax, loss and optimiser: autocast's policy, applied per op.
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            _ => Err(TrainError::Config(format!("unknown precision '{s}' (f32 or bf16)"))),
        }
    }
}

impl Precision {
    /// The compute kind of matrix products (`None`: float32).
    pub fn compute_kind(self) -> Option<tch::Kind> {
        match self {
            Precision::F32 => None,
            Precision::Bf16 => Some(tch::Kind::BFloat16),
        }
    }
}

/// What libtorch offers on this machine (for `imglish doctor`).
#[derive(Debug, Clone, Serialize)]
pub struct TorchInfo {
    /// The libtorch release tch is built for.
    pub version: &'static str,
    /// CUDA devices libtorch sees.
    pub cuda_devices: i64,
    /// Whether cuDNN is usable.
    pub cudnn: bool,
    /// Intra-op threads.
    pub threads: i32,
}

/// Runs a tiny computation on libtorch (a 2x2 matrix product) and reports the devices it sees.
pub fn torch_self_test() -> Result<TorchInfo> {
    let a = tch::Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).view([2, 2]);
    let p: Vec<f32> = Vec::try_from(&a.matmul(&a).view([-1]))
        .map_err(|e| TrainError::Device(format!("libtorch self-test failed: {e}")))?;
    if p != [7.0, 10.0, 15.0, 22.0] {
        return Err(TrainError::Device(format!(
            "libtorch self-test gave a wrong result: {p:?}"
        )));
    }
    Ok(TorchInfo {
        version: "2.13.0",
        cuda_devices: tch::Cuda::device_count(),
        cudnn: tch::Cuda::cudnn_is_available(),
        threads: tch::get_num_threads(),
    })
}

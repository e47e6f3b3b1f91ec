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

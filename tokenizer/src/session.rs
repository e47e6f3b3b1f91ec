//! Running ONNX models: execution-provider selection and a small typed wrapper around an `ort` session.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, TensorRef, ValueType};

use crate::error::{Error, Result};
use crate::runtime::runtime;

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The best available: TensorRT, then CUDA, then CPU (says which it picked).
    Auto,
    /// ONNX Runtime's CPU execution provider.
    #[default]
    Cpu,
    /// The CUDA execution provider on GPU N (needs the `cuda` feature and the GPU library).
    Cuda(u32),
    /// The TensorRT execution provider on GPU N (needs the `cuda` feature and the GPU library).
    TensorRt(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Auto => f.write_str("auto"),
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
            Device::TensorRt(n) => write!(f, "tensorrt:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (k, Some(i)),
            None => (s, None),
        };
        let index = match index {
            None => 0,
            Some(i) => i
                .parse::<u32>()
                .map_err(|_| format!("invalid device index '{i}' in '{s}' (expected e.g. cuda:0)"))?,
        };
        match (kind, s.contains(':')) {
            ("auto", false) => Ok(Device::Auto),
            ("cpu", false) => Ok(Device::Cpu),
            ("cuda", _) => Ok(Device::Cuda(index)),
            ("tensorrt", _) => Ok(Device::TensorRt(index)),
            _ => Err(format!(
                "unknown device '{s}' (expected cpu, auto, cuda[:N] or tensorrt[:N])"
            )),
        }
    }
}

/// Options for creating a [`Model`]; validated when set.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    device: Device,
    intra_threads: usize,
    optimize: bool,
    spinning: bool,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            device: Device::Cpu,
            intra_threads: 1,
            optimize: true,
            spinning: false,
        }
    }
}

impl SessionOptions {
    /// Runs on `device`.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Uses `threads` intra-op threads (at least 1).
    pub fn try_with_threads(mut self, threads: usize) -> Result<Self> {
        if threads == 0 {
            return Err(Error::Model {
                model: "session options".into(),
                reason: "intra-op threads must be at least 1".into(),
            });
        }
        self.intra_threads = threads;
        Ok(self)
    }

    /// Enables (default) or disables ONNX Runtime's graph optimisations.
    pub fn with_optimization(mut self, on: bool) -> Self {
        self.optimize = on;
        self
    }

    /// Lets ONNX Runtime's intra-op threads busy-wait between operators (off by default: in `tokenize` the
    /// decode workers share the cores with the model, and spinning threads take cycles from them; measured in
    /// `scripts/bench-tokenize`).
    pub fn with_spinning(mut self, on: bool) -> Self {
        self.spinning = on;
        self
    }

    /// The requested device.
    pub fn device(&self) -> Device {
        self.device
    }
}

/// The element type and shape (`-1` for dynamic) of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Input/output name.
    pub name: String,
    /// Element type as ONNX Runtime reports it (e.g. `f32`, `i64`).
    pub elem: String,
    /// Dimensions, `-1` where dynamic.
    pub shape: Vec<i64>,
}

/// A model output copied out of ONNX Runtime.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// A float32 tensor.
    F32 {
        /// Dimensions.
        shape: Vec<usize>,
        /// Row-major values.
        data: Vec<f32>,
    },
    /// An int64 tensor (e.g. `ArgMax`/`ArgMin` results).
    I64 {
        /// Dimensions.
        shape: Vec<usize>,
        /// Row-major values.
        data: Vec<i64>,
    },
}

/// A model output read in place from ONNX Runtime's buffer (see [`Model::run_f32_with`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OutputView<'a> {
    /// A float32 tensor.
    F32 {
        /// Dimensions.
        shape: Vec<usize>,
        /// Row-major values.
        data: &'a [f32],
    },
    /// An int64 tensor.
    I64 {
        /// Dimensions.
        shape: Vec<usize>,
        /// Row-major values.
        data: &'a [i64],
    },
}

/// A loaded ONNX model with one float32 input, bound to a device.
pub struct Model {
    session: Session,
    name: String,
    provider: &'static str,
    inputs: Vec<TensorInfo>,
    outputs: Vec<TensorInfo>,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("provider", &self.provider)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

fn tensor_infos(outlets: &[ort::value::Outlet]) -> Vec<TensorInfo> {
    outlets
        .iter()
        .map(|o| match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => TensorInfo {
                name: o.name().to_string(),
                elem: ty.to_string(),
                shape: shape.iter().copied().collect(),
            },
            other => TensorInfo {
                name: o.name().to_string(),
                elem: other.to_string(),
                shape: Vec::new(),
            },
        })
        .collect()
}

/// Picks the execution provider for `device`, or explains why it cannot be used.
fn providers(device: Device) -> Result<(Vec<ort::ep::ExecutionProviderDispatch>, &'static str)> {
    match device {
        Device::Cpu => Ok((Vec::new(), "cpu")),
        #[cfg(not(feature = "cuda"))]
        Device::Auto => {
            tracing::info!("device auto: this build has no GPU support (feature `cuda`), using the CPU");
            Ok((Vec::new(), "cpu"))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) | Device::TensorRt(_) => Err(Error::Device {
            device: device.to_string(),
            reason: "this imglish was built without GPU support; rebuild with `--features cuda` and install the GPU \
                     runtime with scripts/setup-onnxruntime --gpu"
                .into(),
        }),
        #[cfg(feature = "cuda")]
        _ => gpu::providers(device),
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use ort::ep::{ExecutionProvider, TensorRT, CUDA};

    use super::Device;
    use crate::error::{Error, Result};

    fn preload() {
        let cuda = std::env::var_os("IMGLISH_CUDA_LIB_DIR").map(std::path::PathBuf::from);
        let cudnn = std::env::var_os("IMGLISH_CUDNN_LIB_DIR").map(std::path::PathBuf::from);
        if cuda.is_some() || cudnn.is_some() {
            if let Err(e) = ort::ep::cuda::preload_dylibs(cuda.as_deref(), cudnn.as_deref()) {
                tracing::warn!("could not preload CUDA libraries: {e}");
            }
        }
    }

    fn available<E: ExecutionProvider>() -> bool {
        E::is_available().unwrap_or(false)
    }

    pub(super) fn providers(device: Device) -> Result<(Vec<ort::ep::ExecutionProviderDispatch>, &'static str)> {
        preload();
        let unavailable = |what: &str| Error::Device {
            device: device.to_string(),
            reason: format!(
                "the {what} execution provider is not available in the loaded ONNX Runtime library \
                 (install the GPU build with scripts/setup-onnxruntime --gpu and point ORT_DYLIB_PATH at it)"
            ),
        };
        match device {
            Device::Cuda(n) => {
                if !available::<CUDA>() {
                    return Err(unavailable("CUDA"));
                }
                Ok((
                    vec![CUDA::default().with_device_id(n as i32).build().error_on_failure()],
                    "cuda",
                ))
            }
            Device::TensorRt(n) => {
                if !available::<TensorRT>() {
                    return Err(unavailable("TensorRT"));
                }
                Ok((
                    vec![TensorRT::default().with_device_id(n as i32).build().error_on_failure()],
                    "tensorrt",
                ))
            }
            Device::Auto => {
                if available::<TensorRT>() {
                    Ok((vec![TensorRT::default().build().error_on_failure()], "tensorrt"))
                } else if available::<CUDA>() {
                    Ok((vec![CUDA::default().build().error_on_failure()], "cuda"))
                } else {
                    tracing::info!(
                        "device auto: no CUDA/TensorRT execution provider in the loaded library, using the CPU"
                    );
                    Ok((Vec::new(), "cpu"))
                }
            }
            Device::Cpu => Ok((Vec::new(), "cpu")),
        }
    }
}

enum Source<'a> {
    Bytes(&'a [u8]),
    Path(&'a Path),
}

impl Model {
    /// Loads a model from the bytes of an `.onnx` file; `name` is used in messages.
    pub fn from_bytes(name: &str, bytes: &[u8], options: &SessionOptions) -> Result<Self> {
        Self::build(name, options, Source::Bytes(bytes))
    }

    /// Loads a model whose initializers keep their data in files beside it (external data): ONNX Runtime reads
    /// the `.onnx` file by path and resolves those files from its folder, whatever the working directory.
    pub fn from_path_with_external_data(path: &Path, options: &SessionOptions) -> Result<Self> {
        Self::build(&path.display().to_string(), options, Source::Path(path))
    }

    fn build(name: &str, options: &SessionOptions, source: Source<'_>) -> Result<Self> {
        let rt = runtime()?;
        let session_err = |e: &dyn fmt::Display| Error::Session {
            model: name.to_string(),
            reason: e.to_string(),
        };
        let (eps, provider) = providers(options.device)?;
        let level = if options.optimize {
            GraphOptimizationLevel::All
        } else {
            GraphOptimizationLevel::Disable
        };
        let mut builder = Session::builder(rt.environment())
            .map_err(|e| session_err(&e))?
            .with_optimization_level(level)
            .map_err(|e| session_err(&e))?
            .with_intra_threads(options.intra_threads)
            .map_err(|e| session_err(&e))?
            .with_inter_threads(1)
            .map_err(|e| session_err(&e))?
            .with_intra_op_spinning(options.spinning)
            .map_err(|e| session_err(&e))?;
        if !eps.is_empty() {
            builder = builder.with_execution_providers(eps).map_err(|e| Error::Device {
                device: options.device.to_string(),
                reason: e.to_string(),
            })?;
        }
        let session = match source {
            Source::Bytes(bytes) => builder.commit_from_memory(bytes),
            Source::Path(path) => builder.commit_from_file(path),
        }
        .map_err(|e| session_err(&e))?;
        let inputs = tensor_infos(session.inputs());
        let outputs = tensor_infos(session.outputs());
        Ok(Model {
            session,
            name: name.to_string(),
            provider,
            inputs,
            outputs,
        })
    }

    /// Loads a model file.
    pub fn from_file(path: &Path, options: &SessionOptions) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&path.display().to_string(), &bytes, options)
    }

    /// The model's declared inputs.
    pub fn inputs(&self) -> &[TensorInfo] {
        &self.inputs
    }

    /// The model's declared outputs.
    pub fn outputs(&self) -> &[TensorInfo] {
        &self.outputs
    }

    /// The execution provider the session runs on (`cpu`, `cuda`, `tensorrt`).
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// Runs the model on one float32 input of the given shape and returns a copy of its first output.
    pub fn run_f32(&mut self, shape: &[usize], data: &[f32]) -> Result<Output> {
        self.run_f32_with(shape, data, |out| Ok(out.to_owned()))
    }

    /// Runs the model on one float32 input of the given shape and hands its first output, still in ONNX
    /// Runtime's buffer, to `read`: nothing is copied (the input is borrowed too), which matters for models
    /// whose output is a large logits tensor that is only reduced (argmax) afterwards.
    pub fn run_f32_with<R>(
        &mut self,
        shape: &[usize],
        data: &[f32],
        read: impl FnOnce(OutputView<'_>) -> Result<R>,
    ) -> Result<R> {
        let err = |e: &dyn fmt::Display| Error::Session {
            model: self.name.clone(),
            reason: e.to_string(),
        };
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::Model {
                model: self.name.clone(),
                reason: format!("input shape {shape:?} does not match {} values", data.len()),
            });
        }
        let input = TensorRef::from_array_view((shape.to_vec(), data)).map_err(|e| err(&e))?;
        let outputs = self.session.run(ort::inputs![input]).map_err(|e| err(&e))?;
        read_first(&self.name, &outputs, read)
    }

    /// Runs the model on one int64 input of the given shape (token ids, for a tokenizer's decoder) and returns
    /// a copy of its first output.
    pub fn run_i64(&mut self, shape: &[usize], data: &[i64]) -> Result<Output> {
        let err = |e: &dyn fmt::Display| Error::Session {
            model: self.name.clone(),
            reason: e.to_string(),
        };
        if shape.iter().product::<usize>() != data.len() {
            return Err(Error::Model {
                model: self.name.clone(),
                reason: format!("input shape {shape:?} does not match {} values", data.len()),
            });
        }
        let input = TensorRef::from_array_view((shape.to_vec(), data)).map_err(|e| err(&e))?;
        let outputs = self.session.run(ort::inputs![input]).map_err(|e| err(&e))?;
        read_first(&self.name, &outputs, |out| Ok(out.to_owned()))
    }
}

/// Hands a run's first output, still in ONNX Runtime's buffer, to `read`.
fn read_first<R>(
    name: &str,
    outputs: &ort::session::SessionOutputs<'_>,
    read: impl FnOnce(OutputView<'_>) -> Result<R>,
) -> Result<R> {
    let err = |e: &dyn fmt::Display| Error::Session {
        model: name.to_string(),
        reason: e.to_string(),
    };
    let value = &outputs[0];
    let elem = match value.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => {
            return Err(Error::Model {
                model: name.to_string(),
                reason: format!("output 0 is {other}, expected a tensor"),
            })
        }
    };
    let to_usize = |s: &ort::value::Shape| s.iter().map(|&d| d.max(0) as usize).collect::<Vec<_>>();
    match elem {
        TensorElementType::Float32 => {
            let (s, d) = value.try_extract_tensor::<f32>().map_err(|e| err(&e))?;
            read(OutputView::F32 {
                shape: to_usize(s),
                data: d,
            })
        }
        TensorElementType::Int64 => {
            let (s, d) = value.try_extract_tensor::<i64>().map_err(|e| err(&e))?;
            read(OutputView::I64 {
                shape: to_usize(s),
                data: d,
            })
        }
        other => Err(Error::Model {
            model: name.to_string(),
            reason: format!("output 0 has element type {other}, expected f32 or i64"),
        }),
    }
}

impl OutputView<'_> {
    /// A copy of the values.
    pub fn to_owned(&self) -> Output {
        match self {
            OutputView::F32 { shape, data } => Output::F32 {
                shape: shape.clone(),
                data: data.to_vec(),
            },
            OutputView::I64 { shape, data } => Output::I64 {
                shape: shape.clone(),
                data: data.to_vec(),
            },
        }
    }
}

//! safetensors files of named tensors (weights, optimiser state): writing, and reading with every entry checked
//! (missing, misshaped) and named in the error.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

use crate::error::{torch_err, Result, TrainError};

/// Writes `named` (moved to the CPU) to `path`.
pub(crate) fn write(named: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = named
        .into_iter()
        .map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&named, path).map_err(torch_err(format!("cannot write {}", path.display())))
}

/// The tensors of one safetensors file.
pub(crate) struct Stored {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl Stored {
    /// Reads `path`; `what` names its content in the error.
    pub(crate) fn read(path: &Path, what: &str) -> Result<Stored> {
        let tensors = Tensor::read_safetensors(path)
            .map_err(|e| TrainError::Checkpoint {
                path: path.to_path_buf(),
                reason: format!("cannot read the {what}: {e}"),
            })?
            .into_iter()
            .collect();
        Ok(Stored {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// A checkpoint error about this file.
    pub(crate) fn bad(&self, reason: String) -> TrainError {
        TrainError::Checkpoint {
            path: self.path.clone(),
            reason,
        }
    }

    /// The entries' names.
    pub(crate) fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Entry `name`, or an error naming it.
    pub(crate) fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| self.bad(format!("tensor '{name}' is missing")))
    }

    /// Copies entry `name` into `dst` (same shape required), without recording gradients.
    pub(crate) fn copy_into(&self, name: &str, dst: &mut Tensor) -> Result<()> {
        let src = self.get(name)?;
        if src.size() != dst.size() {
            return Err(self.bad(format!(
                "tensor '{name}' has shape {:?}, expected {:?}",
                src.size(),
                dst.size()
            )));
        }
        tch::no_grad(|| dst.copy_(src));
        Ok(())
    }
}

/// Writes named parameters as float32 safetensors.
pub(crate) fn save_params(params: BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    write(
        params
            .into_iter()
            .map(|(n, t)| (n, t.to_kind(tch::Kind::Float)))
            .collect(),
        path,
    )
}

/// Loads every parameter from a safetensors file; a missing, extra or misshaped tensor is an error naming it.
pub(crate) fn load_params(params: BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let stored = Stored::read(path, "weights")?;
    if let Some(extra) = stored.names().find(|k| !params.contains_key(*k)) {
        return Err(stored.bad(format!("unexpected tensor '{extra}' (does the model config match?)")));
    }
    for (name, mut p) in params {
        stored.copy_into(&name, &mut p)?;
    }
    Ok(())
}

//! # imglish-python: the `imglish._native` extension module
//!
//! Thin pyo3 wrappers over the Rust crates, for the `imglish` Python package (`python/python/imglish`):
//!
//! - `Dataset`: a packed dataset (`imglish_pack::Dataset`): its index, statistics and `verify`.
//! - `train_config`: training options (JSON) to the exact configuration `imglish train` would use
//!   (`imglish_train::TrainOptions`), so that both front ends compute the same thing and resume each other.
//! - `Reader`: batches at positions of the endless training stream (epoch after epoch), assembled by the
//!   trainer's own code (`imglish_train::BatchMaker`): same views, masks, kinds and captions as `imglish train`
//!   for the same `(seed, epoch, sample_id)`.
//!
//! Errors become `imglish.ImglishError` with the Rust message (it names the shard, sample or file).

// pyo3's macros generate the unsafe FFI glue of the module; this crate itself has no unsafe code.
#![allow(unsafe_code)]

use std::path::PathBuf;
use std::sync::Mutex;

use imglish_pack::{EpochReader, Split};
use imglish_train::{BatchMaker, Beit3TrainConfig, MadeBatch, ModelKind, TrainConfig, TrainOptions};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyDict, PyList, PyTuple};

pyo3::create_exception!(
    _native,
    ImglishError,
    PyException,
    "An error from imglish's Rust core; the message names the shard, sample or file and the reason."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    ImglishError::new_err(e.to_string())
}

fn json<T: serde::Serialize>(value: &T) -> PyResult<String> {
    serde_json::to_string(value).map_err(err)
}

/// A packed dataset (a folder with `index.json` and shards).
#[pyclass(frozen, module = "imglish._native")]
struct Dataset {
    inner: imglish_pack::Dataset,
}

#[pymethods]
impl Dataset {
    #[new]
    fn new(path: PathBuf) -> PyResult<Self> {
        let inner = imglish_pack::Dataset::open(&path).map_err(err)?;
        Ok(Dataset { inner })
    }

    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }

    /// The dataset folder.
    #[getter]
    fn path(&self) -> String {
        self.inner.dir().display().to_string()
    }

    /// `index.json` as a JSON string.
    fn index_json(&self) -> PyResult<String> {
        json(self.inner.index())
    }

    /// The shards' columns as a JSON list of `[name, Arrow type]`.
    fn schema_json(&self) -> PyResult<String> {
        let info = self.inner.tokenizer();
        let schema = imglish_pack::shard_schema(info, self.inner.index().config.include_pixels);
        let fields: Vec<(String, String)> = schema
            .fields()
            .iter()
            .map(|f| (f.name().clone(), f.data_type().to_string()))
            .collect();
        json(&fields)
    }

    /// Statistics (counts by split and kind, lengths) as a JSON string; reads every shard.
    fn stats_json(&self, py: Python<'_>) -> PyResult<String> {
        let stats = py.detach(|| self.inner.stats()).map_err(err)?;
        json(&stats)
    }

    /// Checks every shard; the report as a JSON string (`problems` empty when all is well).
    fn verify_json(&self, py: Python<'_>) -> PyResult<String> {
        let report = py.detach(|| self.inner.verify());
        json(&report)
    }
}

/// The configuration `imglish train` would use for `options_json` (an `imglish_train::TrainOptions`; unknown
/// keys are refused) on the dataset at `dataset`, as JSON.
#[pyfunction]
fn train_config(dataset: PathBuf, options_json: &str) -> PyResult<String> {
    let options: TrainOptions =
        serde_json::from_str(options_json).map_err(|e| err(format!("training options: {e}")))?;
    let dataset = imglish_pack::Dataset::open(&dataset).map_err(err)?;
    match options.model {
        ModelKind::Beit => json(&options.beit_config(&dataset).map_err(err)?),
        ModelKind::Beit3 => json(&options.beit3_config(&dataset).map_err(err)?),
    }
}

/// Sets the shard cache of remote datasets (`s3://`, `gs://`, `az://`, `https://`) opened later in this process:
/// its folder, its size limit in bytes and the shards downloaded ahead; `None` keeps the default. The first call
/// wins.
#[pyfunction]
#[pyo3(signature = (cache_dir=None, cache_limit=None, prefetch=None))]
fn set_cache(cache_dir: Option<PathBuf>, cache_limit: Option<u64>, prefetch: Option<usize>) {
    let mut options = imglish_pack::RemoteOptions::default();
    if let Some(dir) = cache_dir {
        options.cache_dir = dir;
    }
    if let Some(limit) = cache_limit {
        options.cache_limit = limit;
    }
    if let Some(n) = prefetch {
        options.prefetch = n;
    }
    imglish_pack::set_remote_options(options);
}

/// The default training options as JSON.
#[pyfunction]
fn default_options() -> PyResult<String> {
    json(&TrainOptions::default())
}

enum Config {
    Beit(TrainConfig),
    Beit3(Beit3TrainConfig),
}

impl Config {
    fn maker(&self) -> BatchMaker {
        match self {
            Config::Beit(c) => BatchMaker::beit(c),
            Config::Beit3(c) => BatchMaker::beit3(c),
        }
    }

    fn stream(&self) -> (&imglish_train::StreamConfig, u64) {
        match self {
            Config::Beit(c) => (&c.stream, c.seed),
            Config::Beit3(c) => (&c.stream, c.seed),
        }
    }
}

/// Batches of the endless training stream of a run's configuration.
///
/// The stream is the split's epochs one after the other; its offset `o` is position `o % len` of epoch
/// `o // len`. `batch(offset, count, rank, world_size)` takes the stream's samples `offset .. offset + count`
/// that fall to `rank` (every `world_size`-th one, starting at `rank`), so that `world_size` ranks taking the
/// same `offset` and `count` together take each of those samples exactly once.
#[pyclass(frozen, module = "imglish._native")]
struct Reader {
    dataset: imglish_pack::Dataset,
    config: Config,
    split: Split,
    len: u64,
    epoch: Mutex<Option<EpochReader>>,
}

impl Reader {
    fn epoch_reader(&self, epoch: u64) -> PyResult<EpochReader> {
        let mut slot = self
            .epoch
            .lock()
            .map_err(|_| err("the reader's epoch cache is poisoned"))?;
        if let Some(r) = slot.as_ref().filter(|r| r.epoch() == epoch) {
            return Ok(r.clone());
        }
        let (stream, seed) = self.config.stream();
        let r = self
            .dataset
            .epoch_reader(Some(self.split), stream.shuffle, seed, epoch)
            .map_err(err)?;
        *slot = Some(r.clone());
        Ok(r)
    }

    /// The batches of `(offset, count)` requests, and `(epoch, position, sample id)` of every stream sample each
    /// read (used or skipped). Samples are fetched epoch by epoch for all requests together, so that a record
    /// batch shared by several requests is decoded once.
    fn make(&self, requests: &[(u64, u64)], rank: u64, world_size: u64) -> PyResult<Vec<(MadeBatch, Vec<[u64; 3]>)>> {
        // (request, epoch, position) of every sample, in request order.
        let mut wanted: Vec<(usize, u64, u64)> = Vec::new();
        for (r, &(offset, count)) in requests.iter().enumerate() {
            let mut i = rank;
            while i < count {
                let o = offset + i;
                wanted.push((r, o / self.len, o % self.len));
                i += world_size;
            }
        }
        let mut samples: Vec<Option<imglish_pack::Sample>> = wanted.iter().map(|_| None).collect();
        let mut epochs: Vec<u64> = wanted.iter().map(|w| w.1).collect();
        epochs.sort_unstable();
        epochs.dedup();
        for epoch in epochs {
            let idx: Vec<usize> = (0..wanted.len()).filter(|&k| wanted[k].1 == epoch).collect();
            let positions: Vec<u64> = idx.iter().map(|&k| wanted[k].2).collect();
            // `samples` returns them in the order asked (or fails).
            let got = self.epoch_reader(epoch)?.samples(&positions).map_err(err)?;
            for (&k, s) in idx.iter().zip(got) {
                samples[k] = Some(s);
            }
        }
        let mut out: Vec<(BatchMaker, Vec<[u64; 3]>)> =
            requests.iter().map(|_| (self.config.maker(), Vec::new())).collect();
        for ((r, epoch, _), s) in wanted.into_iter().zip(samples) {
            if let Some(s) = s {
                out[r].1.push([epoch, s.position, s.sample_id]);
                out[r].0.push(s, epoch);
            }
        }
        Ok(out.into_iter().map(|(mut m, read)| (m.take(), read)).collect())
    }

    fn to_dict<'py>(py: Python<'py>, made: &MadeBatch, read: Vec<[u64; 3]>) -> PyResult<Bound<'py, PyDict>> {
        let out = PyDict::new(py);
        for a in &made.arrays {
            let shape = PyTuple::new(py, &a.shape)?;
            let value = (a.dtype, shape, PyByteArray::new(py, &a.bytes));
            out.set_item(&a.name, value)?;
        }
        out.set_item("__len__", made.len)?;
        let skipped = PyList::empty(py);
        for (id, why) in &made.skipped {
            skipped.append((id, why))?;
        }
        out.set_item("__skipped__", skipped)?;
        let samples = PyList::empty(py);
        for [epoch, position, id] in read {
            samples.append((epoch, position, id))?;
        }
        out.set_item("__samples__", samples)?;
        Ok(out)
    }
}

#[pymethods]
impl Reader {
    /// A reader of `path` for a configuration from `train_config` (`model`: `"beit"` or `"beit3"`), over the
    /// `split` split (`"train"` or `"val"`).
    #[new]
    #[pyo3(signature = (path, model, config_json, split = "train"))]
    fn new(path: PathBuf, model: &str, config_json: &str, split: &str) -> PyResult<Self> {
        let config = match model {
            "beit" => Config::Beit(serde_json::from_str(config_json).map_err(|e| err(format!("BEiT config: {e}")))?),
            "beit3" => {
                Config::Beit3(serde_json::from_str(config_json).map_err(|e| err(format!("BEiT-3 config: {e}")))?)
            }
            other => return Err(err(format!("unknown model '{other}' (beit or beit3)"))),
        };
        let split = match split {
            "train" => Split::Train,
            "val" => Split::Val,
            other => return Err(err(format!("unknown split '{other}' (train or val)"))),
        };
        let dataset = imglish_pack::Dataset::open(&path).map_err(err)?;
        let len = dataset.index().counts.get(split);
        if len == 0 {
            return Err(err(format!("dataset {}: the {split} split is empty", path.display())));
        }
        Ok(Reader {
            dataset,
            config,
            split,
            len,
            epoch: Mutex::new(None),
        })
    }

    /// The validation batches `imglish train` evaluates on (up to `limit` val samples in dataset order, fixed
    /// masks), as a list of what `batch` returns (without `__samples__`).
    fn validation<'py>(&self, py: Python<'py>, batch_size: usize, limit: usize) -> PyResult<Bound<'py, PyList>> {
        let made = py
            .detach(|| self.config.maker().validation(&self.dataset, batch_size, limit))
            .map_err(err)?;
        let out = PyList::empty(py);
        for batch in &made {
            out.append(Self::to_dict(py, batch, Vec::new())?)?;
        }
        Ok(out)
    }

    /// Samples per epoch.
    #[getter]
    fn epoch_len(&self) -> u64 {
        self.len
    }

    /// The batch of `rank`'s share of stream offsets `offset .. offset + count`: a dict of name → (dtype,
    /// shape, bytearray), plus `"__len__"` (samples in the batch), `"__skipped__"` (list of (sample id, reason))
    /// and `"__samples__"` (list of (epoch, position, sample id) of every stream sample read for it).
    fn batch<'py>(
        &self,
        py: Python<'py>,
        offset: u64,
        count: u64,
        rank: u64,
        world_size: u64,
    ) -> PyResult<Bound<'py, PyDict>> {
        if world_size == 0 || rank >= world_size {
            return Err(err(format!("rank {rank} is not below world size {world_size}")));
        }
        let mut made = py.detach(|| self.make(&[(offset, count)], rank, world_size))?;
        let (batch, read) = made.pop().ok_or_else(|| err("no batch was made"))?;
        Self::to_dict(py, &batch, read)
    }

    /// Several batches at once (`requests`: list of (offset, count)), each record batch decoded once for all of
    /// them; a list of what `batch` returns.
    fn batches<'py>(
        &self,
        py: Python<'py>,
        requests: Vec<(u64, u64)>,
        rank: u64,
        world_size: u64,
    ) -> PyResult<Bound<'py, PyList>> {
        if world_size == 0 || rank >= world_size {
            return Err(err(format!("rank {rank} is not below world size {world_size}")));
        }
        let made = py.detach(|| self.make(&requests, rank, world_size))?;
        let out = PyList::empty(py);
        for (batch, read) in made {
            out.append(Self::to_dict(py, &batch, read)?)?;
        }
        Ok(out)
    }
}

/// The `imglish._native` module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("ImglishError", m.py().get_type::<ImglishError>())?;
    m.add_class::<Dataset>()?;
    m.add_class::<Reader>()?;
    m.add_function(wrap_pyfunction!(train_config, m)?)?;
    m.add_function(wrap_pyfunction!(default_options, m)?)?;
    m.add_function(wrap_pyfunction!(set_cache, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

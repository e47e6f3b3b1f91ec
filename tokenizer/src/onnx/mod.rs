//! Writing (and reading back) ONNX models from Rust.
//!
//! [`GraphBuilder`] assembles a graph from initializers, nodes and typed inputs/outputs and produces a
//! [`proto::ModelProto`]; [`encode`] serialises it to the bytes of a `.onnx` file. No Python and no `protoc`
//! are involved: the messages in [`proto`] are a hand-written subset of `onnx.proto` with the upstream field
//! numbers.

pub mod proto;

use prost::Message;
use proto::{
    attribute_type, AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto, OperatorSetIdProto,
    StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto, TypeProtoTensor, ValueInfoProto,
};

/// The IR version written by imglish (ONNX 1.13+; ONNX Runtime ≥ 1.14 reads it).
pub const IR_VERSION: i64 = 8;
/// The default-domain opset written by imglish.
pub const OPSET: i64 = 17;

/// One dimension of a declared input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    /// A fixed size.
    Fixed(i64),
    /// A symbolic (dynamic) size such as `"batch"`.
    Named(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}

impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Named(v.to_string())
    }
}

/// A node attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// `INT`
    Int(i64),
    /// `INTS`
    Ints(Vec<i64>),
    /// `FLOAT`
    Float(f32),
    /// `STRING`
    Str(String),
}

/// Builds an ONNX graph node by node.
#[derive(Debug, Default)]
pub struct GraphBuilder {
    graph: GraphProto,
    metadata: Vec<StringStringEntryProto>,
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Named(s) => DimensionValue::DimParam(s.clone()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        doc_string: String::new(),
    }
}

impl GraphBuilder {
    /// An empty graph called `name`.
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: name.to_string(),
                ..Default::default()
            },
            metadata: Vec::new(),
        }
    }

    /// Declares a graph input of element type `elem_type` (see [`proto::data_type`]).
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> &mut Self {
        self.graph.input.push(value_info(name, elem_type, dims));
        self
    }

    /// Declares a graph output.
    pub fn output(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> &mut Self {
        self.graph.output.push(value_info(name, elem_type, dims));
        self
    }

    /// Adds a float32 constant (stored little-endian in `raw_data`).
    ///
    /// # Panics
    /// If `data.len()` is not the product of `dims`.
    pub fn initializer_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> &mut Self {
        let n: i64 = dims.iter().product();
        assert_eq!(
            n as usize,
            data.len(),
            "initializer {name}: dims {dims:?} do not match {} values",
            data.len()
        );
        let mut raw = Vec::with_capacity(data.len() * 4);
        for v in data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: proto::data_type::FLOAT,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        });
        self
    }

    /// Adds an int64 constant (e.g. a shape for `Reshape`).
    pub fn initializer_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> &mut Self {
        let mut raw = Vec::with_capacity(data.len() * 8);
        for v in data {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        self.graph.initializer.push(TensorProto {
            dims: dims.to_vec(),
            data_type: proto::data_type::INT64,
            name: name.to_string(),
            raw_data: raw,
            ..Default::default()
        });
        self
    }

    /// Adds a node computing `outputs = op_type(inputs)` with the given attributes.
    pub fn node(&mut self, op_type: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, Attr)]) -> &mut Self {
        let attribute = attrs
            .iter()
            .map(|(name, a)| {
                let mut p = AttributeProto {
                    name: (*name).to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(v) => {
                        p.r#type = attribute_type::INT;
                        p.i = *v;
                    }
                    Attr::Ints(v) => {
                        p.r#type = attribute_type::INTS;
                        p.ints = v.clone();
                    }
                    Attr::Float(v) => {
                        p.r#type = attribute_type::FLOAT;
                        p.f = *v;
                    }
                    Attr::Str(v) => {
                        p.r#type = attribute_type::STRING;
                        p.s = v.as_bytes().to_vec();
                    }
                }
                p
            })
            .collect();
        let index = self.graph.node.len();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: outputs.iter().map(|s| (*s).to_string()).collect(),
            name: format!("{op_type}_{index}"),
            op_type: op_type.to_string(),
            attribute,
            ..Default::default()
        });
        self
    }

    /// Adds a `key = value` entry to the model's `metadata_props`.
    pub fn metadata(&mut self, key: &str, value: &str) -> &mut Self {
        self.metadata.push(StringStringEntryProto {
            key: key.to_string(),
            value: value.to_string(),
        });
        self
    }

    /// The finished model (IR [`IR_VERSION`], default-domain opset [`OPSET`]).
    pub fn finish(self) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "imglish".to_string(),
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            graph: Some(self.graph),
            metadata_props: self.metadata,
            ..Default::default()
        }
    }
}

/// Serialises a model to the bytes of an `.onnx` file (deterministic for a given model).
pub fn encode(model: &ModelProto) -> Vec<u8> {
    model.encode_to_vec()
}

/// Parses the bytes of an `.onnx` file (only the fields of [`proto`] are kept).
pub fn decode(bytes: &[u8]) -> Result<ModelProto, prost::DecodeError> {
    ModelProto::decode(bytes)
}

/// The external data files a model's initializers point to (`location` of tensors stored outside the `.onnx`
/// file, as `onnx.save_model(..., save_as_external_data=True)` and the PyTorch exporter write them for large
/// models), sorted and deduplicated.
pub fn external_data_files(model: &ModelProto) -> Vec<String> {
    let mut files: Vec<String> = model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| t.data_location == 1)
        .flat_map(|t| &t.external_data)
        .filter(|e| e.key == "location")
        .map(|e| e.value.clone())
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Moves the data of initializer `name` to `file` (a path relative to the model's folder, written by the caller
/// with the returned bytes): what exporters do with large weights.
///
/// # Panics
/// If the model has no initializer `name`.
pub fn externalize(model: &mut ModelProto, name: &str, file: &str) -> Vec<u8> {
    let t = model
        .graph
        .iter_mut()
        .flat_map(|g| g.initializer.iter_mut())
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no initializer {name}"));
    let data = std::mem::take(&mut t.raw_data);
    let entry = |k: &str, v: String| proto::StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    t.external_data = vec![
        entry("location", file.into()),
        entry("offset", "0".into()),
        entry("length", data.len().to_string()),
    ];
    t.data_location = 1;
    data
}

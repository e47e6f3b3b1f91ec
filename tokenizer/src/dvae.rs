//! ONNX export of a dVAE trained by `imglish tokenizer train-dvae` (`imglish_train::dvae`), through the
//! project's own ONNX writer: the encoder (normalised pixels → logits → ArgMax tokens) as the tokenizer, and the
//! decoder (tokens → pixels in [0, 1]) as a second model beside it (`NAME.decoder.onnx`, named in the card).
//! The graphs follow the parameter names and layout documented in `imglish_train::dvae`.

use std::collections::BTreeMap;

use imglish_ingest::Filter;

use crate::card::{sha256_hex, Card, DecoderRef, Normalization, OutputKind, CARD_VERSION};
use crate::error::{Error, Result};
use crate::onnx::{self, proto::data_type, Attr, Dim, GraphBuilder};

/// A trained dVAE's weights and the sizes its graph needs.
#[derive(Debug, Clone)]
pub struct DvaeWeights {
    /// Square input size S.
    pub input_size: u32,
    /// Grid side G (S / G = 2^levels).
    pub grid: u32,
    /// Codes K.
    pub codebook: u32,
    /// Residual blocks per level.
    pub blocks: u32,
    /// `Some(eps)` when the decoder predicts logit-Laplace parameters (its first three channels are the
    /// locations); `None` for MSE pixels.
    pub logit_laplace_eps: Option<f32>,
    /// Every parameter: name → (shape, float32 values).
    pub tensors: BTreeMap<String, (Vec<i64>, Vec<f32>)>,
}

fn bad(reason: String) -> Error {
    Error::Model {
        model: "dvae export".into(),
        reason,
    }
}

/// Builds a graph from the weights, adding each used tensor as an initializer once.
struct Writer<'a> {
    w: &'a DvaeWeights,
    g: GraphBuilder,
    next: usize,
}

impl<'a> Writer<'a> {
    fn tensor(&self, name: &str) -> Result<&'a (Vec<i64>, Vec<f32>)> {
        let t = self
            .w
            .tensors
            .get(name)
            .ok_or_else(|| bad(format!("tensor '{name}' is missing from the checkpoint")))?;
        if t.0.iter().any(|&d| d <= 0) || t.0.iter().product::<i64>() as usize != t.1.len() {
            return Err(bad(format!(
                "tensor '{name}' has shape {:?} and {} values",
                t.0,
                t.1.len()
            )));
        }
        Ok(t)
    }

    /// A square convolution's weight `[out, in, k, k]` (transposed: `[in, out, k, k]`) and its bias `[out]`,
    /// checked.
    fn conv_weights(&self, layer: &str, transposed: bool) -> Result<(&'a [i64], &'a [f32], &'a [f32])> {
        let (ws, wv) = self.tensor(&format!("{layer}.weight"))?;
        let (bs, bv) = self.tensor(&format!("{layer}.bias"))?;
        let outputs = if transposed { ws.get(1) } else { ws.first() };
        if ws.len() != 4 || ws[2] != ws[3] || bs.len() != 1 || outputs != Some(&bs[0]) {
            return Err(bad(format!(
                "{layer}: weight {ws:?} and bias {bs:?} are not a square {} convolution's",
                if transposed { "transposed" } else { "2-d" }
            )));
        }
        Ok((ws, wv, bv))
    }

    fn fresh(&mut self, what: &str) -> String {
        self.next += 1;
        format!("{what}_{}", self.next)
    }

    /// `x` through the convolution (or transposed convolution) `layer` with `kernel`, `stride` and `pad`.
    fn conv(&mut self, op: &str, layer: &str, x: &str, stride: i64, pad: i64) -> Result<String> {
        let (ws, wv, bv) = self.conv_weights(layer, op == "ConvTranspose")?;
        let (wn, bn) = (format!("{layer}.weight"), format!("{layer}.bias"));
        self.g
            .initializer_f32(&wn, ws, wv)
            .initializer_f32(&bn, &[bv.len() as i64], bv);
        let y = self.fresh(layer);
        let k = ws[2];
        self.g.node(
            op,
            &[x, &wn, &bn],
            &[&y],
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![stride, stride])),
                ("pads", Attr::Ints(vec![pad; 4])),
            ],
        );
        Ok(y)
    }

    fn unary(&mut self, op: &str, x: &str) -> String {
        let y = self.fresh(&op.to_lowercase());
        self.g.node(op, &[x], &[&y], &[]);
        y
    }

    fn res_block(&mut self, prefix: &str, x: &str) -> Result<String> {
        let r = self.unary("Relu", x);
        let c1 = self.conv("Conv", &format!("{prefix}.conv1"), &r, 1, 1)?;
        let r2 = self.unary("Relu", &c1);
        let c2 = self.conv("Conv", &format!("{prefix}.conv2"), &r2, 1, 0)?;
        let y = self.fresh("add");
        self.g.node("Add", &[x, &c2], &[&y], &[]);
        Ok(y)
    }

    fn blocks(&mut self, side: &str, level: u32, mut h: String) -> Result<String> {
        for b in 0..self.w.blocks {
            h = self.res_block(&format!("{side}.level{level}.block{b}"), &h)?;
        }
        Ok(h)
    }
}

impl DvaeWeights {
    fn levels(&self) -> Result<u32> {
        let factor = self.input_size.checked_div(self.grid).unwrap_or(0);
        if factor < 2 || !factor.is_power_of_two() || self.grid * factor != self.input_size {
            return Err(Error::Model {
                model: "dvae export".into(),
                reason: format!(
                    "input size {} over grid {} is not a power of two",
                    self.input_size, self.grid
                ),
            });
        }
        Ok(factor.trailing_zeros())
    }

    /// `(K, D, values)` of a VQ model's codebook (`quant.codebook`), `None` for a Gumbel model.
    fn vq_codebook(&self) -> Result<Option<(i64, i64, &[f32])>> {
        let Some((shape, values)) = self.tensors.get("quant.codebook") else {
            return Ok(None);
        };
        match shape[..] {
            [k, d] if k == i64::from(self.codebook) && d > 0 && values.len() == (k * d) as usize => {
                Ok(Some((k, d, values)))
            }
            _ => Err(bad(format!(
                "quant.codebook has shape {shape:?} and {} values, expected [{}, D]",
                values.len(),
                self.codebook
            ))),
        }
    }

    fn writer(&self, name: &str) -> Writer<'_> {
        Writer {
            w: self,
            g: GraphBuilder::new(name),
            next: 0,
        }
    }

    /// The encoder: `pixels` `[B, 3, S, S]` (x = 2·u8/255 - 1) → `tokens` `[B, G, G]` int64, the argmax of the
    /// logits (the first maximum on ties, as libtorch's argmax).
    pub fn encoder_onnx(&self) -> Result<Vec<u8>> {
        let levels = self.levels()?;
        let (s, g) = (i64::from(self.input_size), i64::from(self.grid));
        let mut w = self.writer("imglish_dvae_encoder");
        w.g.input(
            "pixels",
            data_type::FLOAT,
            &[Dim::from("batch"), Dim::Fixed(3), Dim::Fixed(s), Dim::Fixed(s)],
        )
        .output(
            "tokens",
            data_type::INT64,
            &[Dim::from("batch"), Dim::Fixed(g), Dim::Fixed(g)],
        );
        let mut h = w.conv("Conv", "enc.stem", "pixels", 1, 1)?;
        for l in 1..=levels {
            let r = w.unary("Relu", &h);
            h = w.conv("Conv", &format!("enc.down{l}"), &r, 2, 0)?;
            h = w.blocks("enc", l, h)?;
        }
        let r = w.unary("Relu", &h);
        let logits = match self.vq_codebook()? {
            None => w.conv("Conv", "enc.logits", &r, 1, 0)?,
            Some((k, d, codebook)) => {
                // The nearest code vector: argmax_k 2 z·c_k - |c_k|², one 1x1 convolution over the cell's vector.
                let z = w.conv("Conv", "enc.proj", &r, 1, 0)?;
                let weight: Vec<f32> = codebook.iter().map(|v| 2.0 * v).collect();
                let bias: Vec<f32> = codebook
                    .chunks_exact(d as usize)
                    .map(|c| -c.iter().map(|v| v * v).sum::<f32>())
                    .collect();
                w.g.initializer_f32("quant.scores.weight", &[k, d, 1, 1], &weight)
                    .initializer_f32("quant.scores.bias", &[k], &bias)
                    .node(
                        "Conv",
                        &[&z, "quant.scores.weight", "quant.scores.bias"],
                        &["scores"],
                        &[("kernel_shape", Attr::Ints(vec![1, 1]))],
                    );
                "scores".to_string()
            }
        };
        w.g.node(
            "ArgMax",
            &[&logits],
            &["tokens"],
            &[("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
        )
        .metadata("imglish.tokenizer", "dvae");
        Ok(onnx::encode(&w.g.finish()))
    }

    /// The decoder: `tokens` `[B, G, G]` int64 → `pixels` `[B, 3, S, S]` in [0, 1].
    pub fn decoder_onnx(&self) -> Result<Vec<u8>> {
        let levels = self.levels()?;
        let (s, g, k) = (
            i64::from(self.input_size),
            i64::from(self.grid),
            i64::from(self.codebook),
        );
        let mut w = self.writer("imglish_dvae_decoder");
        w.g.input(
            "tokens",
            data_type::INT64,
            &[Dim::from("batch"), Dim::Fixed(g), Dim::Fixed(g)],
        )
        .output(
            "pixels",
            data_type::FLOAT,
            &[Dim::from("batch"), Dim::Fixed(3), Dim::Fixed(s), Dim::Fixed(s)],
        );
        // The decoder's 1x1 input convolution of a code's one-hot (Gumbel) or vector (VQ) is a lookup in a table
        // [K, C] (plus the bias): its weight's columns, or the code vectors times its weight.
        let (ws, wv, bv) = w.conv_weights("dec.embed", false)?;
        let (c, inputs) = (ws[0] as usize, ws[1] as usize);
        let vq = self.vq_codebook()?;
        let want = vq.map_or(k, |(_, d, _)| d) as usize;
        if inputs != want || ws[2] != 1 {
            return Err(bad(format!(
                "dec.embed.weight has shape {ws:?}, expected [C, {want}, 1, 1]"
            )));
        }
        let table: Vec<f32> = match vq {
            None => (0..k as usize)
                .flat_map(|code| (0..c).map(move |ch| wv[ch * inputs + code]))
                .collect(),
            Some((_, _, codebook)) => codebook
                .chunks_exact(inputs)
                .flat_map(|vector| {
                    (0..c).map(move |ch| {
                        let row = &wv[ch * inputs..(ch + 1) * inputs];
                        row.iter().zip(vector).map(|(a, b)| a * b).sum::<f32>()
                    })
                })
                .collect(),
        };
        let c = c as i64;
        w.g.initializer_f32("dec.embed.table", &[k, c], &table)
            .initializer_f32("dec.embed.bias", &[c], bv)
            .node(
                "Gather",
                &["dec.embed.table", "tokens"],
                &["embedded"],
                &[("axis", Attr::Int(0))],
            )
            .node("Add", &["embedded", "dec.embed.bias"], &["embedded_b"], &[])
            .node(
                "Transpose",
                &["embedded_b"],
                &["codes"],
                &[("perm", Attr::Ints(vec![0, 3, 1, 2]))],
            );
        let mut h = "codes".to_string();
        for l in (1..=levels).rev() {
            h = w.blocks("dec", l, h)?;
            let r = w.unary("Relu", &h);
            h = w.conv("ConvTranspose", &format!("dec.up{l}"), &r, 2, 0)?;
        }
        let r = w.unary("Relu", &h);
        // Only the first three output channels are pixels (logit-Laplace locations, or the MSE means).
        let (os, ov, ob) = w.conv_weights("dec.out", false)?;
        if os[0] < 3 {
            return Err(bad(format!(
                "dec.out.weight has shape {os:?}: fewer than 3 output channels"
            )));
        }
        let per = (os[1] * os[2] * os[3]) as usize;
        w.g.initializer_f32("dec.out.weight3", &[3, os[1], os[2], os[3]], &ov[..3 * per])
            .initializer_f32("dec.out.bias3", &[3], &ob[..3])
            .node(
                "Conv",
                &[&r, "dec.out.weight3", "dec.out.bias3"],
                &["out"],
                &[
                    ("kernel_shape", Attr::Ints(vec![os[2], os[3]])),
                    ("pads", Attr::Ints(vec![1; 4])),
                ],
            )
            .initializer_f32("zero", &[], &[0.0])
            .initializer_f32("one", &[], &[1.0]);
        let mean = match self.logit_laplace_eps {
            None => "out".to_string(),
            Some(eps) => {
                w.g.initializer_f32("eps", &[], &[eps])
                    .initializer_f32("span", &[], &[1.0 - 2.0 * eps])
                    .node("Sigmoid", &["out"], &["sig"], &[])
                    .node("Sub", &["sig", "eps"], &["shifted"], &[])
                    .node("Div", &["shifted", "span"], &["unmapped"], &[]);
                "unmapped".to_string()
            }
        };
        w.g.node("Clip", &[&mean, "zero", "one"], &["pixels"], &[])
            .metadata("imglish.decoder", "dvae");
        Ok(onnx::encode(&w.g.finish()))
    }

    /// The tokenizer card of the encoder `encoder` with its decoder `decoder` stored as `decoder_file` beside it.
    pub fn card(
        &self,
        name: &str,
        encoder: &[u8],
        decoder: &[u8],
        decoder_file: &str,
        stats: serde_json::Value,
    ) -> Card {
        Card {
            card_version: CARD_VERSION,
            name: name.into(),
            input_size: self.input_size,
            layout: "NCHW".into(),
            normalization: Normalization::MinusOneOne,
            resize_filter: Filter::Bicubic,
            output: OutputKind::Indices,
            grid: [self.grid, self.grid],
            vocab_size: self.codebook,
            onnx_sha256: sha256_hex(encoder),
            external_data: Default::default(),
            decoder: Some(DecoderRef {
                file: decoder_file.into(),
                sha256: sha256_hex(decoder),
            }),
            stats: Some(stats),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(tensors: &[(&str, Vec<i64>, usize)]) -> DvaeWeights {
        DvaeWeights {
            input_size: 8,
            grid: 4,
            codebook: 4,
            blocks: 0,
            logit_laplace_eps: None,
            tensors: tensors
                .iter()
                .map(|(n, s, len)| ((*n).to_string(), (s.clone(), vec![0.0; *len])))
                .collect(),
        }
    }

    #[test]
    fn malformed_weights_are_errors_naming_the_tensor() {
        let err = |w: DvaeWeights| w.encoder_onnx().expect_err("an error").to_string();
        assert!(err(weights(&[])).contains("tensor 'enc.stem.weight' is missing from the checkpoint"));
        let flat = weights(&[("enc.stem.weight", vec![2, 27], 54), ("enc.stem.bias", vec![2], 2)]);
        assert!(err(flat).contains("enc.stem: weight [2, 27] and bias [2] are not a square 2-d convolution's"));
        let short = weights(&[("enc.stem.weight", vec![2, 3, 3, 3], 5)]);
        assert!(err(short).contains("tensor 'enc.stem.weight' has shape [2, 3, 3, 3] and 5 values"));
        let mut odd = weights(&[]);
        odd.input_size = 12;
        assert!(err(odd).contains("input size 12 over grid 4 is not a power of two"));
    }
}

//! A small convolutional model written from Rust (prost subset of onnx.proto, seeded weights) runs through the
//! shared ONNX Runtime environment and matches a plain-Rust computation of the same graph.

use imglish_tokenizer::onnx::{self, proto::data_type::FLOAT, Attr, Dim, GraphBuilder};
use imglish_tokenizer::{Model, Output, SessionOptions};

/// SplitMix64: deterministic weights without a `rand` dependency.
struct Rng(u64);

impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_f32()).collect()
    }
}

const CIN: usize = 3;
const COUT: usize = 4;
const K: usize = 3;

/// y = MaxPool2x2(Relu(Conv3x3(x, w, b, pad 1))) + Conv1x1(MaxPool2x2(x), w2)
fn build(w: &[f32], b: &[f32], w2: &[f32]) -> Vec<u8> {
    let mut g = GraphBuilder::new("tiny_cnn");
    g.input(
        "x",
        FLOAT,
        &[
            Dim::from("batch"),
            Dim::from(CIN as i64),
            Dim::from("h"),
            Dim::from("w"),
        ],
    )
    .output(
        "y",
        FLOAT,
        &[
            Dim::from("batch"),
            Dim::from(COUT as i64),
            Dim::from("h2"),
            Dim::from("w2"),
        ],
    )
    .initializer_f32("w", &[COUT as i64, CIN as i64, K as i64, K as i64], w)
    .initializer_f32("b", &[COUT as i64], b)
    .initializer_f32("w2", &[COUT as i64, CIN as i64, 1, 1], w2)
    .node(
        "Conv",
        &["x", "w", "b"],
        &["c"],
        &[
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ],
    )
    .node("Relu", &["c"], &["r"], &[])
    .node(
        "MaxPool",
        &["r"],
        &["p"],
        &[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    )
    .node(
        "MaxPool",
        &["x"],
        &["px"],
        &[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    )
    .node(
        "Conv",
        &["px", "w2"],
        &["q"],
        &[("kernel_shape", Attr::Ints(vec![1, 1]))],
    )
    .node("Add", &["p", "q"], &["y"], &[]);
    onnx::encode(&g.finish())
}

/// Conv with `same` padding; `dims` = (batch, input channels, height, width).
fn conv(x: &[f32], dims: (usize, usize, usize, usize), w: &[f32], b: Option<&[f32]>, k: usize) -> Vec<f32> {
    let (n, cin, h, wd) = dims;
    let pad = k / 2;
    let mut out = vec![0.0f32; n * COUT * h * wd];
    for bi in 0..n {
        for co in 0..COUT {
            for y in 0..h {
                for xx in 0..wd {
                    let mut acc = b.map_or(0.0, |b| b[co]);
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = y as isize + ky as isize - pad as isize;
                                let ix = xx as isize + kx as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xv = x[((bi * cin + ci) * h + iy as usize) * wd + ix as usize];
                                acc += xv * w[((co * cin + ci) * k + ky) * k + kx];
                            }
                        }
                    }
                    out[((bi * COUT + co) * h + y) * wd + xx] = acc;
                }
            }
        }
    }
    out
}

fn maxpool2(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0.0f32; n * c * h2 * w2];
    for p in 0..n * c {
        for y in 0..h2 {
            for xx in 0..w2 {
                let at = |dy: usize, dx: usize| x[(p * h + 2 * y + dy) * w + 2 * xx + dx];
                out[(p * h2 + y) * w2 + xx] = at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1));
            }
        }
    }
    out
}

#[test]
fn generated_cnn_matches_plain_rust() {
    let mut rng = Rng(42);
    let w = rng.vec(COUT * CIN * K * K);
    let b = rng.vec(COUT);
    let w2 = rng.vec(COUT * CIN);
    let bytes = build(&w, &b, &w2);

    let (n, h, wd) = (2, 10, 14);
    let x = rng.vec(n * CIN * h * wd);

    let mut model = Model::from_bytes("tiny_cnn", &bytes, &SessionOptions::default()).expect("load model");
    assert_eq!(model.provider(), "cpu");
    assert_eq!(model.inputs()[0].name, "x");
    assert_eq!(model.inputs()[0].shape, vec![-1, 3, -1, -1]);
    let out = model.run_f32(&[n, CIN, h, wd], &x).expect("run");

    let c = conv(&x, (n, CIN, h, wd), &w, Some(&b), K);
    let r: Vec<f32> = c.iter().map(|v| v.max(0.0)).collect();
    let p = maxpool2(&r, n, COUT, h, wd);
    let px = maxpool2(&x, n, CIN, h, wd);
    let q = conv(&px, (n, CIN, h / 2, wd / 2), &w2, None, 1);
    let expected: Vec<f32> = p.iter().zip(&q).map(|(a, b)| a + b).collect();

    let Output::F32 { shape, data } = out else {
        panic!("expected a float output, got {out:?}")
    };
    assert_eq!(shape, vec![n, COUT, h / 2, wd / 2]);
    let max_err = data
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(max_err < 1e-5, "max abs error {max_err}");
}

#[test]
fn argmin_output_is_int64_and_environment_is_shared() {
    // A second model in the same process reuses the one environment.
    let mut g = GraphBuilder::new("argmin");
    g.input("x", FLOAT, &[Dim::from("n"), Dim::from(5)])
        .output("i", onnx::proto::data_type::INT64, &[Dim::from("n")])
        .node(
            "ArgMin",
            &["x"],
            &["i"],
            &[("axis", Attr::Int(1)), ("keepdims", Attr::Int(0))],
        );
    let bytes = onnx::encode(&g.finish());
    let mut model = Model::from_bytes("argmin", &bytes, &SessionOptions::default()).expect("load");
    let x = [3.0, 1.0, 2.0, 5.0, 4.0, /* */ 0.0, 9.0, -1.0, 2.0, 2.0];
    let out = model.run_f32(&[2, 5], &x).expect("run");
    assert_eq!(
        out,
        Output::I64 {
            shape: vec![2],
            data: vec![1, 2]
        }
    );
    assert!(
        imglish_tokenizer::runtime()
            .expect("runtime")
            .library()
            .ends_with("libonnxruntime.so.1.31.1")
            || std::env::var_os("ORT_DYLIB_PATH").is_some()
    );
}

#[test]
fn encoded_models_round_trip_through_prost() {
    let mut g = GraphBuilder::new("rt");
    g.input("x", FLOAT, &[Dim::from(1)])
        .output("y", FLOAT, &[Dim::from(1)])
        .metadata("card", "{}");
    g.node("Relu", &["x"], &["y"], &[]);
    let model = g.finish();
    let bytes = onnx::encode(&model);
    assert_eq!(onnx::decode(&bytes).expect("decode"), model);
    assert_eq!(onnx::encode(&onnx::decode(&bytes).expect("decode")), bytes);
}

#[test]
fn bad_model_bytes_are_a_session_error_naming_the_model() {
    let err = Model::from_bytes("garbage.onnx", b"not a model", &SessionOptions::default()).expect_err("must fail");
    let msg = err.to_string();
    assert!(msg.starts_with("garbage.onnx: ONNX Runtime: "), "{msg}");
}

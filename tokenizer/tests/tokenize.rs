//! The tokenizer stage end to end on a small demo corpus: card validation, a fitted k-means tokenizer checked
//! against plain Rust through ONNX Runtime, a DALL-E-shaped logits model, text tokens, and the tokenize stage's
//! worker split and resume.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imglish_ingest::{
    center_view, decode_rgb, ingest, read_image_bytes, render_view, write_demo_corpus, DecodeOptions, DemoConfig,
    Filter, IngestConfig, LabelMode, Manifest, Resizer,
};
use imglish_tokenizer::onnx::{self, proto::data_type::FLOAT, Attr, Dim, GraphBuilder};
use imglish_tokenizer::{
    fit_codebook, fit_text_tokenizer, sha256_hex, tokenize, Card, Device, FitConfig, Normalization, OutputKind,
    PatchFeatures, SessionOptions, TextModel, TextTokenizer, TokenizeConfig, VisualTokenizer,
};

/// A demo corpus and its manifest, shared by the tests of this file.
fn manifest() -> &'static PathBuf {
    static M: OnceLock<PathBuf> = OnceLock::new();
    M.get_or_init(|| {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("tok-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let demo = root.join("demo");
        let cfg = DemoConfig::default().try_with_images(36).expect("cfg").with_seed(11);
        write_demo_corpus(&demo, &cfg, &|_| {}).expect("demo");
        let m = root.join("manifest");
        let config = IngestConfig::try_new(vec![demo.join("images")])
            .expect("cfg")
            .with_captions(vec![demo.join("captions/captions.jsonl")])
            .with_labels(LabelMode::FromFolders)
            .try_with_val_fraction(0.2)
            .expect("f");
        ingest(&config, &m, &|_| {}).expect("ingest");
        m
    })
}

fn small_fit() -> FitConfig {
    FitConfig {
        patch: 8,
        input_size: 32,
        codebook: 24,
        iterations: 6,
        max_patches: 20_000,
        ..FitConfig::default()
    }
}

/// A tokenizer fitted with `config`, written to `dir`: (model path, codebook).
fn fitted_with(dir: &Path, config: &FitConfig) -> (PathBuf, imglish_tokenizer::Codebook) {
    let (codebook, report) = fit_codebook(manifest(), config, &|_| {}).expect("fit");
    assert!(report.usage > 0.5, "{report:?}");
    assert!(report.quant_error < report.quant_error_one_code, "{report:?}");
    let bytes = codebook.to_onnx();
    let card = codebook.card(&bytes, &report);
    let path = dir.join("km.onnx");
    std::fs::write(&path, &bytes).expect("write");
    std::fs::write(Card::path_for(&path), serde_json::to_vec(&card).expect("json")).expect("write card");
    (path, codebook)
}

fn fitted(dir: &Path) -> (PathBuf, imglish_tokenizer::Codebook) {
    fitted_with(dir, &small_fit())
}

fn center_pixels(size: u32, filter: Filter) -> Vec<Vec<u8>> {
    let m = Manifest::open(manifest()).expect("manifest");
    let mut r = Resizer::new();
    m.rows
        .iter()
        .take(6)
        .map(|row| {
            let d = decode_rgb(&read_image_bytes(row).expect("bytes"), &DecodeOptions::default(), 1.0).expect("decode");
            let v = center_view(d.source_width, d.source_height);
            render_view(&d, &v, size, filter, &mut r).into_raw()
        })
        .collect()
}

#[test]
fn fitted_kmeans_tokenizers_agree_with_plain_rust_on_every_patch() {
    for features in [PatchFeatures::Rgb, PatchFeatures::Centred, PatchFeatures::Structure] {
        let dir = tempfile::tempdir().expect("tmp");
        let (path, codebook) = fitted_with(
            dir.path(),
            &FitConfig {
                features,
                ..small_fit()
            },
        );
        assert_eq!(codebook.len(), 24, "{features:?}: --codebook is the whole vocabulary");
        let mut vt = VisualTokenizer::load(&path, &SessionOptions::default()).expect("load");
        assert_eq!(vt.card().vocab_size, 24);
        let images = center_pixels(32, Filter::Bicubic);
        let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
        let tokens = vt.tokenize(&refs).expect("tokenize");
        let (mut checked, mut codes) = (0, std::collections::BTreeSet::new());
        for (img, toks) in images.iter().zip(&tokens) {
            let chw = vt.preprocess(&[img]);
            let patches = codebook.patches(&chw);
            let expected = codebook.nearest(patches.view());
            assert_eq!(toks.len(), 16);
            for (p, (&t, (e, _))) in toks.iter().zip(&expected).enumerate() {
                if t != *e {
                    // Only a float tie may differ: both codes must score the same to rounding.
                    let x = patches.row(p);
                    let (st, se) = (codebook.score(x, t), codebook.score(x, *e));
                    assert!(
                        (st - se).abs() <= 1e-4 * (1.0 + se.abs()),
                        "{features:?} patch {p}: ORT {t} ({st}) vs Rust {e} ({se})"
                    );
                }
                codes.insert(t);
                checked += 1;
            }
        }
        assert_eq!(checked, 6 * 16);
        assert!(codes.len() > 4, "{features:?}: only codes {codes:?}");
        if features == PatchFeatures::Structure {
            assert!(codes.contains(&23), "structure: no flat patch among {codes:?}");
        }
    }
}

#[test]
fn structure_codes_ignore_colour_and_flat_patches_get_the_last_code() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = FitConfig {
        features: PatchFeatures::Structure,
        ..small_fit()
    };
    let (path, _) = fitted_with(dir.path(), &config);
    let mut vt = VisualTokenizer::load(&path, &SessionOptions::default()).expect("load");
    // A disc on a plain background, drawn in two colour pairs with the same luma order (dark on light).
    let disc = |fg: [u8; 3], bg: [u8; 3]| -> Vec<u8> {
        let mut out = Vec::with_capacity(32 * 32 * 3);
        for y in 0..32 {
            for x in 0..32 {
                let (dx, dy) = (x as f32 - 15.5, y as f32 - 15.5);
                out.extend(if dx * dx + dy * dy < 121.0 { fg } else { bg });
            }
        }
        out
    };
    let a = disc([20, 20, 160], [250, 240, 120]);
    let b = disc([120, 10, 10], [200, 255, 230]);
    let flat = vec![77u8; 32 * 32 * 3];
    let tokens = vt.tokenize(&[&a, &b, &flat]).expect("tokenize");
    assert_eq!(tokens[0], tokens[1], "the same shape in other colours");
    assert!(
        tokens[2].iter().all(|&t| t == 23),
        "a uniform image is all flat: {:?}",
        tokens[2]
    );
    assert!(
        tokens[0].iter().any(|&t| t != 23),
        "the disc's edges are not flat: {:?}",
        tokens[0]
    );
    // The RGB codebook sees the colours instead.
    let rgb_dir = tempfile::tempdir().expect("tmp");
    let (rgb_path, _) = fitted_with(rgb_dir.path(), &small_fit());
    let mut rgb = VisualTokenizer::load(&rgb_path, &SessionOptions::default()).expect("load");
    let t = rgb.tokenize(&[&a, &b]).expect("tokenize");
    assert_ne!(t[0], t[1]);
}

#[test]
fn fitting_is_deterministic_whatever_the_threads() {
    let run = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        pool.install(|| {
            let (c, _) = fit_codebook(manifest(), &small_fit(), &|_| {}).expect("fit");
            c.to_onnx()
        })
    };
    assert_eq!(sha256_hex(&run(1)), sha256_hex(&run(2)));
}

#[test]
fn card_mismatches_have_clear_messages() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _) = fitted(dir.path());
    let bytes = std::fs::read(&path).expect("read");
    let card: Card = serde_json::from_slice(&std::fs::read(Card::path_for(&path)).expect("card")).expect("json");
    let opts = SessionOptions::default();
    let err = |c: Card| {
        VisualTokenizer::from_parts(Path::new("km.onnx"), &bytes, c, &opts)
            .expect_err("mismatch")
            .to_string()
    };
    let hash = card.onnx_sha256.clone();

    let mut c = card.clone();
    c.onnx_sha256 = "00".repeat(32);
    assert_eq!(
        err(c),
        format!("km.onnx: sha256 {hash} does not match the card's {}", "00".repeat(32))
    );
    let mut c = card.clone();
    c.vocab_size = 70_000;
    assert_eq!(err(c), "km.onnx: vocab size 70000 does not fit u16 tokens (1..=65536)");
    let mut c = card.clone();
    c.input_size = 64;
    assert_eq!(
        err(c),
        "km.onnx: input pixels has shape [-1, 3, 32, 32], the card says [B, 3, 64, 64]"
    );
    let mut c = card.clone();
    c.grid = [8, 8];
    assert_eq!(
        err(c),
        "km.onnx: output tokens has shape [-1, 4, 4], the card says [B, 8, 8]"
    );
    let mut c = card.clone();
    c.output = OutputKind::Logits;
    assert_eq!(err(c), "km.onnx: output tokens has rank 3, logits must be [B, V, h, w]");

    // A mistyped model path names the model, not its card.
    let missing = dir.path().join("nope.onnx");
    let e = VisualTokenizer::load(&missing, &opts).expect_err("missing").to_string();
    assert_eq!(
        e,
        format!("{}: No such file or directory (os error 2)", missing.display())
    );
    // A model without its card names the card and why it must be there.
    let lonely = dir.path().join("lonely.onnx");
    std::fs::write(&lonely, b"not used").expect("write");
    let e = VisualTokenizer::load(&lonely, &opts).expect_err("no card").to_string();
    assert!(
        e.starts_with(&format!(
            "{}: cannot read the tokenizer card that must sit beside {} (",
            Card::path_for(&lonely).display(),
            lonely.display()
        )),
        "{e}"
    );
}

/// A DALL-E-shaped encoder (Conv, ReLU, MaxPool, Add; logits over V codes) with seeded weights.
fn dalle_like(v: usize) -> (Vec<u8>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut state = 99u64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = imglish_ingest::mix64(state.wrapping_add(0x9E37_79B9_7F4A_7C15));
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.6
            })
            .collect()
    };
    let (w1, b1, w2) = (rnd(8 * 3 * 9), rnd(8), rnd(v * 8));
    let mut g = GraphBuilder::new("dalle_like");
    g.input(
        "x",
        FLOAT,
        &[Dim::from("b"), Dim::from(3), Dim::from(16), Dim::from(16)],
    )
    .output(
        "logits",
        FLOAT,
        &[Dim::from("b"), Dim::from(v as i64), Dim::from(8), Dim::from(8)],
    )
    .initializer_f32("w1", &[8, 3, 3, 3], &w1)
    .initializer_f32("b1", &[8], &b1)
    .initializer_f32("w2", &[v as i64, 8, 1, 1], &w2)
    .node(
        "Conv",
        &["x", "w1", "b1"],
        &["c"],
        &[
            ("kernel_shape", Attr::Ints(vec![3, 3])),
            ("pads", Attr::Ints(vec![1, 1, 1, 1])),
        ],
    )
    .node("Relu", &["c"], &["r"], &[])
    .node("Add", &["r", "c"], &["a"], &[])
    .node(
        "MaxPool",
        &["a"],
        &["p"],
        &[
            ("kernel_shape", Attr::Ints(vec![2, 2])),
            ("strides", Attr::Ints(vec![2, 2])),
        ],
    )
    .node(
        "Conv",
        &["p", "w2"],
        &["logits"],
        &[("kernel_shape", Attr::Ints(vec![1, 1]))],
    );
    (onnx::encode(&g.finish()), w1, b1, w2)
}

#[test]
fn dalle_shaped_logits_path_matches_plain_rust() {
    let v = 40;
    let (bytes, w1, b1, w2) = dalle_like(v);
    let card = Card {
        input_size: 16,
        grid: [8, 8],
        vocab_size: v as u32,
        onnx_sha256: sha256_hex(&bytes),
        ..Card::dall_e("")
    };
    assert_eq!(card.normalization, Normalization::LogitLaplace { eps: 0.1 });
    let mut vt =
        VisualTokenizer::from_parts(Path::new("dalle.onnx"), &bytes, card, &SessionOptions::default()).expect("load");
    let images = center_pixels(16, Filter::Lanczos3);
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let tokens = vt.tokenize(&refs).expect("tokenize");
    for (img, toks) in images.iter().zip(&tokens) {
        // Plain Rust: map_pixels, conv3x3+b, relu(c)+c, maxpool 2, conv1x1, argmax.
        let x: Vec<f32> = (0..3 * 256)
            .map(|i| img[(i % 256) * 3 + i / 256] as f32 / 255.0 * 0.8 + 0.1)
            .collect();
        let mut c = vec![0f32; 8 * 256];
        for o in 0..8 {
            for y in 0..16i32 {
                for xx in 0..16i32 {
                    let mut acc = b1[o];
                    for ci in 0..3 {
                        for ky in 0..3i32 {
                            for kx in 0..3i32 {
                                let (iy, ix) = (y + ky - 1, xx + kx - 1);
                                if (0..16).contains(&iy) && (0..16).contains(&ix) {
                                    acc += x[ci * 256 + (iy * 16 + ix) as usize]
                                        * w1[((o * 3 + ci) * 3 + ky as usize) * 3 + kx as usize];
                                }
                            }
                        }
                    }
                    c[o * 256 + (y * 16 + xx) as usize] = acc.max(0.0) + acc;
                }
            }
        }
        for p in 0..64 {
            let (py, px) = (p / 8, p % 8);
            let pooled: Vec<f32> = (0..8)
                .map(|o| {
                    let at = |dy: usize, dx: usize| c[o * 256 + (2 * py + dy) * 16 + 2 * px + dx];
                    at(0, 0).max(at(0, 1)).max(at(1, 0)).max(at(1, 1))
                })
                .collect();
            let logits: Vec<f32> = (0..v)
                .map(|k| (0..8).map(|o| pooled[o] * w2[k * 8 + o]).sum())
                .collect();
            let best = (0..v).fold(0, |b, k| if logits[k] > logits[b] { k } else { b });
            let margin = logits[best] - logits[toks[p] as usize];
            assert!(
                toks[p] as usize == best || margin < 1e-4,
                "patch {p}: {} vs {best}",
                toks[p]
            );
        }
    }
}

#[test]
fn text_tokenizer_fit_encode_truncate_and_override() {
    let dir = tempfile::tempdir().expect("tmp");
    let m = Manifest::open(manifest()).expect("manifest");
    let captions: Vec<String> = m.rows.iter().flat_map(|r| r.captions.clone()).collect();
    let path = dir.path().join("tok.json");
    fit_text_tokenizer(&captions, TextModel::Wordpiece, 300, &path).expect("fit");
    let t = TextTokenizer::load(&path, 64).expect("load");
    assert!(t.overridden().is_empty());
    let ids = t
        .encode("a small red circle above a large blue square")
        .expect("encode");
    assert_eq!(ids.first(), t.special_ids().get("[BOS]"));
    assert_eq!(ids.last(), t.special_ids().get("[EOS]"));
    let short = TextTokenizer::load(&path, 4).expect("load");
    let ids4 = short
        .encode("a small red circle above a large blue square")
        .expect("encode");
    assert_eq!(ids4.len(), 4);
    assert_eq!(ids4[3], t.special_ids()["[EOS]"], "truncation keeps the end token");

    // A file with padding and truncation baked in: both are overridden.
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
    json["truncation"] =
        serde_json::json!({"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0});
    json["padding"] = serde_json::json!({"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null, "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"});
    let baked = dir.path().join("baked.json");
    std::fs::write(&baked, serde_json::to_vec(&json).expect("json")).expect("write");
    let b = TextTokenizer::load(&baked, 64).expect("load");
    assert_eq!(b.overridden(), ["padding".to_string(), "truncation".to_string()]);
    assert_eq!(
        b.encode("a red circle").expect("encode"),
        t.encode("a red circle").expect("encode")
    );
    for model in [TextModel::Bpe, TextModel::Unigram] {
        let p = dir.path().join(format!("{model:?}.json"));
        fit_text_tokenizer(&captions, model, 200, &p).expect("fit");
        assert!(
            TextTokenizer::load(&p, 64)
                .expect("load")
                .encode("a red circle")
                .expect("encode")
                .len()
                >= 3
        );
    }
}

fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("ls")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().expect("name").to_string_lossy().into_owned(),
                std::fs::read(&p).expect("read"),
            )
        })
        .collect()
}

#[test]
fn workers_and_resume_give_the_same_bytes_as_one_run() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _) = fitted(dir.path());
    let text_path = dir.path().join("text.json");
    let m = Manifest::open(manifest()).expect("manifest");
    let captions: Vec<String> = m.rows.iter().flat_map(|r| r.captions.clone()).collect();
    fit_text_tokenizer(&captions, TextModel::Wordpiece, 300, &text_path).expect("fit text");
    let text = TextTokenizer::load(&text_path, 64).expect("text");
    let config = TokenizeConfig {
        views: 3,
        batch_size: 8,
        part_samples: 10,
        ..TokenizeConfig::default()
    };
    let run = |out: &Path, worker: (u32, u32)| {
        let mut vt = VisualTokenizer::load(&path, &SessionOptions::default()).expect("load");
        tokenize(
            manifest(),
            out,
            &mut vt,
            Some(&text),
            &TokenizeConfig {
                worker,
                ..config.clone()
            },
            &|_| {},
        )
        .expect("tokenize")
    };
    let single = dir.path().join("single");
    let s = run(&single, (0, 1));
    assert!(s.complete);
    assert_eq!(s.images as usize, m.rows.len());
    assert_eq!(s.parts_written, 4);

    let split = dir.path().join("split");
    let a = run(&split, (0, 2));
    assert!(!a.complete);
    assert_eq!((a.parts_written, a.parts_pending), (2, 2));
    let b = run(&split, (1, 2));
    assert!(b.complete);
    assert_eq!(tree(&single), tree(&split));

    // An interrupted run: a part and its marker missing, a stray temp file; re-running restores the bytes.
    let resumed = dir.path().join("resumed");
    run(&resumed, (0, 1));
    std::fs::remove_file(resumed.join("part-00002.parquet")).expect("rm");
    std::fs::remove_file(resumed.join("part-00002.done.json")).expect("rm");
    std::fs::remove_file(resumed.join("tokenize.json")).expect("rm");
    let r = run(&resumed, (0, 1));
    assert_eq!((r.parts_written, r.parts_skipped), (1, 3));
    assert_eq!(tree(&single), tree(&resumed));

    // Another configuration is refused without --overwrite, and never reuses parts made with the old one.
    let mut vt = VisualTokenizer::load(&path, &SessionOptions::default()).expect("load");
    let other = TokenizeConfig {
        views: 2,
        ..config.clone()
    };
    let refused = tokenize(manifest(), &resumed, &mut vt, Some(&text), &other, &|_| {}).expect_err("refused");
    assert_eq!(
        refused.to_string(),
        format!(
            "{}: holds tokens of another run (part-00000.done.json: another manifest, tokenizer, imglish version or \
             settings); pass --overwrite to replace them, or choose another --out",
            resumed.display()
        )
    );
    let other = TokenizeConfig {
        overwrite: true,
        ..other
    };
    let o = tokenize(manifest(), &resumed, &mut vt, Some(&text), &other, &|_| {}).expect("tokenize");
    assert_eq!((o.parts_written, o.parts_skipped), (4, 0));
    // Each decode option is another configuration: nothing is reused.
    for (flag, changed) in [
        (
            "--jpeg-draft",
            TokenizeConfig {
                jpeg_draft: true,
                ..other.clone()
            },
        ),
        (
            "--jpeg-all-scans",
            TokenizeConfig {
                jpeg_all_scans: true,
                ..other.clone()
            },
        ),
    ] {
        let d = tokenize(manifest(), &resumed, &mut vt, Some(&text), &changed, &|_| {}).expect("tokenize");
        assert_eq!((d.parts_written, d.parts_skipped), (4, 0), "{flag}");
    }

    // Larger parts over the same folder: the parts numbered beyond the new count are removed.
    let bigger = TokenizeConfig {
        part_samples: 25,
        overwrite: true,
        ..other.clone()
    };
    let g = tokenize(manifest(), &resumed, &mut vt, Some(&text), &bigger, &|_| {}).expect("tokenize");
    assert!(g.complete);
    let mut parts: Vec<String> = std::fs::read_dir(&resumed)
        .expect("ls")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("part-"))
        .collect();
    parts.sort();
    assert_eq!(
        parts,
        [
            "part-00000.done.json",
            "part-00000.parquet",
            "part-00001.done.json",
            "part-00001.parquet"
        ]
    );

    let (info, records) = imglish_pack::read_part(single.join("part-00000.parquet")).expect("read part");
    assert_eq!(info.views_per_sample, 3);
    assert_eq!(
        records[0].views[0].crop[2], records[0].views[0].crop[3],
        "view 0 is a centre square"
    );
    // Every caption starts with [BOS]; only the demo's duplicate copy (when it is the survivor) has none.
    assert!(records
        .iter()
        .all(|r| r.captions.iter().all(|c| c[0] == text.special_ids()["[BOS]"])));
    assert!(records.iter().filter(|r| r.captions.is_empty()).count() <= 1);
}

#[test]
fn cuda_without_gpu_support_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _) = fitted(dir.path());
    let opts = SessionOptions::default().with_device("cuda:0".parse::<Device>().expect("device"));
    let err = VisualTokenizer::load(&path, &opts).expect_err("no cuda").to_string();
    assert!(err.starts_with("device cuda:0: "), "{err}");
    let auto = SessionOptions::default().with_device(Device::Auto);
    assert_eq!(
        VisualTokenizer::load(&path, &auto).expect("auto falls back").provider(),
        "cpu"
    );
}

#[test]
fn export_scripts_cards_parse_to_the_presets() {
    // The keys and values tokenizer/export/*.py write (common.write_card adds hash, version and layout).
    let dalle = serde_json::json!({
        "name": "dall-e-dvae-encoder", "input_size": 112,
        "normalization": {"kind": "logit-laplace", "eps": 0.1}, "resize_filter": "lanczos3", "output": "logits",
        "grid": [14, 14], "vocab_size": 8192, "onnx_sha256": "ab", "card_version": 1, "layout": "NCHW"
    });
    assert_eq!(serde_json::from_value::<Card>(dalle).expect("card"), Card::dall_e("ab"));
    let beit = serde_json::json!({
        "name": "beit-v2-vqkd", "input_size": 224,
        "normalization": {"kind": "mean-std", "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "resize_filter": "bicubic", "output": "indices", "grid": [14, 14], "vocab_size": 8192,
        "onnx_sha256": "cd", "card_version": 1, "layout": "NCHW"
    });
    assert_eq!(serde_json::from_value::<Card>(beit).expect("card"), Card::beit_v2("cd"));
}

#[test]
fn a_model_error_mid_run_is_reported_not_hung() {
    let dir = tempfile::tempdir().expect("tmp");
    let (path, _) = fitted(dir.path());
    // The card claims fewer codes than the model emits: the first batch fails after the producer has queued more.
    let mut card: Card = serde_json::from_slice(&std::fs::read(Card::path_for(&path)).expect("card")).expect("json");
    card.vocab_size = 2;
    std::fs::write(Card::path_for(&path), serde_json::to_vec(&card).expect("json")).expect("write");
    let mut vt = VisualTokenizer::load(&path, &SessionOptions::default()).expect("load");
    let config = TokenizeConfig {
        views: 1,
        batch_size: 2,
        ..TokenizeConfig::default()
    };
    let err = tokenize(manifest(), &dir.path().join("t"), &mut vt, None, &config, &|_| {}).expect_err("must fail");
    assert!(err.to_string().contains("outside the vocabulary of 2"), "{err}");
    assert!(
        !dir.path().join("t/part-00000.parquet").exists(),
        "no half-visible part"
    );
}

/// A model whose weights live in an external data file (as large exported models ship) loads by path from any
/// working directory, gives the tokens of the same model with embedded weights, and its card must cover the file:
/// a changed file or a card without it is refused naming the file; another file's content is another fingerprint.
#[test]
fn external_data_loads_by_path_and_the_card_covers_it() {
    let v = 40;
    let (bytes, ..) = dalle_like(v);
    let card_for = |bytes: &[u8]| Card {
        input_size: 16,
        grid: [8, 8],
        vocab_size: v as u32,
        onnx_sha256: sha256_hex(bytes),
        ..Card::dall_e("")
    };
    let mut embedded = VisualTokenizer::from_parts(
        Path::new("dalle.onnx"),
        &bytes,
        card_for(&bytes),
        &SessionOptions::default(),
    )
    .expect("load");
    let images = center_pixels(16, Filter::Lanczos3);
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let want = embedded.tokenize(&refs).expect("tokenize");

    let dir = tempfile::tempdir().expect("tempdir");
    let folder = dir.path().join("model");
    std::fs::create_dir_all(&folder).expect("mkdir");
    let mut proto = onnx::decode(&bytes).expect("decode");
    let weights = onnx::externalize(&mut proto, "w2", "w2.bin");
    let small = onnx::encode(&proto);
    assert_eq!(onnx::external_data_files(&proto), ["w2.bin"]);
    let model = folder.join("dalle.onnx");
    std::fs::write(&model, &small).expect("model");
    std::fs::write(folder.join("w2.bin"), &weights).expect("weights");
    let mut card = card_for(&small);
    card.external_data = imglish_tokenizer::external_data_hashes(&model, &small).expect("hashes");
    assert_eq!(card.external_data["w2.bin"], sha256_hex(&weights));
    std::fs::write(Card::path_for(&model), serde_json::to_vec(&card).expect("json")).expect("card");

    // Loaded by path (the test's working directory is the package, not the model's folder).
    let mut external = VisualTokenizer::load(&model, &SessionOptions::default()).expect("load external");
    assert_eq!(external.tokenize(&refs).expect("tokenize"), want);

    // Other weights with a matching card: another fingerprint.
    let mut other = weights.clone();
    other[0] ^= 0x40;
    std::fs::write(folder.join("w2.bin"), &other).expect("weights");
    let mut card2 = card.clone();
    card2.external_data.insert("w2.bin".into(), sha256_hex(&other));
    let retuned = VisualTokenizer::from_parts(&model, &small, card2, &SessionOptions::default()).expect("load");
    assert_ne!(retuned.fingerprint(), external.fingerprint());

    // The old card no longer matches the file.
    let err = VisualTokenizer::load(&model, &SessionOptions::default()).expect_err("changed weights");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: external data file w2.bin: sha256 {} does not match the card's {}",
            model.display(),
            sha256_hex(&other),
            sha256_hex(&weights)
        )
    );
    // A card that does not cover the file.
    let err = VisualTokenizer::from_parts(&model, &small, card_for(&small), &SessionOptions::default())
        .expect_err("uncovered");
    assert!(
        err.to_string().ends_with(&format!(
            "its external data file w2.bin (sha256 {}) is not in the card's external_data: a card covers every file \
             of the model (`imglish tokenizer card` writes one)",
            sha256_hex(&other)
        )),
        "{err}"
    );
    // A location outside the model's folder.
    let mut escaping = onnx::decode(&bytes).expect("decode");
    let _ = onnx::externalize(&mut escaping, "w2", "../w2.bin");
    let escaping = onnx::encode(&escaping);
    let err = imglish_tokenizer::external_data_hashes(&model, &escaping).expect_err("escapes");
    assert!(
        err.to_string()
            .ends_with("external data location '../w2.bin' is not a file inside the model's folder"),
        "{err}"
    );
}

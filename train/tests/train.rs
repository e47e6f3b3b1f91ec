//! The trainer end to end on generated token datasets: shapes, masking semantics, exact resume, settings checks,
//! device errors, learning, probing.

use std::path::Path;

use imglish_pack::{
    pack_dataset, part_file_name, PackConfig, PartWriter, Split, TokenRecord, TokenizerInfo, TokensManifest, ViewRecord,
};
use imglish_train::{
    probe, train, Beit, DataMode, Event, Input, InputKind, MaskKind, Masking, ModelConfig, OptimConfig, ProbeConfig,
    RunOptions, StreamConfig, TorchDevice, TrainConfig, TrainError, PRESETS,
};
use tch::{Device, Kind, Tensor};

const GRID: [u32; 2] = [4, 4];
const VOCAB: u32 = 64;

/// `n` samples of 4 classes; a sample's tokens follow a class-specific pattern over the grid, so masked tokens
/// are predictable from the visible ones and classes are linearly separable after pooling.
fn make_dataset(root: &Path, n: u64) -> std::path::PathBuf {
    make_dataset_with(root, n, false)
}

/// A 48x40 JPEG working image in the class's colour (sample `bad` gets bytes that do not decode).
fn working_image(class: u16, bad: bool) -> Vec<u8> {
    if bad {
        return b"definitely not a jpeg".to_vec();
    }
    let c = [(class * 60) as u8, 255 - (class * 50) as u8, 90];
    let img = image::RgbImage::from_fn(48, 40, |x, y| {
        if (x / 8 + y / 8) % 2 == 0 {
            image::Rgb(c)
        } else {
            image::Rgb([20, 20, 20])
        }
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&img)
        .expect("jpeg");
    out
}

fn make_dataset_with(root: &Path, n: u64, pixels: bool) -> std::path::PathBuf {
    let tokens = root.join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let info = TokenizerInfo {
        fingerprint: "ab".repeat(32),
        card: serde_json::json!({"name": "synthetic"}),
        grid: GRID,
        vocab_size: VOCAB,
        text_vocab_size: None,
        text_special_ids: Default::default(),
        views_per_sample: 2,
    };
    let mut part = PartWriter::try_new(tokens.join(part_file_name(0)), &info).expect("part");
    for id in 0..n {
        let class = (id % 4) as u16;
        let view = |v: u16| ViewRecord {
            crop: [0, 0, 32, 32],
            flip: v == 1,
            tokens: (0..16u16)
                .map(|p| (class * 16 + (p * (class + 1) + v) % 16) % VOCAB as u16)
                .collect(),
        };
        part.write(&TokenRecord {
            sample_id: id * 7919 + 13,
            views: vec![view(0), view(1)],
            captions: vec![],
            label: Some(i32::from(class)),
            split: if id % 5 == 0 { Split::Val } else { Split::Train },
            pixels: pixels.then(|| working_image(class, id == 3)),
        })
        .expect("write");
    }
    TokensManifest::new(info, vec![part.finish().expect("finish")])
        .write(&tokens)
        .expect("manifest");
    let out = root.join("dataset");
    let config = PackConfig {
        batch_rows: 16,
        include_pixels: pixels,
        ..PackConfig::default()
    };
    pack_dataset(&tokens, None, &out, &config, &|_| {}).expect("pack");
    out
}

fn small_config(steps: u64) -> TrainConfig {
    let mut model = ModelConfig::preset("tiny", [4, 4], i64::from(VOCAB)).expect("preset");
    model.dim = 32;
    model.heads = 4;
    model.depth = 2;
    TrainConfig {
        model,
        optim: OptimConfig {
            lr: 3e-3,
            warmup_steps: 2,
            ..OptimConfig::default()
        },
        masking: Masking::new(MaskKind::Blockwise, [4, 4]).expect("masking"),
        steps,
        accum: 2,
        seed: 3,
        stream: StreamConfig {
            batch_size: 8,
            shuffle: imglish_pack::Shuffle::default(),
            rank: 0,
            world_size: 1,
            prefetch: 2,
            skip_corrupt: false,
        },
    }
}

fn options() -> RunOptions {
    RunOptions {
        log_every: 1,
        ..RunOptions::default()
    }
}

fn train_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["kind"] == "train")
        .map(|v| (v["step"].as_u64().expect("step"), v["loss"].as_f64().expect("loss")))
        .collect()
}

#[test]
fn every_preset_builds_with_the_right_shapes() {
    for (name, dim, depth, heads, ls) in PRESETS {
        let config = ModelConfig::preset(name, [2, 2], 32).expect("preset");
        assert_eq!((config.dim, config.depth, config.heads), (dim, depth, heads));
        assert_eq!(config.layer_scale_init, Some(ls));
        let model = Beit::new(&config, Device::Cpu, 0).expect("model");
        let params = model.named_parameters();
        assert_eq!(params["blocks.0.attn.qkv.weight"].size(), [3 * dim, dim]);
        assert_eq!(
            params["rel_pos_bias.relative_position_bias_table"].size(),
            [3 * 3 + 3, heads]
        );
        assert_eq!(params["lm_head.weight"].size(), [32, dim]);
        assert!(params.contains_key(&format!("blocks.{}.gamma_2", depth - 1)));
        assert!(!params.contains_key("blocks.0.attn.k_bias"));
        let tokens = Tensor::zeros([2, 4], (Kind::Int64, Device::Cpu));
        let mask = Tensor::from_slice(&[true, false, false, true, false, false, false, true]).view([2, 4]);
        let feats = tch::no_grad(|| model.features(&Input::Tokens(tokens.shallow_clone()), Some(&mask), None));
        assert_eq!(feats.size(), [2, 5, dim]);
        let logits = tch::no_grad(|| model.mim_logits(&Input::Tokens(tokens), &mask, None));
        assert_eq!(logits.size(), [3, 32]);
    }
    // A preset's parameter count is what timm reports for the encoder (ViT-Base/16 with BEiT's q/v biases and
    // shared relative position bias has ~86M parameters before the head).
    let base = ModelConfig {
        input: InputKind::Pixels,
        ..ModelConfig::preset("base", [14, 14], 8192).expect("base")
    };
    let model = Beit::new(&base, Device::Cpu, 0).expect("base model");
    let head = 768 * 8192 + 8192;
    let encoder = model.num_parameters() - head;
    assert!((85_000_000..87_500_000).contains(&encoder), "{encoder}");
}

#[test]
fn masked_inputs_do_not_leak_into_predictions_and_only_masked_positions_are_scored() {
    let config = small_config(1).model;
    let model = Beit::new(&config, Device::Cpu, 1).expect("model");
    let masking = Masking::new(MaskKind::Blockwise, [4, 4]).expect("masking");
    let mask: Vec<bool> = (0..4).flat_map(|id| masking.mask(0, 0, id)).collect();
    let mask_t = Tensor::from_slice(&mask).view([4, 16]);
    let a = Tensor::randint(i64::from(VOCAB), [4, 16], (Kind::Int64, Device::Cpu));
    // Change only the tokens under the mask: the predictions must not change.
    let b = a.where_self(&mask_t.logical_not(), &((&a + 1).remainder(i64::from(VOCAB))));
    assert_ne!(a, b);
    let la = tch::no_grad(|| model.mim_logits(&Input::Tokens(a.shallow_clone()), &mask_t, None));
    let lb = tch::no_grad(|| model.mim_logits(&Input::Tokens(b), &mask_t, None));
    assert_eq!(la.size()[0], mask.iter().filter(|&&m| m).count() as i64);
    assert_eq!((la - lb).abs().max().double_value(&[]), 0.0);
    // Changing a visible token does change them.
    let mut flat: Vec<i64> = Vec::try_from(&a.view([-1])).expect("i64");
    let first_visible = mask.iter().position(|&m| !m).expect("visible");
    flat[first_visible] = (flat[first_visible] + 1) % i64::from(VOCAB);
    let c = Tensor::from_slice(&flat).view([4, 16]);
    let lc = tch::no_grad(|| model.mim_logits(&Input::Tokens(c), &mask_t, None));
    let la = tch::no_grad(|| model.mim_logits(&Input::Tokens(a), &mask_t, None));
    assert!((la - lc).abs().max().double_value(&[]) > 0.0);
}

#[test]
fn a_resumed_run_reproduces_the_uninterrupted_one_exactly() {
    // One libtorch thread on this test's thread: with more, a loaded machine may round differently between the
    // runs compared bit for bit here (README, "Train and probe").
    imglish_train::set_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 120);
    let config = small_config(8);
    let full = dir.path().join("full");
    let summary = train(&dataset, &full, &config, &options(), &mut |_| {}).expect("full run");
    assert_eq!(summary.steps, 8);

    let split = dir.path().join("split");
    let first = RunOptions {
        stop_at: Some(4),
        ..options()
    };
    let s1 = train(&dataset, &split, &config, &first, &mut |_| {}).expect("first half");
    assert_eq!((s1.steps, s1.steps_this_run), (4, 4));
    // Without --resume the directory is refused.
    let err = train(&dataset, &split, &config, &options(), &mut |_| {}).expect_err("not resumed");
    assert!(err.to_string().contains("pass --resume"), "{err}");
    let resume = RunOptions {
        resume: true,
        ..options()
    };
    let mut started_at = None;
    let s2 = train(&dataset, &split, &config, &resume, &mut |e| {
        if let Event::Started { step, .. } = e {
            started_at = Some(*step);
        }
    })
    .expect("resumed");
    assert_eq!(started_at, Some(4));
    assert_eq!((s2.steps, s2.steps_this_run), (8, 4));
    let (a, b) = (train_losses(&full), train_losses(&split));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b, "losses of the resumed run differ");
    // The weights are identical too.
    let wa = std::fs::read(full.join("checkpoints/step-00000008/model.safetensors")).expect("a");
    let wb = std::fs::read(split.join("checkpoints/step-00000008/model.safetensors")).expect("b");
    assert!(wa == wb, "final weights differ");
    assert!(split.join("loss.png").exists());

    // Resuming with other settings is refused, naming what differs.
    let mut other = config.clone();
    other.optim.lr = 1e-3;
    let err = train(&dataset, &split, &other, &resume, &mut |_| {}).expect_err("other settings");
    let msg = err.to_string();
    assert!(
        msg.ends_with(&format!(
            "written by a run with other settings: optim.lr: checkpoint {}, now 0.001",
            config.optim.lr
        )),
        "{msg}"
    );
}

#[test]
fn in_memory_batches_train_the_same_as_streamed_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 60);
    let config = small_config(3);
    train(&dataset, &dir.path().join("s"), &config, &options(), &mut |_| {}).expect("stream");
    let mem = RunOptions {
        data: DataMode::Memory,
        ..options()
    };
    train(&dataset, &dir.path().join("m"), &config, &mem, &mut |_| {}).expect("memory");
    assert_eq!(train_losses(&dir.path().join("s")), train_losses(&dir.path().join("m")));
}

#[test]
fn training_lowers_the_validation_loss_and_the_probe_beats_a_random_encoder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 200);
    let mut config = small_config(40);
    config.accum = 1;
    config.stream.batch_size = 16;
    let run = dir.path().join("run");
    let summary = train(&dataset, &run, &config, &options(), &mut |_| {}).expect("train");
    let initial = summary.initial_val_loss.expect("step-0 eval");
    let last = summary.final_val.expect("final eval").loss;
    assert!(last < 0.9 * initial, "val loss {initial} -> {last}");
    let ckpt = summary.checkpoint.expect("checkpoint");
    let report = probe(&dataset, &ckpt, &ProbeConfig::default(), TorchDevice::Cpu, &|_| {}).expect("probe");
    assert_eq!((report.classes, report.val_samples), (4, 40));
    assert!(report.accuracy >= report.random_accuracy, "{report:?}");
    assert!(report.accuracy > 0.5, "{report:?}");
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 20);
    let opts = RunOptions {
        device: "cuda".parse().expect("device"),
        ..options()
    };
    let err = train(&dataset, &dir.path().join("run"), &small_config(1), &opts, &mut |_| {}).expect_err("no cuda");
    assert!(matches!(err, TrainError::Device(_)));
    assert!(
        err.to_string()
            .starts_with("--device cuda:0: CUDA is not available (libtorch sees no CUDA device"),
        "{err}"
    );
    assert_eq!(
        "gpu".parse::<TorchDevice>().expect_err("bad").to_string(),
        "invalid configuration: unknown device 'gpu' (cpu, cuda or cuda:N)"
    );
}

#[test]
fn pixel_input_rebuilds_views_from_the_stored_working_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset_with(dir.path(), 40, true);
    let mut config = small_config(3);
    config.model.input = InputKind::Pixels;
    config.stream.shuffle = imglish_pack::Shuffle::None;
    let mut skipped = Vec::new();
    let summary = train(&dataset, &dir.path().join("run"), &config, &options(), &mut |e| {
        if let Event::Skipped(id, why) = e {
            skipped.push((*id, why.clone()));
        }
    })
    .expect("pixel run");
    assert_eq!(summary.steps, 3);
    // Sample 3 (id 3 * 7919 + 13) has undecodable pixels: skipped and reported by id, never a crash.
    assert!(summary.skipped >= 1);
    assert!(
        skipped
            .iter()
            .any(|(id, why)| *id == 3 * 7919 + 13 && why.starts_with("stored pixels: ")),
        "{skipped:?}"
    );
    let weights: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("run/checkpoints/step-00000003/model.safetensors"))
            .expect("weights")
            .into_iter()
            .collect();
    assert_eq!(weights["patch_embed.proj.weight"].size(), [32, 3, 16, 16]);
    assert!(!weights.contains_key("token_embed.weight"));
}

#[test]
fn dataset_mismatches_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 20);
    let mut config = small_config(1);
    config.model.grid = [14, 14];
    let err = train(&dataset, &dir.path().join("a"), &config, &options(), &mut |_| {}).expect_err("grid");
    assert!(
        err.to_string()
            .ends_with("token grid [4, 4], the model expects [14, 14]"),
        "{err}"
    );
    let mut config = small_config(1);
    config.model.input = InputKind::Pixels;
    let err = train(&dataset, &dir.path().join("b"), &config, &options(), &mut |_| {}).expect_err("pixels");
    assert!(
        err.to_string()
            .contains("--input pixels needs a dataset packed with --include-pixels"),
        "{err}"
    );
}

#[test]
fn a_damaged_checkpoint_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 40);
    let config = small_config(2);
    let out = dir.path().join("run");
    train(&dataset, &out, &config, &options(), &mut |_| {}).expect("run");
    let ckpt = imglish_train::latest_checkpoint(&out)
        .expect("ls")
        .expect("a checkpoint");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("state.json")).expect("state")).expect("json");
    assert_eq!(state["files"].as_object().map(|f| f.len()), Some(2), "{state}");
    imglish_train::load_model(&ckpt, Device::Cpu).expect("an intact checkpoint loads");
    // One bit of the last tensor's data: the file still parses, the weights would silently differ.
    let model = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&model).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0x01;
    std::fs::write(&model, &bytes).expect("write");
    let err = imglish_train::load_model(&ckpt, Device::Cpu).expect_err("a damaged checkpoint");
    let msg = err.to_string();
    assert!(
        msg.contains(&model.display().to_string()) && msg.contains("sha256 is") && msg.contains("state.json says"),
        "{msg}"
    );
}

//! BEiT-3 pretraining end to end on generated datasets with captions: every task learns, resume is exact,
//! checkpoints say what they hold, and settings that cannot work are refused.

use std::path::{Path, PathBuf};

use imglish_pack::{
    pack_dataset, part_file_name, PackConfig, PartWriter, Split, TokenRecord, TokenizerInfo, TokensManifest, ViewRecord,
};
use imglish_train::{
    load_beit3, load_model, train_beit3, Beit3Config, Beit3Event, Beit3Metrics, Beit3TrainConfig, Objective,
    OptimConfig, RunOptions, StreamConfig, TextMasking,
};
use tch::Device;

const VOCAB: u32 = 64;
const TEXT_VOCAB: u32 = 40;

fn specials() -> std::collections::BTreeMap<String, u32> {
    ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
        .iter()
        .enumerate()
        .map(|(i, n)| ((*n).to_string(), i as u32))
        .collect()
}

/// `n` samples of 4 classes: class-patterned visual tokens (as in the BEiT tests) and, for all but every
/// sixth sample, one or two captions `[BOS] w w ... [EOS]` whose words depend on the class and position.
fn make_dataset(root: &Path, n: u64, captions: bool) -> PathBuf {
    let tokens = root.join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let info = TokenizerInfo {
        fingerprint: "cd".repeat(32),
        card: serde_json::json!({"name": "synthetic"}),
        grid: [4, 4],
        vocab_size: VOCAB,
        text_vocab_size: captions.then_some(TEXT_VOCAB),
        text_special_ids: if captions { specials() } else { Default::default() },
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
        let caption = |k: u32| -> Vec<u32> {
            let len = 4 + (id as u32 + k) % 5;
            let mut c = vec![2];
            c.extend((0..len).map(|i| 5 + (u32::from(class) * 8 + (i * (u32::from(class) + 1) + k) % 8) % 35));
            c.push(3);
            c
        };
        let caps = match (captions, id % 6) {
            (false, _) | (true, 5) => vec![],
            (true, 0) => vec![caption(0), caption(1)],
            _ => vec![caption(0)],
        };
        part.write(&TokenRecord {
            sample_id: id * 7919 + 13,
            views: vec![view(0), view(1)],
            captions: caps,
            label: Some(i32::from(class)),
            split: if id.is_multiple_of(5) { Split::Val } else { Split::Train },
            pixels: None,
        })
        .expect("write");
    }
    TokensManifest::new(info, vec![part.finish().expect("finish")])
        .write(&tokens)
        .expect("manifest");
    let out = root.join("dataset");
    let config = PackConfig {
        batch_rows: 16,
        ..PackConfig::default()
    };
    pack_dataset(&tokens, None, &out, &config, &|_| {}).expect("pack");
    out
}

fn config(steps: u64) -> Beit3TrainConfig {
    let mut model = Beit3Config::preset("beit3-tiny", [4, 4], i64::from(VOCAB), i64::from(TEXT_VOCAB)).expect("preset");
    model.dim = 32;
    model.heads = 4;
    model.depth = 2;
    model.ffn_dim = 64;
    model.max_source_positions = 32;
    let text = TextMasking::from_special_ids(TEXT_VOCAB, &specials()).expect("text masking");
    Beit3TrainConfig {
        model,
        objective: Objective::beit3([4, 4], text).expect("objective"),
        optim: OptimConfig {
            lr: 3e-3,
            warmup_steps: 2,
            ..OptimConfig::default()
        },
        steps,
        accum: 2,
        seed: 5,
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

fn run(dataset: &Path, out: &Path, config: &Beit3TrainConfig, options: &RunOptions) -> Vec<Beit3Metrics> {
    let mut lines = Vec::new();
    train_beit3(dataset, out, config, options, &mut |e| {
        if let Beit3Event::Metrics(m) = e {
            lines.push(m.clone());
        }
    })
    .expect("train");
    lines
}

#[test]
fn every_task_learns_and_the_validation_set_covers_all_kinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 120, true);
    let out = dir.path().join("run");
    let mut c = config(300);
    c.accum = 1;
    let lines = run(&dataset, &out, &c, &options());
    let vals: Vec<&Beit3Metrics> = lines.iter().filter(|m| m.kind == "val").collect();
    let (first, last) = (vals[0], vals[vals.len() - 1]);
    assert_eq!((first.step, last.step), (0, 300));
    for task in ["image_mim", "pair_mim", "text_mlm", "pair_mlm"] {
        let (a, b) = (first.tasks[task].loss, last.tasks[task].loss);
        assert!(b < 0.7 * a, "{task}: validation loss {a} -> {b}");
    }
    // 24 validation samples: every one as an image; those with captions (20) as a text and a pair too.
    assert_eq!(first.samples["image"], 24);
    assert_eq!(first.samples["text"], 20);
    assert_eq!(first.samples["pair"], 20);
    // Train lines carry the kinds they saw.
    assert!(lines.iter().any(|m| m.kind == "train" && m.samples.len() == 3));
    // The checkpoint holds torchscale names and says what it is.
    let ckpt = out.join("checkpoints/step-00000300");
    let (model, saved) = load_beit3(&ckpt, Device::Cpu).expect("load");
    assert_eq!(saved, c);
    let names = model.named_parameters();
    for name in [
        "text_embed.weight",
        "vision_embed.cls_token",
        "encoder.embed_positions.A.weight",
        "encoder.layers.1.self_attn.q_proj.B.weight",
        "encoder.layers.0.ffn.A.ffn_layernorm.weight",
        "encoder.layer_norm.B.bias",
        "mim_head.weight",
        "mlm_head.bias",
    ] {
        assert!(names.contains_key(name), "{name} missing");
    }
    let err = load_model(&ckpt, Device::Cpu).expect_err("a BEiT loader must refuse it");
    assert_eq!(
        err.to_string(),
        format!("checkpoint {}: holds a beit3 model, not beit", ckpt.display())
    );
}

#[test]
fn resume_is_exact() {
    // One libtorch thread on this test's thread: with more, a loaded machine may round differently between the
    // runs compared bit for bit here (README, "Train and probe").
    imglish_train::set_threads(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 60, true);
    let c = config(6);
    let straight = dir.path().join("straight");
    let a = run(&dataset, &straight, &c, &options());
    let resumed = dir.path().join("resumed");
    let _ = run(
        &dataset,
        &resumed,
        &c,
        &RunOptions {
            stop_at: Some(3),
            ..options()
        },
    );
    let b = run(
        &dataset,
        &resumed,
        &c,
        &RunOptions {
            resume: true,
            ..options()
        },
    );
    let train_losses = |v: &[Beit3Metrics]| -> Vec<(u64, f64)> {
        v.iter()
            .filter(|m| m.kind == "train" && m.step > 3)
            .map(|m| (m.step, m.loss))
            .collect()
    };
    assert_eq!(train_losses(&a), train_losses(&b));
    let wa = std::fs::read(straight.join("checkpoints/step-00000006/model.safetensors")).expect("a");
    let wb = std::fs::read(resumed.join("checkpoints/step-00000006/model.safetensors")).expect("b");
    assert!(wa == wb, "weights differ after resume");
}

#[test]
fn settings_that_cannot_work_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = make_dataset(dir.path(), 20, false);
    let mut c = config(2);
    c.objective.mix = [0.0, 1.0, 1.0];
    let err = train_beit3(&dataset, &dir.path().join("run"), &c, &options(), &mut |_| {}).expect_err("no kind");
    assert_eq!(
        err.to_string(),
        format!(
            "dataset {}: the dataset has no captions, so only image samples exist, and --mix gives images weight 0",
            dataset.display()
        )
    );
    let mut c = config(2);
    c.stream.world_size = 2;
    let err = train_beit3(&dataset, &dir.path().join("run2"), &c, &options(), &mut |_| {}).expect_err("world");
    assert!(err.to_string().contains("this trainer runs in one process"), "{err}");
}

/// A dataset of text samples only: BEiT can use none of them and must say so instead of waiting forever.
#[test]
fn beit_on_a_dataset_without_images_stops_with_the_reason() {
    use imglish_train::{train, MaskKind, Masking, ModelConfig, TrainConfig};
    let dir = tempfile::tempdir().expect("tempdir");
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).expect("mkdir");
    let info = TokenizerInfo {
        fingerprint: "ef".repeat(32),
        card: serde_json::json!({"name": "synthetic"}),
        grid: [4, 4],
        vocab_size: VOCAB,
        text_vocab_size: Some(TEXT_VOCAB),
        text_special_ids: specials(),
        views_per_sample: 1,
    };
    let mut part = PartWriter::try_new(tokens.join(part_file_name(0)), &info).expect("part");
    for id in 0..30u64 {
        part.write(&TokenRecord {
            sample_id: id,
            views: vec![],
            captions: vec![vec![2, 5 + (id % 30) as u32, 3]],
            label: None,
            split: if id < 25 { Split::Train } else { Split::Val },
            pixels: None,
        })
        .expect("write");
    }
    TokensManifest::new(info, vec![part.finish().expect("finish")])
        .write(&tokens)
        .expect("manifest");
    let dataset = dir.path().join("dataset");
    pack_dataset(&tokens, None, &dataset, &PackConfig::default(), &|_| {}).expect("pack");
    let mut model = ModelConfig::preset("tiny", [4, 4], i64::from(VOCAB)).expect("preset");
    (model.dim, model.heads, model.depth) = (16, 2, 1);
    let c = config(2);
    let beit = TrainConfig {
        model,
        optim: c.optim,
        masking: Masking::new(MaskKind::Blockwise, [4, 4]).expect("masking"),
        steps: 2,
        accum: 1,
        seed: 1,
        stream: c.stream,
    };
    let started = std::time::Instant::now();
    let err = train(&dataset, &dir.path().join("run"), &beit, &options(), &mut |_| {}).expect_err("no images");
    // The message names the sample and its shard.
    let id: u64 = err
        .to_string()
        .split("sample ")
        .nth(2)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .expect("a sample id");
    let shard = imglish_pack::Dataset::open(&dataset)
        .expect("open")
        .shard_of(id)
        .expect("scan")
        .expect("the sample's shard")
        .file
        .clone();
    assert_eq!(
        err.to_string(),
        format!(
            "dataset {}: no usable training sample in a whole epoch (25 read; the first, sample {id} in shard \
             {shard}, was skipped: a text sample: BEiT trains on images (--model beit3 trains on texts))",
            dataset.display(),
        )
    );
    assert!(started.elapsed().as_secs() < 30);
}

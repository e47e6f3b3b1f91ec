//! Helpers of the CLI tests: run the binary, write a token directory with `PartWriter`.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

use imglish_pack::{part_file_name, PartWriter, Split, TokenRecord, TokenizerInfo, TokensManifest, ViewRecord};

pub fn imglish(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imglish"))
        .args(args)
        .output()
        .expect("run imglish")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A token directory of `n` samples (4x4 grid, 512 codes, ids 0..40; captions; every fifth sample in val).
pub fn write_tokens(dir: &Path, n: u64) -> TokenizerInfo {
    write_tokens_with(dir, n, true, 512, "ab")
}

/// [`write_tokens`], with labels `id % 5` or none, a visual vocabulary of `vocab_size` codes and a tokenizer
/// fingerprint of `fingerprint` repeated to 64 characters.
pub fn write_tokens_with(dir: &Path, n: u64, labelled: bool, vocab_size: u32, fingerprint: &str) -> TokenizerInfo {
    std::fs::create_dir_all(dir).expect("mkdir");
    let info = TokenizerInfo {
        fingerprint: fingerprint.repeat(64 / fingerprint.len()),
        card: serde_json::json!({"name": "cli-test"}),
        grid: [4, 4],
        vocab_size,
        text_vocab_size: Some(1000),
        text_special_ids: ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[MASK]"]
            .iter()
            .enumerate()
            .map(|(i, n)| ((*n).to_string(), i as u32))
            .collect(),
        views_per_sample: 2,
    };
    let mut entries = Vec::new();
    for (p, ids) in (0..n).collect::<Vec<_>>().chunks(70).enumerate() {
        let mut w = PartWriter::try_new(dir.join(part_file_name(p)), &info).expect("part writer");
        for &id in ids {
            let views = (0..2u64)
                .map(|v| ViewRecord {
                    crop: [0, 0, 100 + v as u32, 80],
                    flip: v == 1,
                    tokens: (0..16u64).map(|t| (mix(id * 64 + v * 16 + t) % 40) as u16).collect(),
                })
                .collect();
            w.write(&TokenRecord {
                sample_id: id,
                views,
                captions: (0..id % 3)
                    .map(|c| (0..4 + (id + c) % 9).map(|t| (t * 7 % 1000) as u32).collect())
                    .collect(),
                label: labelled.then_some((id % 5) as i32),
                split: if id % 5 == 0 { Split::Val } else { Split::Train },
                pixels: None,
            })
            .expect("write");
        }
        entries.push(w.finish().expect("finish"));
    }
    TokensManifest::new(info.clone(), entries)
        .write(dir)
        .expect("tokenize.json");
    info
}

/// A token directory of `n` text-only samples (no views; one caption each), for BEiT-3 text corpora.
pub fn write_text_tokens(dir: &Path, n: u64) -> TokenizerInfo {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut info = write_tokens_with(&dir.join("unused"), 0, false, 512, "cd");
    info.fingerprint = "cd".repeat(32);
    let mut w = PartWriter::try_new(dir.join(part_file_name(0)), &info).expect("part writer");
    for id in 0..n {
        w.write(&TokenRecord {
            sample_id: id,
            views: vec![],
            captions: vec![vec![2, 5 + (id % 90) as u32, 6 + (id % 7) as u32, 3]],
            label: None,
            split: if id % 10 == 0 { Split::Val } else { Split::Train },
            pixels: None,
        })
        .expect("write");
    }
    TokensManifest::new(info.clone(), vec![w.finish().expect("finish")])
        .write(dir)
        .expect("tokenize.json");
    info
}

//! Deterministic test data for the pack tests: tokenizer infos, records and token-part directories.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use imglish_pack::*;

/// SplitMix64 step.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

pub fn info(views: u32, grid: [u32; 2], vocab: u32) -> TokenizerInfo {
    TokenizerInfo {
        fingerprint: format!("{:064x}", u64::from(vocab) * 31 + u64::from(views)),
        card: serde_json::json!({"name": "test-tokenizer", "grid": grid, "vocab_size": vocab}),
        grid,
        vocab_size: vocab,
        text_vocab_size: Some(5000),
        text_special_ids: [("bos".to_string(), 1), ("eos".to_string(), 2)].into_iter().collect(),
        views_per_sample: views,
    }
}

/// A record fully determined by `id`: skewed token codes (so they compress like real ones), 0-3 captions.
pub fn record(info: &TokenizerInfo, id: u64, pixels: bool) -> TokenRecord {
    let g = info.tokens_per_view();
    let mut h = mix(id);
    let mut next = move || {
        h = mix(h);
        h
    };
    let views = (0..info.views())
        .map(|_| ViewRecord {
            crop: [
                (next() % 64) as u32,
                (next() % 64) as u32,
                16 + (next() % 200) as u32,
                16 + (next() % 200) as u32,
            ],
            flip: next() % 2 == 1,
            tokens: (0..g)
                .map(|_| {
                    let r = next();
                    // Half the tokens from a small set of common codes.
                    let code = if r % 2 == 0 {
                        (r >> 8) % 16
                    } else {
                        (r >> 8) % u64::from(info.vocab_size)
                    };
                    code as u16
                })
                .collect(),
        })
        .collect();
    let captions = (0..next() % 4)
        .map(|_| (0..3 + next() % 20).map(|_| (next() % 5000) as u32).collect())
        .collect();
    TokenRecord {
        sample_id: id,
        views,
        captions,
        label: (id % 7 != 3).then_some((id % 10) as i32),
        split: if id % 10 == 9 { Split::Val } else { Split::Train },
        pixels: pixels.then(|| (0..(next() % 50) as u8).collect()),
    }
}

/// Writes `ids` as token parts of `per_part` rows into `dir` (created) and its `tokenize.json`.
pub fn write_parts(dir: &Path, info: &TokenizerInfo, ids: &[u64], per_part: usize, pixels: bool) -> TokensManifest {
    std::fs::create_dir_all(dir).expect("create tokens dir");
    let mut entries = Vec::new();
    for (n, chunk) in ids.chunks(per_part.max(1)).enumerate() {
        let mut w = PartWriter::try_new(dir.join(part_file_name(n)), info).expect("part writer");
        for &id in chunk {
            w.write(&record(info, id, pixels)).expect("write record");
        }
        entries.push(w.finish().expect("finish part"));
    }
    let manifest = TokensManifest::new(info.clone(), entries);
    manifest.write(dir).expect("write tokenize.json");
    manifest
}

/// sha256 (hex) of every file in `dir`, sorted by name.
pub fn dir_hashes(dir: &Path) -> Vec<(String, String)> {
    use sha2::{Digest, Sha256};
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            let e = e.expect("dir entry");
            let bytes = std::fs::read(e.path()).expect("read file");
            let hash: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            (e.file_name().to_string_lossy().into_owned(), hash)
        })
        .collect();
    v.sort();
    v
}

pub fn shard_paths(dataset: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dataset)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "arrow"))
        .collect();
    v.sort();
    v
}

//! Pack benchmark on synthetic token data: bytes/sample and build MB/s of our shards vs raw u16 tokens
//! (Megatron-style `.bin`), and streaming read samples/s with one worker.
//!
//! `cargo run -p imglish-pack --example bench -- [SAMPLES] [DIR]` (used by `scripts/bench-pack`).

use std::io::Write;
use std::time::Instant;

use imglish_pack::*;

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    // rest starts at field 3 (state, not numeric, filtered out), so utime/stime (fields 14/15) are f[10], f[11].
    f.get(10).zip(f.get(11)).map_or(f64::NAN, |(u, s)| (u + s) / 100.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).map_or(Ok(20_000), |s| s.parse())?;
    let keep = args.get(2).map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir()?;
    let work = keep.unwrap_or_else(|| tmp.path().to_path_buf());
    let (tokens_dir, out) = (work.join("tokens"), work.join("dataset"));
    std::fs::create_dir_all(&tokens_dir)?;
    let info = TokenizerInfo {
        fingerprint: "0".repeat(64),
        card: serde_json::json!({"name": "bench"}),
        grid: [14, 14],
        vocab_size: 8192,
        text_vocab_size: Some(32000),
        text_special_ids: Default::default(),
        views_per_sample: 2,
    };
    // Zipf-like code usage (as real visual tokenizers have) and spatially correlated neighbours.
    let record = |id: u64| {
        let mut h = mix(id);
        let mut next = move || {
            h = mix(h);
            h
        };
        let views = (0..2)
            .map(|_| {
                let mut prev = 0u16;
                let tokens = (0..196)
                    .map(|_| {
                        let r = next();
                        if r % 4 == 0 {
                            prev
                        } else {
                            let u = (r >> 16) as f64 / (1u64 << 48) as f64;
                            prev = ((8192f64).powf(u) - 1.0) as u16;
                            prev
                        }
                    })
                    .collect();
                ViewRecord {
                    crop: [0, 0, 224, 224],
                    flip: next() % 2 == 0,
                    tokens,
                }
            })
            .collect();
        let captions = vec![(0..12 + next() % 20).map(|_| (next() % 32000) as u32).collect()];
        TokenRecord {
            sample_id: id,
            views,
            captions,
            label: Some((id % 1000) as i32),
            split: Split::Train,
            pixels: None,
        }
    };
    let mut entries = Vec::new();
    let mut bin = std::io::BufWriter::new(std::fs::File::create(work.join("tokens.bin"))?);
    let t = Instant::now();
    for (p, chunk) in (0..n).collect::<Vec<_>>().chunks(10_000).enumerate() {
        let mut w = PartWriter::try_new(tokens_dir.join(part_file_name(p)), &info)?;
        for &id in chunk {
            let r = record(id);
            for v in &r.views {
                for t in &v.tokens {
                    bin.write_all(&t.to_le_bytes())?;
                }
            }
            w.write(&r)?;
        }
        entries.push(w.finish()?);
    }
    bin.flush()?;
    TokensManifest::new(info.clone(), entries).write(&tokens_dir)?;
    let parts_s = t.elapsed().as_secs_f64();
    let raw = std::fs::metadata(work.join("tokens.bin"))?.len();

    let config = PackConfig {
        target_shard_bytes: 64 << 20,
        batch_rows: 1024,
        zstd_level: 3,
        shuffle_seed: Some(1),
        include_pixels: false,
    };
    let t = Instant::now();
    let s = pack_dataset(&tokens_dir, None, &out, &config, &|_| {})?;
    let build_s = t.elapsed().as_secs_f64();

    let ds = Dataset::open(&out)?;
    let mut results = Vec::new();
    for (name, shuffle) in [
        ("none", Shuffle::None),
        ("window16", Shuffle::Window { batches: 16 }),
        ("global", Shuffle::Global),
    ] {
        let opts = StreamOptions {
            shuffle,
            ..StreamOptions::default()
        };
        // Passes over the epoch until a second has gone by (the first pass also verifies the shard hash once
        // per Dataset); the rate is per wall second and per CPU second of the whole process (the reader's
        // prefetch worker included), i.e. per core.
        let (t, cpu0) = (Instant::now(), cpu_seconds());
        let mut count = 0u64;
        let mut checksum = 0u64;
        while t.elapsed().as_secs_f64() < 1.0 {
            for sample in ds.stream(&opts, StreamState::default())? {
                let sample = sample?;
                checksum = checksum.wrapping_add(u64::from(sample.tokens[0]));
                count += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        let quality = mean_jump_ratio(&ds.epoch_order(Some(Split::Train), shuffle, 0, 0)?);
        results.push((name, count as f64 / secs, count as f64 / cpu, quality, checksum));
    }
    println!("samples                {n} (2 views x 14x14 tokens, vocab 8192, 1 caption)");
    println!("raw u16 tokens (.bin)  {:.1} bytes/sample", raw as f64 / n as f64);
    println!(
        "imglish shards         {:.1} bytes/sample ({} shards, {:.2}x smaller than raw tokens; includes captions, crops, labels)",
        s.bytes as f64 / n as f64,
        s.shards,
        raw as f64 / s.bytes as f64
    );
    println!("token parts (tokenize) {parts_s:.2}s to write");
    println!(
        "pack build             {build_s:.2}s, {:.1} MB/s of raw tokens, {:.0} samples/s",
        raw as f64 / 1e6 / build_s,
        n as f64 / build_s
    );
    for (name, rate, per_cpu, quality, _) in &results {
        println!(
            "stream read {name:<10} {rate:>10.0} samples/s (1 worker), {per_cpu:>10.0} per CPU second, shuffle jump ratio {quality:.3}"
        );
    }
    // Machine-readable results for the peer comparison (pack/bench/peers.py reads them).
    let stream: serde_json::Map<String, serde_json::Value> = results
        .iter()
        .map(|(name, rate, per_cpu, _, _)| {
            let v = serde_json::json!({"wall": rate, "cpu": per_cpu});
            ((*name).to_string(), v)
        })
        .collect();
    let summary = serde_json::json!({
        "samples": n,
        "raw_bytes": raw,
        "imglish_bytes": s.bytes,
        "build_s": build_s,
        "stream_samples_per_s": stream,
    });
    std::fs::write(work.join("imglish.json"), serde_json::to_vec_pretty(&summary)?)?;
    Ok(())
}

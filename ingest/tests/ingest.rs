//! Ingest on the demo corpus: every source kind and caption format, labels, splits, duplicates, every bad input
//! with its reason code, unsafe tar members, determinism across thread counts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imglish_ingest::{
    ingest, read_image_bytes, write_demo_corpus, write_image_parquet, DemoConfig, DemoSummary, IngestConfig, JoinOn,
    LabelMode, Manifest, Split,
};

/// One demo corpus shared by the tests of this file (generated once, in the target's temp dir).
fn demo() -> &'static (PathBuf, DemoSummary) {
    static DEMO: OnceLock<(PathBuf, DemoSummary)> = OnceLock::new();
    DEMO.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("ingest-demo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let config = DemoConfig::default().try_with_images(48).expect("config").with_seed(3);
        let summary = write_demo_corpus(&dir, &config, &|_| {}).expect("demo corpus");
        (dir, summary)
    })
}

/// (relative path, captions) of every existing image of the demo corpus, from its JSONL caption set.
fn demo_images() -> Vec<(String, Vec<String>)> {
    let (root, _) = demo();
    std::fs::read_to_string(root.join("captions/captions.jsonl"))
        .expect("jsonl")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .map(|v| {
            let caps = v["captions"]
                .as_array()
                .expect("captions")
                .iter()
                .map(|c| c.as_str().expect("str").to_string());
            (v["image"].as_str().expect("image").to_string(), caps.collect())
        })
        .filter(|(p, _)| root.join("images").join(p).exists())
        .collect()
}

/// The demo's duplicate pair: whichever has the larger sample id is the reject.
fn duplicate_pair(rejects: &BTreeMap<String, (String, String)>) -> (String, String) {
    rejects
        .iter()
        .find(|(_, (reason, _))| reason == "duplicate")
        .map(|(k, (_, m))| (k.clone(), m.clone()))
        .expect("one duplicate reject")
}

fn out_dir(name: &str) -> tempfile::TempDir {
    let _ = name;
    tempfile::tempdir().expect("tempdir")
}

fn run(config: &IngestConfig, out: &Path) -> imglish_ingest::IngestSummary {
    ingest(config, out, &|_| {}).expect("ingest")
}

fn rejects_by_key(out: &Path) -> BTreeMap<String, (String, String)> {
    Manifest::rejects(out)
        .expect("rejects")
        .into_iter()
        .map(|r| (r.key.clone(), (r.reason, r.message)))
        .collect()
}

#[test]
fn folder_tree_with_coco_captions_and_folder_labels() {
    let (root, summary) = demo();
    let out = out_dir("folders");
    let config = IngestConfig::try_new(vec![root.join("images")])
        .expect("config")
        .with_captions(vec![root.join("captions/coco_captions.json")])
        .with_labels(LabelMode::FromFolders);
    let s = run(&config, out.path());
    let manifest = Manifest::open(out.path()).expect("open");
    assert_eq!(manifest.rows.len(), summary.images);
    assert_eq!(s.counts.accepted as usize, summary.images);
    assert_eq!(
        s.counts.seen,
        s.counts.accepted + s.counts.rejected,
        "nothing disappears"
    );
    // Class table by sorted folder name.
    let names: Vec<&str> = manifest.classes.keys().map(String::as_str).collect();
    assert_eq!(names, imglish_ingest::CLASSES.to_vec());
    for row in &manifest.rows {
        let folder = row.key.split('/').next().expect("folder");
        assert_eq!(row.label_name.as_deref(), Some(folder));
        assert_eq!(row.label, manifest.classes.get(folder).copied());
        assert!(
            row.key.contains("copy_of") || !row.captions.is_empty(),
            "{} has captions",
            row.key
        );
        assert_eq!(read_image_bytes(row).expect("bytes").len() as u64, row.bytes);
    }
    // Sorted by sample id, ids unique.
    assert!(manifest.rows.windows(2).all(|w| w[0].sample_id < w[1].sample_id));

    // Every bad input of the demo corpus is a reject with its expected reason.
    let rejects = rejects_by_key(out.path());
    for bad in summary.bad_inputs.iter().filter(|b| b.reason != "duplicate") {
        let key = bad.path.trim_start_matches("images/");
        let (reason, message) = rejects
            .get(key)
            .unwrap_or_else(|| panic!("{key} not rejected: {rejects:?}"));
        assert_eq!(reason, &bad.reason, "{key}: {message}");
    }
    // The duplicate pair: the one with the larger sample id is rejected, naming the survivor.
    let (dup_key, dup_msg) = duplicate_pair(&rejects);
    let survivor = manifest
        .rows
        .iter()
        .find(|r| r.key.contains("demo_00000"))
        .expect("survivor kept");
    assert!(dup_key.contains("demo_00000"), "{dup_key}");
    assert_ne!(dup_key, survivor.key);
    assert_eq!(
        dup_msg,
        format!(
            "byte-identical to sample {} ({}: {})",
            survivor.sample_id, survivor.source, survivor.key
        )
    );
    assert!(imglish_ingest::sample_id(&survivor.source, &dup_key) > survivor.sample_id);
    assert_eq!(
        rejects["cross/bad_huge.png"].1,
        "100000x100000 = 10000000000 pixels exceeds --max-pixels 178956970"
    );
    assert_eq!(s.counts.captions_without_images, 2);
    assert_eq!(s.counts.by_reason["missing-image"], 2);
}

/// The captions a manifest assigns, by key.
fn captions_of(out: &Path) -> BTreeMap<String, BTreeSet<String>> {
    Manifest::open(out)
        .expect("open")
        .rows
        .into_iter()
        .map(|r| (r.key.clone(), r.captions.into_iter().collect()))
        .collect()
}

#[test]
fn coco_jsonl_and_tsv_caption_sets_agree() {
    let (root, _) = demo();
    let mut results = Vec::new();
    for file in ["coco_captions.json", "captions.jsonl", "captions.tsv"] {
        let out = out_dir(file);
        let config = IngestConfig::try_new(vec![root.join("images")])
            .expect("config")
            .with_captions(vec![root.join("captions").join(file)]);
        let s = run(&config, out.path());
        let copy_survived = Manifest::open(out.path())
            .expect("open")
            .rows
            .iter()
            .any(|r| r.key.contains("copy_of"));
        assert_eq!(s.counts.images_without_captions, copy_survived as u64, "{file}");
        assert_eq!(s.counts.captions_without_images, 2, "{file}");
        results.push(captions_of(out.path()));
    }
    assert_eq!(results[0], results[1]);
    assert_eq!(results[0], results[2]);
}

#[test]
fn webdataset_tar_shards_with_stem_join_and_cls_labels() {
    let (root, summary) = demo();
    let shards: Vec<PathBuf> = (0..summary.shards)
        .map(|i| root.join(format!("shards/demo-{i:05}.tar")))
        .collect();
    let out = out_dir("tar");
    let config = IngestConfig::try_new(shards)
        .expect("config")
        .with_captions(vec![root.join("captions/captions.jsonl")])
        .with_join_on(JoinOn::Stem);
    let s = run(&config, out.path());
    assert_eq!(s.counts.accepted as usize, summary.images);
    let manifest = Manifest::open(out.path()).expect("open");
    let images = demo_images();
    for row in &manifest.rows {
        assert!(matches!(row.locator, imglish_ingest::Locator::TarMember { .. }));
        let label = row.label.expect("label from .cls") as usize;
        let (path, captions) = images
            .iter()
            .find(|(p, _)| p.rsplit('/').next().and_then(|b| b.split('.').next()) == Some(row.key.as_str()))
            .expect("same image in the folder tree");
        assert_eq!(path.split('/').next(), Some(imglish_ingest::CLASSES[label]));
        // The tar's caption (.txt) is the first of the caption set's; joined, they are the caption set's.
        assert_eq!(&row.captions, captions, "{}", row.key);
        // Bytes read back through the tar offset are the image.
        let bytes = read_image_bytes(row).expect("read member");
        assert_eq!(
            imglish_ingest::validate_bytes(&bytes, &Default::default())
                .expect("valid")
                .content_hash,
            row.content_hash
        );
    }
}

#[test]
fn tar_members_with_unsafe_names_are_rejected_never_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (root, _) = demo();
    let first = &demo_images()[0].0;
    let good = std::fs::read(root.join("images").join(first)).expect("read");
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        builder.append(&h, data).expect("append");
    };
    add("../evil.png", &good);
    add("/abs/evil2.png", &good);
    add("ok_000.png", &good);
    add("ok_000.txt", b"a caption");
    let tar_path = dir.path().join("bad.tar");
    std::fs::write(&tar_path, builder.into_inner().expect("tar")).expect("write");
    let out = dir.path().join("m");
    let s = run(&IngestConfig::try_new(vec![tar_path]).expect("config"), &out);
    assert_eq!(s.counts.accepted, 1);
    let rejects = rejects_by_key(&out);
    assert_eq!(rejects["../evil.png"].0, "unsafe-path");
    assert_eq!(rejects["/abs/evil2.png"].0, "unsafe-path");
    assert_eq!(
        rejects["../evil.png"].1,
        "member name is absolute or contains '..'; not followed"
    );
    assert!(!dir.path().parent().expect("parent").join("evil.png").exists());
    let m = Manifest::open(&out).expect("open");
    assert_eq!(m.rows[0].captions, vec!["a caption".to_string()]);
}

#[test]
fn parquet_sources_and_parquet_captions() {
    let (root, _) = demo();
    let dir = tempfile::tempdir().expect("tempdir");
    let images = demo_images();
    let files: Vec<&str> = images.iter().take(3).map(|(p, _)| p.as_str()).collect();
    let rows: Vec<(Vec<u8>, String, String, i64)> = files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let bytes = std::fs::read(root.join("images").join(f)).expect("read");
            (bytes, f.to_string(), format!("caption {i}"), i as i64 + 10)
        })
        .collect();
    let pq = dir.path().join("images.parquet");
    write_image_parquet(&pq, &rows).expect("write parquet");
    let out = dir.path().join("m");
    let config = IngestConfig::try_new(vec![pq.clone()])
        .expect("config")
        .with_parquet_columns(imglish_ingest::ParquetColumns {
            image: "image".into(),
            caption: Some("caption".into()),
            label: Some("label".into()),
        })
        .with_captions(vec![root.join("captions/coco_captions.json")]);
    let s = run(&config, &out);
    assert_eq!(s.counts.accepted, 3);
    let m = Manifest::open(&out).expect("open");
    for row in &m.rows {
        let i = files
            .iter()
            .position(|f| *f == row.key)
            .expect("key is the struct path");
        assert_eq!(row.label, Some(i as i32 + 10));
        assert_eq!(row.captions[0], format!("caption {i}"));
        assert!(row.captions.len() > 1, "COCO captions joined by path too");
        assert_eq!(read_image_bytes(row).expect("bytes"), rows[i].0);
    }
}

#[test]
fn split_is_stable_when_files_are_added() {
    let (root, _) = demo();
    let dir = tempfile::tempdir().expect("tempdir");
    let tree = dir.path().join("tree");
    for class in ["circle", "square"] {
        std::fs::create_dir_all(tree.join(class)).expect("mkdir");
    }
    let copy = |name: &str| {
        std::fs::copy(root.join("images").join(name), tree.join(name)).expect("copy");
    };
    let first: Vec<String> = std::fs::read_dir(root.join("images/circle"))
        .expect("ls")
        .map(|e| format!("circle/{}", e.expect("entry").file_name().to_string_lossy()))
        .filter(|n| n.contains("demo_"))
        .collect();
    for f in &first {
        copy(f);
    }
    let config = IngestConfig::try_new(vec![tree.clone()])
        .expect("config")
        .try_with_val_fraction(0.5)
        .expect("f");
    let a = dir.path().join("a");
    run(&config, &a);
    for e in std::fs::read_dir(root.join("images/square")).expect("ls") {
        let name = format!("square/{}", e.expect("entry").file_name().to_string_lossy());
        if name.contains("demo_") {
            copy(&name);
        }
    }
    let b = dir.path().join("b");
    run(&config, &b);
    let ma: BTreeMap<String, (u64, Split)> = Manifest::open(&a)
        .expect("a")
        .rows
        .into_iter()
        .map(|r| (r.key, (r.sample_id, r.split)))
        .collect();
    let mb: BTreeMap<String, (u64, Split)> = Manifest::open(&b)
        .expect("b")
        .rows
        .into_iter()
        .map(|r| (r.key, (r.sample_id, r.split)))
        .collect();
    assert!(mb.len() > ma.len());
    for (k, v) in &ma {
        assert_eq!(mb.get(k), Some(v), "{k} kept its id and split");
    }
    let vals = mb.values().filter(|v| v.1 == Split::Val).count();
    assert!(vals > 0 && vals < mb.len(), "both splits used");
}

#[test]
fn manifests_are_byte_identical_whatever_the_thread_count() {
    let (root, _) = demo();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = IngestConfig::try_new(vec![root.join("images"), root.join("shards/demo-00000.tar")])
        .expect("config")
        .with_captions(vec![root.join("captions/captions.tsv")])
        .with_labels(LabelMode::FromFolders);
    let mut outputs = Vec::new();
    for threads in [1, 2, 3] {
        let out = dir.path().join(format!("t{threads}"));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let s = pool.install(|| run(&config, &out));
        let files: Vec<Vec<u8>> = ["samples.parquet", "rejects.parquet", "classes.json"]
            .iter()
            .map(|f| std::fs::read(out.join(f)).expect("read"))
            .collect();
        outputs.push((files, s.fingerprint, s.counts));
    }
    assert_eq!(outputs[0], outputs[1]);
    assert_eq!(outputs[0], outputs[2]);
}

#[test]
fn require_captions_turns_uncaptioned_images_into_rejects() {
    let (root, summary) = demo();
    let out = out_dir("req");
    let config = IngestConfig::try_new(vec![root.join("images")])
        .expect("config")
        .with_require_captions(true);
    let s = run(&config, out.path());
    assert_eq!(s.counts.accepted, 0);
    assert_eq!(s.counts.by_reason["missing-caption"] as usize, summary.images);
}

#[test]
fn csv_and_parquet_caption_sets_agree_with_jsonl() {
    use polars::prelude::*;
    let (root, _) = demo();
    let dir = tempfile::tempdir().expect("tempdir");
    let images = demo_images();
    // CSV with a header in another column order, quoted captions.
    let mut csv = String::from("file_name,caption\n");
    let (mut paths, mut caps) = (Vec::new(), Vec::new());
    for (p, cs) in &images {
        for c in cs {
            csv.push_str(&format!("{p},\"{c}\"\n"));
        }
        paths.push(p.clone());
        caps.push(Series::new("".into(), cs.clone()));
    }
    let csv_path = dir.path().join("caps.csv");
    std::fs::write(&csv_path, csv).expect("csv");
    let pq_path = dir.path().join("caps.parquet");
    let mut df = DataFrame::new(
        paths.len(),
        vec![
            Column::from(Series::new("image".into(), paths)),
            Column::from(Series::new("captions".into(), caps)),
        ],
    )
    .expect("df");
    ParquetWriter::new(std::fs::File::create(&pq_path).expect("create"))
        .finish(&mut df)
        .expect("write");
    let mut results = Vec::new();
    for file in [root.join("captions/captions.jsonl"), csv_path, pq_path] {
        let out = dir
            .path()
            .join(format!("m-{}", file.extension().expect("ext").to_string_lossy()));
        let config = IngestConfig::try_new(vec![root.join("images")])
            .expect("config")
            .with_captions(vec![file]);
        run(&config, &out);
        results.push(captions_of(&out));
    }
    assert_eq!(results[0], results[1], "csv");
    assert_eq!(results[0], results[2], "parquet");
}

#[test]
fn a_jsonl_caption_line_with_other_field_names_is_a_reject_naming_its_fields() {
    let (root, _) = demo();
    let dir = out_dir("fields");
    let captions = dir.path().join("caps.jsonl");
    std::fs::write(
        &captions,
        "{\"img\": \"square/x.png\", \"desc\": \"a square\"}\n[1, 2]\n",
    )
    .expect("write");
    let out = dir.path().join("m");
    let config = IngestConfig::try_new(vec![root.join("images")])
        .expect("config")
        .with_captions(vec![captions]);
    run(&config, &out);
    let rows: Vec<_> = Manifest::rejects(&out)
        .expect("rejects")
        .into_iter()
        .filter(|r| r.source.ends_with("caps.jsonl"))
        .collect();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let expected = |has: &str| {
        format!(
            "expected {{\"image\": ..., \"caption\": ...}} or \"captions\": [...] (image fields: image, file_name, \
             path, filepath, url; caption fields: caption, captions, text, title); this line has: {has}"
        )
    };
    assert_eq!(rows[0].reason, "bad-record");
    assert_eq!(rows[0].message, expected("desc, img"));
    assert_eq!(rows[1].message, expected("no fields"));
}

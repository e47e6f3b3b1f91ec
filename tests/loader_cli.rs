//! The trainer's loader on a dataset with nothing the model can use says so within seconds (a warning after the
//! first 4096 samples) and stops with the reason after a whole epoch.

mod common;

use common::{imglish, text, write_text_tokens};

#[test]
fn beit_on_a_long_text_only_dataset_warns_early_then_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (tokens, dataset, run) = (
        dir.path().join("tokens"),
        dir.path().join("dataset"),
        dir.path().join("run"),
    );
    write_text_tokens(&tokens, 6000);
    let o = imglish(&[
        "-q",
        "pack",
        "--tokens",
        tokens.to_str().expect("utf8"),
        "--out",
        dataset.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = imglish(&[
        "--threads",
        "1",
        "train",
        "--dataset",
        dataset.to_str().expect("utf8"),
        "--out",
        run.to_str().expect("utf8"),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--dim",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = text(&o.stderr);
    let warn = err.find("no usable training sample among the first 4096 read (the first, sample ");
    let fail = err.find("no usable training sample in a whole epoch (5400 read; the first, sample ");
    assert!(warn.is_some() && fail.is_some() && warn < fail, "{err}");
    assert!(
        err.contains("was skipped: a text sample: BEiT trains on images (--model beit3 trains on texts))"),
        "{err}"
    );
    // Both name the sample's shard.
    assert_eq!(err.matches(" in shard shard-").count(), 2, "{err}");
}
